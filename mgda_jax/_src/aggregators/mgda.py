"""MGDA and MGDA-UB (Sener & Koltun 2018) on the one engine.

For per-task gradients ``g_t`` of the shared parameters, MGDA (Algorithm 2)
updates them along the minimum-norm element of the convex hull of the
``g_t``,

.. math::

  d = \\sum_t \\alpha_t g_t, \\qquad
  \\alpha = \\operatorname*{argmin}_{\\alpha \\in \\Delta^K}
  \\Big\\| \\sum_t \\alpha_t g_t \\Big\\|^2,

a direction along which no task's loss increases to first order (``<d, g_t>
>= ||d||^2`` for every ``t``). Task-specific parameters are updated with their
own task's gradient, unscaled.

**MGDA-UB** solves the same problem on the gradients w.r.t. the shared
representation ``Z`` (the full ``[B, ...]`` tensor per task), an upper bound
of the MGDA objective by the chain rule (their Eq. 5-6), and pulls the
combined cotangent ``sum_t alpha_t nabla_Z L_t`` back through the encoder
once. ``mgda`` accepts that input too (it is the same engine); ``mgda_ub``
accepts only it, so a training step cannot silently run full MGDA.
"""

from typing import NamedTuple

import jax.numpy as jnp
import optax

from mgda_jax._src import engine
from mgda_jax._src.aggregators import normalizers as norm_lib
from mgda_jax._src.core import checks
from mgda_jax._src.core import gram as gram_lib
from mgda_jax._src.core import results
from mgda_jax._src.solvers import min_norm

# The transforms' default tolerance: numeric (so inject_hyperparams makes it
# live), the float32 target; pass tol=1e-9 for a tighter float64 solve.
DEFAULT_TOL = 2e-5


class MGDAInner(NamedTuple):
  """Inner state of :func:`mgda`/:func:`mgda_ub`: none beyond the engine's."""


def solve_weights(gram, *, normalizer, losses, max_steps, tol, method
                  ) -> min_norm.MinNormSolution:
  """Normalise the Gram matrix and solve (see :func:`mgda_weights`)."""
  n = norm_lib.gradient_normalizers(gram, normalizer, losses)
  return min_norm.min_norm_element(norm_lib.normalize_gram(gram, n),
                                   max_steps=max_steps, tol=tol,
                                   method=method)


def _build(factory, num_tasks, normalizer, shared, max_steps, tol, method,
           axis_name, accepted):
  num_tasks = checks.check_num_tasks(num_tasks, factory)
  norm_lib.check_normalizer(normalizer)
  min_norm.check_method(method)
  if max_steps is None:
    max_steps = min_norm.default_max_steps(num_tasks, jnp.float32)
  checks.check_scalar(factory, 'tol', tol, low=0.0)
  checks.check_scalar(factory, 'max_steps', max_steps, low=1, integer=True)

  def rule(inp: engine.RuleInput, inner):
    sol = solve_weights(inp.gram, normalizer=normalizer, losses=inp.losses,
                        max_steps=max_steps, tol=tol, method=method)
    info = results.SolveInfo(sol.num_steps, sol.gap, sol.converged,
                             sol.result)
    return sol.weights, inner, info

  return engine.method(
      factory, num_tasks, rule, lambda dtype: MGDAInner(),
      family=engine.GRADIENT, needs_gram=True,
      needs_losses=norm_lib.needs_losses(normalizer), shared=shared,
      axis_name=axis_name, accepted=accepted)


