"""The one engine under every method: inputs in, one update out.

Every method in mgda_jax is a *rule* plus its own state. The engine does the
rest, the same way for all of them:

1. **Inputs.** Either a :class:`mgda_jax.RepresentationGrads` (per-task
   gradients at the shared representation ``Z``, MGDA-UB's input) or
   per-task parameter gradients (a pytree shaped like the parameters whose
   leaves have a leading task axis ``K``, MGDA's input). The task count, the
   ``losses=`` / ``kpis=`` vectors and ``shared`` are checked with clear
   errors.
2. **Data parallelism** (:mod:`mgda_jax._src.core.devices`): under
   ``jax.jit`` with a sharded batch nothing is needed; inside a typed
   ``jax.shard_map`` per-device quantities (Gram blocks, losses) are summed
   over the axes they vary over; with ``axis_name`` in an untyped
   ``shard_map`` or ``pmap`` every per-device quantity (parameter
   gradients, Gram blocks, losses, the final update) is summed over it.
   Every device then holds the global problem and the same weights.
3. **The Gram matrix** ``G = [<g_s, g_t>]`` (only for rules that read it): of
   the representation gradients, or of the shared leaves.
4. **The rule**: ``(inputs, inner) -> (w, inner', info)``; ``w`` are the
   ``K`` task weights, stopped (no gradient flows through a rule).
5. **The update.** A *gradient* method gives the shared part ``sum_t w_t
   g_t`` (at ``Z``: the cotangent ``sum_t w_t dL_t/dZ`` pulled back through
   the encoder once) and each task-specific parameter its own task's
   gradient, unscaled (Sener & Koltun 2018, Algorithm 2; LibMTL's
   ``rep_grad``). A *loss* weighting gives the gradient of ``sum_t w_t
   L_t``, heads weighted too. GradDrop replaces the weighted sum by its
   per-element rule.
6. **NaN safety.** A step whose inputs (those the rule reads: the Gram
   matrix, the losses, the KPIs) or whose update are not finite never
   commits the method's state: ``count`` and ``inner`` keep their values,
   ``info.result`` is ``SolverResult.NONFINITE``, and the update is NaN so
   that ``optax.apply_if_finite`` after the method skips the step.

Every method's state is a :class:`MethodState` with ``.weights`` (the last
``w``; NaN where a method has none) and ``.info`` (a
:class:`mgda_jax.SolveInfo`).
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mgda_jax._src.core import checks
from mgda_jax._src.core import devices
from mgda_jax._src.core import gram as gram_lib
from mgda_jax._src.core import inputs
from mgda_jax._src.core import results

GRADIENT = 'gradient'
LOSS = 'loss'


class MethodState(NamedTuple):
  """The state of every method.

  Attributes:
    count: updates committed so far (steps with finite inputs), int32.
    weights: the ``K`` task weights of the last update (``d = sum_t w_t
      g_t``); ``1/K`` before the first, NaN for a method without weights
      (GradDrop).
    info: the last update's :class:`mgda_jax.SolveInfo` (steps, certificate,
      result code), also on a non-finite step.
    inner: the method's own state (a NamedTuple, or ``()``): learned loss
      weights, a PRNG key, moving averages. Committed only on finite steps.
  """

  count: jax.Array
  weights: jax.Array
  info: results.SolveInfo
  inner: Any


class RuleInput(NamedTuple):
  """What a rule reads. Global quantities (summed over devices), stopped.

  Attributes:
    gram: the ``(K, K)`` Gram matrix (solve dtype), or None if the rule
      does not read it.
    losses: the ``(K,)`` losses (float32 or wider), or None.
    kpis: the ``(K,)`` KPIs, or None.
    count: ``MethodState.count``.
  """

  gram: Any
  losses: Any
  kpis: Any
  count: jax.Array


# rule(RuleInput, inner) -> (weights (K,), new_inner, SolveInfo)
Rule = Callable[[RuleInput, Any], tuple[jax.Array, Any, results.SolveInfo]]
# elementwise(task_leaves, inner, mode, is_rep) -> combined leaves (no task
# axis); for GradDrop.
Elementwise = Callable[[list, Any, devices.Mode, bool], list]

REPRESENTATION = 'representation'
PER_TASK = 'per_task'


def input_kind(updates, factory: str, accepted) -> str:
  """``'representation'`` or ``'per_task'``, or a clear error."""
  if isinstance(updates, inputs.RepresentationGrads):
    kind = REPRESENTATION
  else:
    kind = PER_TASK
  if kind not in accepted:
    if kind == PER_TASK:
      raise ValueError(
          f'{factory} expects a RepresentationGrads (from '
          'mgda_jax.representation_grads) as its input updates; got '
          f'{type(updates).__name__}. For per-task gradients w.r.t. the '
          'parameters use mgda_jax.mgda.')
    raise ValueError(f'{factory} does not accept a RepresentationGrads.')
  return kind


def _cast_like(new, old):
  return jax.tree.map(lambda n, o: jnp.asarray(n).astype(o.dtype), new, old)


def _select(pred, on_true, on_false):
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def combine(weights: jax.Array, task_tree):
  """``sum_t weights[t] * leaf[t]`` for every leaf, accumulated in float32+."""

  def one(leaf):
    acc = jnp.promote_types(leaf.dtype, jnp.float32)
    out = jnp.tensordot(weights.astype(acc), leaf.astype(acc), axes=1)
    return out.astype(leaf.dtype)

  return jax.tree.map(one, task_tree)


def method(
    factory: str,
    num_tasks: int,
    rule: Rule,
    init_inner: Callable[[Any], Any],
    *,
    family: str,
    needs_gram: bool,
    needs_losses: bool = False,
    needs_kpis: bool = False,
    shared: checks.SharedSpec = None,
    axis_name=None,
    elementwise: Elementwise | None = None,
    accepted=(REPRESENTATION, PER_TASK),
) -> optax.GradientTransformationExtraArgs:
  """A method as an optax ``GradientTransformationExtraArgs``.

  Args:
    factory: the public name, for error messages.
    num_tasks: ``K`` (checked static by the caller).
    rule: the weight rule, see :data:`Rule`.
    init_inner: ``dtype -> inner``, the method's initial own state.
    family: ``'gradient'`` (shared part weighted, heads unscaled) or
      ``'loss'`` (the gradient of ``sum_t w_t L_t``).
    needs_gram: whether the rule reads the Gram matrix.
    needs_losses: whether ``update`` requires ``losses=``.
    needs_kpis: whether ``update`` requires ``kpis=``.
    shared: which per-task-gradient leaves are shared (gradient family).
    axis_name: the data-parallel axis for untyped ``shard_map`` / ``pmap``.
    elementwise: GradDrop's per-element combination, replacing ``sum_t w_t
      g_t`` on the shared part.
    accepted: the input kinds accepted.

  Returns:
    The transform, with state :class:`MethodState`.
  """
  if family not in (GRADIENT, LOSS):
    raise ValueError(f'unknown family {family!r}')

  def init_fn(params):
    dtype = checks.state_dtype(params)
    return MethodState(
        count=jnp.zeros((), jnp.int32),
        weights=jnp.full((num_tasks,), jnp.nan if elementwise else
                         1.0 / num_tasks, dtype),
        info=results.initial_info(dtype),
        inner=init_inner(dtype))

  def update_fn(updates, state, params=None, *, losses=None, kpis=None,
                **extra_args):
    del extra_args
    if not isinstance(state, MethodState):
      raise ValueError(f'{factory}: the state is a {type(state).__name__}, not '
                       f"the MethodState that {factory}.init made.")
    kind = input_kind(updates, factory, accepted)
    rep = kind == REPRESENTATION
    k = gram_lib.num_tasks(updates.rep_grads if rep else updates,
                           f'{factory} rep_grads' if rep else
                           f'{factory} per-task gradients')
    if k != num_tasks:
      raise ValueError(f'{factory} was built for num_tasks={num_tasks} but '
                       f'the input has {k} tasks (leading axis {k}).')
    mode = devices.Mode(axis_name)
    losses = checks.check_vector(factory, 'losses', losses, k, needs_losses,
                                 'task losses')
    kpis = checks.check_vector(factory, 'kpis', kpis, k, needs_kpis,
                               'task KPIs in [0, 1] (e.g. batch accuracies)')
    if not rep and mode.legacy:
      # Untyped data parallelism: the global per-task gradients are the sums
      # of the devices' ones (a Gram matrix needs them whole).
      updates = mode.global_sum(updates)
    mask = None
    if not rep and family == GRADIENT:
      mask = checks.resolve_shared(shared, updates, params, factory)
      if not any(jax.tree.leaves(mask)):
        raise ValueError(f'{factory}: no parameter is marked shared, so there '
                         'is nothing to weigh; check `shared`.')
    if losses is not None:
      losses = jax.lax.stop_gradient(mode.global_sum(losses))
      losses = losses.astype(jnp.promote_types(losses.dtype, jnp.float32))
    if kpis is not None:
      kpis = jax.lax.stop_gradient(mode.global_sum(kpis)).astype(
          jnp.promote_types(kpis.dtype, jnp.float32))

    gram = None
    if needs_gram:
      if rep:
        gram = mode.global_sum(gram_lib.gram_matrix(updates.rep_grads))
      elif mask is not None:
        gram = gram_lib.gram_matrix([g for g, m in zip(
            jax.tree.leaves(updates), jax.tree.leaves(mask)) if m])
      else:
        gram = gram_lib.gram_matrix(updates)
      gram = jax.lax.stop_gradient(gram)

    read = [x for x, used in ((gram, needs_gram), (losses, needs_losses),
                              (kpis, needs_kpis)) if used and x is not None]
    inputs_finite = devices.tree_all_finite(read)

    weights, inner, info = rule(RuleInput(gram, losses, kpis, state.count),
                                state.inner)
    weights = jax.lax.stop_gradient(jnp.asarray(weights))
    inner = _cast_like(inner, state.inner)

    if elementwise is not None:
      if rep:
        leaves, treedef = jax.tree.flatten(updates.rep_grads)
        cot = treedef.unflatten(elementwise(leaves, state.inner, mode, True))
        new_updates = jax.tree.map(jnp.add, updates.pullback(cot),
                                   updates.head_grads)
      else:
        leaves, treedef = jax.tree.flatten(updates)
        mleaves = jax.tree.leaves(mask)
        shared_out = iter(elementwise(
            [g for g, m in zip(leaves, mleaves) if m], state.inner, mode,
            False))
        new_updates = treedef.unflatten([
            next(shared_out) if m else jnp.sum(g, axis=0)
            for g, m in zip(leaves, mleaves)])
    elif family == GRADIENT:
      if rep:
        cot = combine(weights, updates.rep_grads)
        new_updates = jax.tree.map(jnp.add, updates.pullback(cot),
                                   updates.head_grads)
      else:
        new_updates = jax.tree.map(
            lambda g, m: combine(weights, g) if m else jnp.sum(g, axis=0),
            updates, mask)
    else:
      new_updates = (updates.weighted_grads(weights) if rep
                     else combine(weights, updates))
    if rep and mode.legacy:
      new_updates = mode.global_sum(new_updates)

    # Non-finite inputs: the update is NaN (so apply_if_finite skips it);
    # non-finite inputs or update: nothing of the method's state commits.
    new_updates = jax.tree.map(
        lambda u: jnp.where(inputs_finite, u, jnp.asarray(jnp.nan, u.dtype))
        if jnp.issubdtype(u.dtype, jnp.inexact) else u, new_updates)
    ok = inputs_finite & devices.tree_all_finite(new_updates)
    dtype = state.weights.dtype
    info = results.SolveInfo(
        num_steps=jnp.asarray(info.num_steps, jnp.int32),
        error=jnp.where(ok, info.error, jnp.nan).astype(dtype),
        converged=ok & info.converged,
        result=jnp.where(ok, info.result,
                         results.SolverResult.NONFINITE).astype(jnp.int32))
    new_state = MethodState(
        count=jnp.where(ok, optax.safe_increment(state.count), state.count),
        weights=weights.astype(dtype),
        info=info,
        inner=_select(ok, inner, state.inner))
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def gram_method(factory: str, num_tasks: int, weight_fn, init_inner, *,
                shared=None, axis_name=None,
                needs_losses: bool = False
                ) -> optax.GradientTransformationExtraArgs:
  """A gradient method from a Gram-matrix rule.

  ``weight_fn(gram, inner, losses)`` returns ``(weights, new_inner)`` for a
  closed form (its info is converged, 0 steps) or ``(weights, new_inner,
  info)`` for an inner solve.
  """

  def rule(inp: RuleInput, inner):
    out = weight_fn(inp.gram, inner, inp.losses)
    if len(out) == 2:
      weights, new_inner = out
      info = results.closed_form_info(jnp.all(jnp.isfinite(inp.gram)),
                                      inp.gram.dtype)
    else:
      weights, new_inner, info = out
    return weights, new_inner, info

  return method(factory, num_tasks, rule, init_inner, family=GRADIENT,
                needs_gram=True, needs_losses=needs_losses, shared=shared,
                axis_name=axis_name)
