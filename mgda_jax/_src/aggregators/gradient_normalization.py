"""Gradient-norm normalisation: every task gradient scaled to unit norm.

.. math::

  d = \\sum_t \\frac{g_t}{\\operatorname{sg}(\\|g_t\\|)} ,

the gradient of ``sum_t L_t / sg(||grad L_t||)`` on the shared parameters
(task-specific parameters get their own gradients, unscaled, as with every
gradient method here). Unlike the loss-based
weightings it is invariant to both scaling and shifting a task's loss. A
task with a zero gradient gets weight 0 (its gradient contributes nothing
either way). Where the input is a :class:`mgda_jax.RepresentationGrads`, the
norms are taken at the shared representation ``Z`` (no extra backward pass),
as for :func:`mgda_jax.gradnorm`.
"""

import jax.numpy as jnp
import optax

from mgda_jax._src import engine
from mgda_jax._src.core import checks
from mgda_jax._src.core import results


SCALES = ('unit', 'mean')


def _check_scale(scale):
  if scale not in SCALES:
    raise ValueError(f'scale must be one of {SCALES}; got {scale!r}.')


def unit_norm_weights(gram, scale: str = 'unit'):
  """``1 / ||g_t||`` (or ``mean_s ||g_s|| / ||g_t||``) from the Gram matrix.

  A zero gradient gets weight 0.
  """
  _check_scale(scale)
  n = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
  w = jnp.where(n > 0, 1.0 / jnp.where(n > 0, n, 1.0), 0.0)
  if scale == 'mean':
    w = w * jnp.mean(n)
  return w


def gradient_normalization(num_tasks: int, *, scale: str = 'unit',
                           shared=None,
    axis_name=None) -> optax.GradientTransformationExtraArgs:
  """Gradient-norm normalisation as an optax transform (module docstring).

  With ``scale='unit'`` every task gradient is scaled to norm 1 (the
  formula above). With ``scale='mean'`` every task gradient is scaled to the
  mean of the task gradients' norms, ``w_t = mean_s ||g_s|| / ||g_t||``: the
  same balance, but the update keeps the size of the gradients, so a
  learning rate tuned for uniform weighting still fits. That matters where
  the norms are taken at the representation ``Z``: per-example gradients of
  a batch-mean loss are small (about ``1/B`` of the loss's scale), unit
  weights at ``Z`` are correspondingly huge, and the encoder's update is
  blown up by that factor (MultiMNIST diverges at the paper's learning rate
  with ``'unit'``; see ``docs/RESULTS.md``).

  Args:
    num_tasks: ``K`` (static).
    scale: ``'unit'`` or ``'mean'`` (static).
    shared: which per-task-gradient leaves are shared (see
      :func:`mgda_jax.mgda`).
    axis_name: the data-parallel axis for an untyped ``jax.shard_map`` or
      ``jax.pmap`` (see the README's "Several devices").

  Returns:
    A ``GradientTransformationExtraArgs`` with state
    :class:`MethodState` (``inner`` is ``()``).

  References:
    Chen, Badrinarayanan, Lee & Rabinovich, *GradNorm*, ICML 2018,
    https://arxiv.org/abs/1711.02257 (the gradient-magnitude balance it
    targets with alpha = 0); Vandenhende et al., *Multi-Task Learning for
    Dense Prediction Tasks: A Survey*, TPAMI 2021,
    https://arxiv.org/abs/2004.13379
  """
  num_tasks = checks.check_num_tasks(num_tasks, 'gradient_normalization')
  _check_scale(scale)
  return engine.gram_method(
      'gradient_normalization', num_tasks,
      lambda gram, inner, losses: (unit_norm_weights(gram, scale), inner),
      lambda dtype: (), shared=shared, axis_name=axis_name)
