"""UPGrad and DualProj: Jacobian descent by projection onto the dual cone.

Quinton & Rey (2024) aggregate the rows of the Jacobian ``J`` (the task
gradients) so that the update never conflicts with any task: it lies in the
dual cone ``C = {v : <v, g_t> >= 0 for all t}``. Projecting a combination
``J^T u`` onto ``C`` is a small quadratic programme in the Gram matrix: the
projection is ``J^T (u + x)`` with

.. math::

  x = \\operatorname*{argmin}_{x \\ge 0} \\tfrac12 (u + x)^\\top G (u + x)
    = \\operatorname*{argmin}_{x \\ge 0} \\tfrac12 x^\\top G x
      + (G u)^\\top x ,

solved here on the device by :func:`mgda_jax.nonneg_qp` (TorchJD calls
``quadprog`` on the host).

* **UPGrad** ("unconflicting projection of gradients") projects each
  ``g_i / K`` onto ``C`` and sums the projections: ``u = e_i / K`` for each
  ``i``, the ``K`` programmes solved in parallel (``vmap``). When no two
  gradients conflict it is the average gradient.
* **DualProj** projects the average gradient itself: ``u = 1 / K``.

Both outputs have non-negative inner products with every task gradient.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mgda_jax._src import aggregation
from mgda_jax._src import dtypes
from mgda_jax._src import mgda as mgda_lib
from mgda_jax._src import nonneg_qp as qp_lib


class ProjectionInfo(NamedTuple):
  """Diagnostics of the dual-cone projections.

  Attributes:
    num_steps: the largest number of active-set steps over the programmes.
    kkt_violation: the largest KKT violation over the programmes.
    converged: every programme converged.
  """

  num_steps: jax.Array
  kkt_violation: jax.Array
  converged: jax.Array


def project_weights(gram: jax.Array, u: jax.Array):
  """Weights of the projection of ``J^T u`` onto the dual cone: ``u + x``."""
  sol = qp_lib.nonneg_qp(gram, gram @ u)
  return u + sol.x, sol


def _info(sol):
  return ProjectionInfo(jnp.max(sol.num_steps), jnp.max(sol.kkt_violation),
                        jnp.all(sol.converged))


def upgrad_weights(gram: jax.Array, preferences=None
                   ) -> tuple[jax.Array, ProjectionInfo]:
  """UPGrad's weights: ``sum_i`` of the projections of ``p_i g_i``.

  Args:
    gram: ``(K, K)`` Gram matrix.
    preferences: ``p`` (default ``1/K`` each).

  Returns:
    ``(weights, info)``.
  """
  dtype = dtypes.solve_dtype(gram.dtype)
  gram = gram.astype(dtype)
  k = gram.shape[0]
  p = jnp.full((k,), 1.0 / k, dtype) if preferences is None else (
      jnp.asarray(preferences, dtype))
  us = jnp.diag(p)
  w, sol = jax.vmap(lambda u: project_weights(gram, u))(us)
  return jnp.sum(w, axis=0), _info(sol)


def dualproj_weights(gram: jax.Array, preferences=None
                     ) -> tuple[jax.Array, ProjectionInfo]:
  """DualProj's weights: the projection of ``sum_t p_t g_t`` (default mean)."""
  dtype = dtypes.solve_dtype(gram.dtype)
  gram = gram.astype(dtype)
  k = gram.shape[0]
  p = jnp.full((k,), 1.0 / k, dtype) if preferences is None else (
      jnp.asarray(preferences, dtype))
  w, sol = project_weights(gram, p)
  return w, _info(sol)


class ProjectionState(NamedTuple):
  """Inner state of :func:`upgrad` and :func:`dualproj`."""

  info: ProjectionInfo


def _projection_method(name, weights_fn, num_tasks, preferences, shared):
  num_tasks = mgda_lib.check_num_tasks(num_tasks, name)

  def weight_fn(gram, inner, losses):
    del losses
    w, info = weights_fn(gram, preferences)
    return w, ProjectionState(info)

  def init_inner(dtype):
    return ProjectionState(ProjectionInfo(
        jnp.zeros((), jnp.int32), jnp.full((), jnp.inf, dtype),
        jnp.zeros((), bool)))

  return aggregation.gram_method(name, num_tasks, weight_fn, init_inner,
                                 shared=shared)


def upgrad(num_tasks: int, *, preferences=None,
           shared=None) -> optax.GradientTransformationExtraArgs:
  """UPGrad as an optax transform (see the module docstring).

  Args:
    num_tasks: ``K`` (static).
    preferences: ``p`` (default ``1/K`` each; ``inject_hyperparams``-able).
    shared: which per-task-gradient leaves are shared.

  Returns:
    A ``GradientTransformationExtraArgs`` with state
    :class:`GradientMethodState` (``inner`` is a :class:`ProjectionState`).

  References:
    Quinton & Rey, *Jacobian Descent for Multi-Objective Optimization*,
    2024, https://arxiv.org/abs/2406.16232
  """
  return _projection_method('upgrad', upgrad_weights, num_tasks, preferences,
                            shared)


def dualproj(num_tasks: int, *, preferences=None,
             shared=None) -> optax.GradientTransformationExtraArgs:
  """DualProj as an optax transform (see the module docstring).

  Args:
    num_tasks: ``K`` (static).
    preferences: ``p`` (default ``1/K`` each).
    shared: which per-task-gradient leaves are shared.

  Returns:
    A ``GradientTransformationExtraArgs`` with state
    :class:`GradientMethodState` (``inner`` is a :class:`ProjectionState`).

  References:
    Quinton & Rey, *Jacobian Descent for Multi-Objective Optimization*,
    2024, https://arxiv.org/abs/2406.16232
  """
  return _projection_method('dualproj', dualproj_weights, num_tasks,
                            preferences, shared)
