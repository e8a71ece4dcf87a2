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

from mgda_jax._src import engine
from mgda_jax._src.core import checks
from mgda_jax._src.core import results
from mgda_jax._src.core import dtypes
from mgda_jax._src.solvers import nonneg_qp as qp_lib


class ProjectionInfo(NamedTuple):
  """Diagnostics of the dual-cone projections.

  Attributes:
    num_steps: the largest number of active-set steps over the programmes.
    kkt_violation: the largest KKT violation over the programmes.
    converged: every programme converged.
    result: the worst :class:`mgda_jax.SolverResult` code of the programmes.
  """

  num_steps: jax.Array
  kkt_violation: jax.Array
  converged: jax.Array
  result: jax.Array


def project_weights(gram: jax.Array, u: jax.Array):
  """Weights of the projection of ``J^T u`` onto the dual cone: ``u + x``."""
  sol = qp_lib.nonneg_qp(gram, gram @ u)
  return u + sol.x, sol


def _info(sol):
  return ProjectionInfo(jnp.max(sol.num_steps), jnp.max(sol.kkt_violation),
                        jnp.all(sol.converged), jnp.max(sol.result))


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


def _projection_method(name, weights_fn, num_tasks, preferences, shared,
                       axis_name):
  num_tasks = checks.check_num_tasks(num_tasks, name)
  if preferences is not None:
    checks.check_scalar(name, 'preferences', preferences, low=0.0)

  def weight_fn(gram, inner, losses):
    del losses
    w, info = weights_fn(gram, preferences)
    return w, inner, results.SolveInfo(info.num_steps, info.kkt_violation,
                                       info.converged, info.result)

  return engine.gram_method(name, num_tasks, weight_fn, lambda dtype: (),
                            shared=shared, axis_name=axis_name)


def upgrad(num_tasks: int, *, preferences=None,
           shared=None, axis_name=None
           ) -> optax.GradientTransformationExtraArgs:
  """UPGrad as an optax transform (see the module docstring).

  Args:
    num_tasks: ``K`` (static).
    preferences: ``p`` (default ``1/K`` each; ``inject_hyperparams``-able).
    shared: which per-task-gradient leaves are shared (see
      :func:`mgda_jax.mgda`).
    axis_name: the data-parallel axis for an untyped ``jax.shard_map`` or
      ``jax.pmap`` (see the README's "Several devices").

  Returns:
    A ``GradientTransformationExtraArgs`` with state
    :class:`MethodState` (``info`` is the worst of the K programmes).

  References:
    Quinton & Rey, *Jacobian Descent for Multi-Objective Optimization*,
    2024, https://arxiv.org/abs/2406.16232
  """
  return _projection_method('upgrad', upgrad_weights, num_tasks, preferences,
                            shared, axis_name)


def dualproj(num_tasks: int, *, preferences=None,
             shared=None, axis_name=None
           ) -> optax.GradientTransformationExtraArgs:
  """DualProj as an optax transform (see the module docstring).

  Args:
    num_tasks: ``K`` (static).
    preferences: ``p`` (default ``1/K`` each).
    shared: which per-task-gradient leaves are shared (see
      :func:`mgda_jax.mgda`).
    axis_name: the data-parallel axis for an untyped ``jax.shard_map`` or
      ``jax.pmap`` (see the README's "Several devices").

  Returns:
    A ``GradientTransformationExtraArgs`` with state
    :class:`MethodState` (``info`` is the worst of the K programmes).

  References:
    Quinton & Rey, *Jacobian Descent for Multi-Objective Optimization*,
    2024, https://arxiv.org/abs/2406.16232
  """
  return _projection_method('dualproj', dualproj_weights, num_tasks,
                            preferences, shared, axis_name)
