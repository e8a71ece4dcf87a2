"""MGDA as an optax aggregator: per-task gradients in, one update out.

For per-task gradients ``g_t`` of the shared parameters, MGDA (Sener & Koltun
2018, Algorithm 2) updates them along the minimum-norm element of the convex
hull of the ``g_t``,

.. math::

  d = \\sum_t \\alpha_t g_t, \\qquad
  \\alpha = \\operatorname*{argmin}_{\\alpha \\in \\Delta^K}
  \\Big\\| \\sum_t \\alpha_t g_t \\Big\\|^2,

a direction along which no task's loss increases to first order (``<d, g_t>
>= ||d||^2`` for every ``t``). Task-specific parameters are updated with their
own task's gradient, unscaled.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax.experimental import aggregating

from mgda_jax._src import gram as gram_lib
from mgda_jax._src import min_norm
from mgda_jax._src import normalizers as norm_lib

SharedSpec = Any  # None | pytree of bools | Callable[[params], pytree of bools]


class MGDAState(NamedTuple):
  """State of :func:`mgda` and :func:`mgda_ub`.

  Attributes:
    count: number of updates so far, int32.
    info: the last solve's :class:`MinNormSolution` (``weights`` of shape
      ``(num_tasks,)``, ``sq_norm``, ``gap``, ``num_steps``, ``converged``,
      ``result``), for logging. Before the first update the weights are
      uniform and ``result`` is ``SolverResult.MAX_STEPS_REACHED`` (nothing
      solved yet).
  """

  count: jax.Array
  info: min_norm.MinNormSolution


def check_num_tasks(num_tasks, factory: str) -> int:
  """``num_tasks`` as a static Python int, or a clear error."""
  if isinstance(num_tasks, jax.core.Tracer) or not (
      isinstance(num_tasks, int) or (hasattr(num_tasks, 'ndim')
                                     and num_tasks.ndim == 0)):
    raise ValueError(
        f'{factory}: num_tasks must be a static Python int (it sets the '
        f'shape of the optimizer state); got {num_tasks!r}. Under '
        "optax.inject_hyperparams pass static_args=('num_tasks',).")
  num_tasks = int(num_tasks)
  if num_tasks < 1:
    raise ValueError(f'{factory}: num_tasks must be >= 1; got {num_tasks}.')
  return num_tasks


def check_options(factory: str, num_tasks, normalizer: str,
                  method: str) -> int:
  """Validates a transform's static options; returns ``num_tasks`` as int."""
  num_tasks = check_num_tasks(num_tasks, factory)
  norm_lib.check_normalizer(normalizer)
  min_norm.check_method(method)
  return num_tasks


def init_state(num_tasks: int, params) -> MGDAState:
  """The initial :class:`MGDAState`; diagnostics in the params' float dtype."""
  dtype = optax.tree.dtype(params, 'highest') if jax.tree.leaves(
      params) else jnp.float32
  return MGDAState(count=jnp.zeros((), jnp.int32),
                   info=init_info(num_tasks,
                                  jnp.promote_types(dtype, jnp.float32)))


def init_info(num_tasks: int, dtype=jnp.float32) -> min_norm.MinNormSolution:
  """Diagnostics placeholder before the first solve."""
  return min_norm.MinNormSolution(
      weights=jnp.full((num_tasks,), 1.0 / num_tasks, dtype),
      sq_norm=jnp.zeros((), dtype),
      gap=jnp.full((), jnp.inf, dtype),
      num_steps=jnp.zeros((), jnp.int32),
      converged=jnp.zeros((), bool),
      result=jnp.asarray(min_norm.SolverResult.MAX_STEPS_REACHED, jnp.int32))


def solve_weights(gram, *, normalizer, losses, max_steps, tol, method,
                  dtype) -> min_norm.MinNormSolution:
  """Normalise the Gram matrix and solve; ``info`` cast to ``dtype``."""
  n = norm_lib.gradient_normalizers(gram, normalizer, losses)
  sol = min_norm.min_norm_element(norm_lib.normalize_gram(gram, n),
                                  max_steps=max_steps, tol=tol, method=method)
  # sq_norm and gap describe the problem that was solved (normalised).
  return sol._replace(weights=sol.weights.astype(dtype),
                      sq_norm=sol.sq_norm.astype(dtype),
                      gap=sol.gap.astype(dtype))


