"""Gradient-norm normalisation: every task gradient scaled to unit norm.

.. math::

  d = \\sum_t \\frac{g_t}{\\operatorname{sg}(\\|g_t\\|)} ,

the gradient of ``sum_t L_t / sg(||grad L_t||)``. Unlike the loss-based
weightings it is invariant to both scaling and shifting a task's loss. A
task with a zero gradient gets weight 0 (its gradient contributes nothing
either way). Where the input is a :class:`mgda_jax.RepresentationGrads`, the
norms are taken at the shared representation ``Z`` (no extra backward pass),
as for :func:`mgda_jax.gradnorm`.
"""

import jax.numpy as jnp
import optax

from mgda_jax._src import aggregation
from mgda_jax._src import mgda as mgda_lib


def unit_norm_weights(gram):
  """``1 / ||g_t||`` from the Gram matrix (0 for a zero gradient)."""
  n = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
  return jnp.where(n > 0, 1.0 / jnp.where(n > 0, n, 1.0), 0.0)


def gradient_normalization(num_tasks: int, *,
                           shared=None) -> optax.GradientTransformationExtraArgs:
  """Gradient-norm normalisation as an optax transform (module docstring).

  Args:
    num_tasks: ``K`` (static).
    shared: which per-task-gradient leaves are shared.

  Returns:
    A ``GradientTransformationExtraArgs`` with state
    :class:`GradientMethodState` (``inner`` is ``()``).

  References:
    Chen, Badrinarayanan, Lee & Rabinovich, *GradNorm*, ICML 2018,
    https://arxiv.org/abs/1711.02257 (the gradient-magnitude balance it
    targets with alpha = 0); Vandenhende et al., *Multi-Task Learning for
    Dense Prediction Tasks: A Survey*, TPAMI 2021,
    https://arxiv.org/abs/2004.13379
  """
  num_tasks = mgda_lib.check_num_tasks(num_tasks, 'gradient_normalization')
  return aggregation.gram_method(
      'gradient_normalization', num_tasks,
      lambda gram, inner, losses: (unit_norm_weights(gram), inner),
      lambda dtype: (), shared=shared)