def mgda(
    num_tasks: int,
    *,
    normalizer: str = 'none',
    shared: checks.SharedSpec = None,
    max_steps: int | None = None,
    tol: float = DEFAULT_TOL,
    method: str = 'pairwise',
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """MGDA: combine task gradients along their min-norm convex combination.

  The input ``updates`` are per-task gradients: a pytree shaped like the
  parameters whose every leaf has a leading task axis of size ``num_tasks``
  (e.g. ``jax.jacrev`` of a vector of task losses, or
  :func:`mgda_jax.per_task_grads`), the input shape of
  ``optax.experimental.aggregating.Aggregator``; or a
  :class:`mgda_jax.RepresentationGrads` (then it is MGDA-UB).

  * Shared leaves (see ``shared``) enter the Gram matrix ``G = [<g_s, g_t>]``
    (:func:`mgda_jax.gram_matrix`), which is normalised
    (:func:`mgda_jax.gradient_normalizers`) and solved
    (:func:`mgda_jax.min_norm_element`); their update is ``sum_t alpha_t
    g_t`` with the **raw** gradients (the paper's code does the same).
  * Other leaves are task-specific: their update is ``sum_t g_t``, i.e. each
    task's own gradient, unscaled, as in the paper's Algorithm 2.

  Non-finite gradients (or losses, with a loss normaliser) give a NaN
  update and ``state.info.result == SolverResult.NONFINITE``, and commit
  nothing; to skip such steps, wrap the transforms that follow:
  ``optax.chain(mgda(K), optax.apply_if_finite(optax.sgd(lr), 10))``.

  Args:
    num_tasks: ``K``, a static int (under ``optax.inject_hyperparams`` list it
      in ``static_args``).
    normalizer: ``'none'``, ``'l2'``, ``'loss'`` or ``'loss+'``. The loss
      normalisers need ``losses=`` (shape ``(K,)``) passed to ``update``.
    shared: which parameters are shared. ``None``: all of them. Otherwise a
      pytree of bools with the structure of the parameters or a prefix of it
      (as for ``optax.masked``), or a function of the parameters returning
      one. Under ``optax.inject_hyperparams`` a function must be listed in
      ``static_args``.
    max_steps: solver iteration cap (``None``: ``1000 + 100 K``).
    tol: solver relative tolerance on the duality gap (live under
      ``inject_hyperparams``; ``1e-9`` suits float64).
    method: Frank-Wolfe variant, see :func:`mgda_jax.min_norm_element`.
    axis_name: the data-parallel axis, needed only in an untyped
      ``jax.shard_map`` (``check_vma=False``) or ``jax.pmap``. See the README's
      "Several devices".

  Returns:
    A ``GradientTransformationExtraArgs`` with state
    :class:`mgda_jax.MethodState` (``weights``: alpha; ``info``: the solve).

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
    >>> print(state[0].weights)  # opposite gradients (-2,-2), (2,2)
    [0.5 0.5]
    >>> print(updates['shared'], updates['head'])  # -0.1 * update
    [-0. -0.] [-0.1 -0. ]

  References:
    Sener & Koltun, *Multi-Task Learning as Multi-Objective Optimization*,
    NeurIPS 2018, https://arxiv.org/abs/1810.04650 (Algorithm 2).

    Desideri, *Multiple-gradient descent algorithm (MGDA) for multiobjective
    optimization*, Comptes Rendus Mathematique 350, 2012.
  """
  return _build('mgda', num_tasks, normalizer, shared, max_steps, tol, method,
                axis_name, (engine.REPRESENTATION, engine.PER_TASK))


def mgda_ub(
    num_tasks: int,
    *,
    normalizer: str = 'none',
    max_steps: int | None = None,
    tol: float = DEFAULT_TOL,
    method: str = 'pairwise',
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """MGDA-UB: the min-norm solve on representation gradients, one pullback.

  The input ``updates`` is a :class:`mgda_jax.RepresentationGrads` (from
  :func:`mgda_jax.representation_grads`). The update:

  1. ``G = gram_matrix(rep_grads)`` over the whole ``[B, ...]`` tensor of
     each task, normalised as asked;
  2. ``alpha = min_norm_element(G).weights`` (stopped gradient);
  3. the cotangent ``sum_t alpha_t nabla_Z L_t`` (raw gradients) is pulled
     back through the encoder once;
  4. plus ``head_grads``: each task head's own gradient, unscaled.

  Args:
    num_tasks: ``K``, a static int.
    normalizer: ``'none'`` (the paper's choice for MultiMNIST), ``'l2'``,
      ``'loss'`` or ``'loss+'``; the loss normalisers need ``losses=``.
    max_steps: solver iteration cap (``None``: ``1000 + 100 K``).
    tol: solver relative tolerance (live under ``inject_hyperparams``).
    method: Frank-Wolfe variant, see :func:`mgda_jax.min_norm_element`.
    axis_name: the data-parallel axis for an untyped ``jax.shard_map`` or
      ``jax.pmap`` (see the README's "Several devices").

  Returns:
    A ``GradientTransformationExtraArgs`` with state
    :class:`mgda_jax.MethodState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import mgda_jax
    >>> params = {'enc': jnp.ones((3, 4)), 'heads': jnp.ones((2, 4))}
    >>> x = jnp.arange(6.0).reshape(2, 3) / 6
    >>> encode = lambda p, x: jnp.tanh(x @ p['enc'])            # Z: (B, 4)
    >>> heads = lambda p, z, x: jnp.mean((z @ p['heads'].T - 1) ** 2, 0)
    >>> tx = optax.chain(mgda_jax.mgda_ub(2), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> losses, grads = mgda_jax.representation_grads(encode, heads, params, x)
    >>> updates, state = tx.update(grads, state, params, losses=losses)
    >>> jax.tree.map(jnp.shape, updates)
    {'enc': (3, 4), 'heads': (2, 4)}

  References:
    Sener & Koltun, *Multi-Task Learning as Multi-Objective Optimization*,
    NeurIPS 2018, https://arxiv.org/abs/1810.04650 (Section 3.3, Algorithm 2).
  """
  return _build('mgda_ub', num_tasks, normalizer, None, max_steps, tol,
                method, axis_name, (engine.REPRESENTATION,))


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
    tol: solver relative tolerance (``None``: the dtype's default).
    method: Frank-Wolfe variant.

  Returns:
    A :class:`mgda_jax.MinNormSolution`.
  """
  gram = gram_lib.gram_matrix(task_grads)
  return solve_weights(gram, normalizer=normalizer, losses=losses,
                       max_steps=max_steps, tol=tol, method=method)