def combine(weights: jax.Array, task_tree):
  """``sum_t weights[t] * leaf[t]`` for every leaf, accumulated in float32+."""

  def one(leaf):
    acc = jnp.promote_types(leaf.dtype, jnp.float32)
    out = jnp.tensordot(weights.astype(acc), leaf.astype(acc), axes=1)
    return out.astype(leaf.dtype)

  return jax.tree.map(one, task_tree)


def resolve_shared(shared: SharedSpec, tree, params):
  """The boolean mask (a pytree of bools shaped like params) of shared leaves."""
  if shared is None:
    return jax.tree.map(lambda _: True, tree)
  if callable(shared):
    shared = shared(params if params is not None else tree)
  try:
    return jax.tree.map(lambda m, _: bool(m), shared, tree)
  except ValueError as e:
    raise ValueError(
        'shared must be None, a pytree of bools with the structure of the '
        f'parameters, or a function returning one; got structure '
        f'{jax.tree.structure(shared)} for parameters '
        f'{jax.tree.structure(tree)}.') from e


def mgda(
    num_tasks: int,
    *,
    normalizer: str = 'none',
    shared: SharedSpec = None,
    max_steps: int | None = None,
    tol: float | None = None,
    method: str = 'pairwise',
    axis_name: str | None = None,
) -> aggregating.Aggregator:
  """MGDA: combine per-task gradients along their min-norm convex combination.

  The input ``updates`` are per-task gradients: a pytree shaped like the
  parameters whose every leaf has a leading task axis of size ``num_tasks``
  (e.g. ``jax.jacrev`` of a vector of task losses, or
  :func:`mgda_jax.per_task_grads`). This is the input shape of
  ``optax.experimental.aggregating.Aggregator``, which this returns.

  * Shared leaves (see ``shared``) enter the Gram matrix ``G = [<g_s, g_t>]``
    (:func:`mgda_jax.gram_matrix`), which is normalised
    (:func:`mgda_jax.gradient_normalizers`) and solved
    (:func:`mgda_jax.min_norm_element`); their update is ``sum_t alpha_t
    g_t`` with the **raw** gradients (the paper's code does the same).
  * Other leaves are task-specific: their update is ``sum_t g_t``, i.e. each
    task's own gradient, unscaled (other tasks' gradients w.r.t. them are
    zero), as in the paper's Algorithm 2.

  ``alpha`` is a function of the gradients only; no gradient flows through the
  solve (the output is meant to be an update, not differentiated).

  Non-finite gradients give NaN weights, hence a NaN update for the shared
  leaves, and ``state.info.result == SolverResult.NONFINITE``. To skip such
  steps, wrap the transforms that follow in ``optax.apply_if_finite``:
  ``optax.chain(mgda(K), optax.apply_if_finite(optax.sgd(lr), 10))``.
  (``apply_if_finite`` cannot wrap ``mgda`` itself: it needs its input and
  output to have the same structure, and ``mgda`` removes the task axis.)

  Args:
    num_tasks: ``K``, a static int (under ``optax.inject_hyperparams`` list it
      in ``static_args``).
    normalizer: ``'none'``, ``'l2'``, ``'loss'`` or ``'loss+'``. The loss
      normalisers need ``losses=`` (shape ``(K,)``) passed to ``update``.
    shared: which parameters are shared. ``None``: all of them. Otherwise a
      pytree of bools with the structure of the parameters (as for
      ``optax.masked``), or a function of the parameters returning one (it is
      called with ``params`` when ``update`` gets them, else with the
      per-task gradients). Under ``optax.inject_hyperparams`` a function
      must be listed in ``static_args``.
    max_steps: solver iteration cap (``None``: the dtype's default).
    tol: solver relative tolerance (``None``: the dtype's default).
    method: Frank-Wolfe variant, see :func:`mgda_jax.min_norm_element`.
    axis_name: data parallelism inside ``jax.shard_map``: per-device
      gradients (of each device's share of the global mean losses) are
      summed before the Gram matrix, so every device solves the global
      problem. Typed shard_map (the default) needs no ``axis_name``:
      gradients w.r.t. replicated parameters arrive summed. Required with
      ``check_vma=False`` or ``pmap``. See :func:`mgda_jax.mgda_ub`.

  Returns:
    An ``optax.experimental.aggregating.Aggregator`` (a
    ``GradientTransformationExtraArgs``) with state :class:`MGDAState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import mgda_jax
    >>> params = {'shared': jnp.array([1.0, 1.0]), 'head': jnp.zeros(2)}
    >>> def task_losses(p):  # two tasks
    ...   return jnp.stack([jnp.sum((p['shared'] - 2.0) ** 2) + p['head'][0],
    ...                     jnp.sum(p['shared'] ** 2) + p['head'][1] ** 2])
    >>> tx = optax.chain(
    ...     mgda_jax.mgda(2, shared={'shared': True, 'head': False}),
    ...     optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> grads = jax.jacrev(task_losses)(params)  # leaves (2, ...)
    >>> updates, state = tx.update(grads, state, params)
    >>> print(state[0].info.weights)  # opposite gradients (-2,-2), (2,2)
    [0.5 0.5]
    >>> print(updates['shared'], updates['head'])  # -0.1 * update
    [-0. -0.] [-0.1 -0. ]

  References:
    Sener & Koltun, *Multi-Task Learning as Multi-Objective Optimization*,
    NeurIPS 2018, https://arxiv.org/abs/1810.04650 (Algorithm 2).

    Desideri, *Multiple-gradient descent algorithm (MGDA) for multiobjective
    optimization*, Comptes Rendus Mathematique 350, 2012.
  """
  num_tasks = check_options('mgda', num_tasks, normalizer, method)

  def init_fn(params):
    return init_state(num_tasks, params)

  def update_fn(updates, state, params=None, *, losses=None, **extra_args):
    del extra_args
    k = gram_lib.num_tasks(updates, 'mgda updates')
    if k != num_tasks:
      raise ValueError(f'mgda was built for num_tasks={num_tasks} but the '
                       f'per-task gradients have a leading axis of {k}.')
    mask = resolve_shared(shared, updates, params)
    shared_grads = [g for g, m in zip(jax.tree.leaves(updates),
                                      jax.tree.leaves(mask)) if m]
    if not shared_grads:
      raise ValueError('mgda: no parameter is marked shared, so there is '
                       'nothing to solve for; check `shared`.')
    # Data parallelism: the global per-task gradients are the sums of the
    # devices' ones (typed shard_map has summed those of replicated params
    # already); their Gram matrix needs them whole, not a sum of local Grams.
    legacy = gram_lib.untyped_axis(axis_name)
    shared_grads = gram_lib.sum_over_devices(shared_grads, axis_name,
                                             legacy=legacy)
    if losses is not None:
      losses = gram_lib.sum_over_devices(losses, axis_name, legacy=legacy)
    gram = gram_lib.gram_matrix(shared_grads)
    info = solve_weights(gram, normalizer=normalizer, losses=losses,
                         max_steps=max_steps, tol=tol, method=method,
                         dtype=state.info.weights.dtype)
    weights = jax.lax.stop_gradient(info.weights)
    new_updates = jax.tree.map(
        lambda g, m: combine(weights, g) if m else jnp.sum(g, axis=0),
        updates, mask)
    new_updates = gram_lib.sum_over_devices(new_updates, axis_name,
                                            legacy=legacy)
    return new_updates, MGDAState(count=optax.safe_increment(state.count),
                                  info=info)

  return aggregating.Aggregator(init_fn, update_fn)


def mgda_weights(task_grads, *, normalizer: str = 'none', losses=None,
                 max_steps=None, tol=None,
                 method: str = 'pairwise') -> min_norm.MinNormSolution:
  """The MGDA solve alone: min-norm weights for per-task gradients.

  Equivalent to ``min_norm_element(normalize_gram(gram_matrix(task_grads),
  n))`` with ``n = gradient_normalizers(...)``.

  Args:
    task_grads: pytree, leaves with a leading task axis ``K``.
    normalizer: see :func:`mgda_jax.gradient_normalizers`.
    losses: the ``K`` losses, for the loss normalisers.
    max_steps: solver iteration cap.
    tol: solver relative tolerance.
    method: Frank-Wolfe variant.

  Returns:
    A :class:`MinNormSolution`.
  """
  gram = gram_lib.gram_matrix(task_grads)
  return solve_weights(gram, normalizer=normalizer, losses=losses,
                       max_steps=max_steps, tol=tol, method=method,
                       dtype=gram.dtype)

