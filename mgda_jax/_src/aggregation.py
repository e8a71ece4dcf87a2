"""The engine of the gradient methods: per-task gradients in, one direction out.

Every gradient method in mgda_jax (MGDA aside, which predates this module)
picks task weights ``w`` from the ``(K, K)`` Gram matrix ``G = [<g_s, g_t>]``
of the task gradients and returns ``d = sum_t w_t g_t``. PCGrad, GradVac,
CAGrad, IMTL-G, Nash-MTL, Aligned-MTL, UPGrad and DualProj all have this form:
their projections and solves act in the span of the ``g_t``, so the Gram
matrix is all they need, and the ``K``-vector ``w`` carries their answer back.

That makes one transform serve both kinds of input, exactly as
:func:`mgda_jax.mgda` and :func:`mgda_jax.mgda_ub` do:

* a :class:`mgda_jax.RepresentationGrads`: ``G`` is built from the per-task
  gradients w.r.t. the shared representation ``Z`` (the MGDA-UB input), the
  cotangent ``sum_t w_t dL_t/dZ`` is pulled back through the encoder once,
  and each task head gets its own gradient, unscaled (Sener & Koltun 2018,
  Algorithm 2; LibMTL's ``rep_grad`` mode does the same);
* per-task parameter gradients (leaves with a leading task axis): ``G`` is
  built from the ``shared`` leaves, which get ``sum_t w_t g_t``; every other
  leaf gets ``sum_t g_t``, its task's own gradient.

The weights are computed from the stopped Gram matrix and are constants of
the update (no gradient flows through a method's inner solve).

Data parallelism works as for :func:`mgda_jax.mgda_ub`: under ``jax.jit``
with a sharded batch nothing is needed, and inside a typed ``jax.shard_map``
the per-device Gram blocks are summed, so every device gets the same
weights. (``shard_map(..., check_vma=False)`` and ``pmap`` are supported by
``mgda``/``mgda_ub`` only, through their ``axis_name``.) Parameters are
assumed replicated over the mesh.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mgda_jax._src import gram as gram_lib
from mgda_jax._src import mgda as mgda_lib
from mgda_jax._src import mgda_ub as ub_lib
from mgda_jax._src.loss_weighting import check_k


class GradientMethodState(NamedTuple):
  """State of a Gram-matrix gradient method.

  Attributes:
    count: number of updates so far, int32.
    weights: the ``K`` task weights of the last update (``d = sum_t w_t
      g_t``); before the first update they are ``1/K``.
    inner: the method's own state and diagnostics (a NamedTuple, or ``()``),
      e.g. a PRNG key, running targets, or an inner solver's result.
  """

  count: jax.Array
  weights: jax.Array
  inner: Any


# weight_fn(gram, inner, losses) -> (weights, new_inner); gram is float32+,
# stopped; inner is the method's state.
WeightFn = Callable[[jax.Array, Any, Any], tuple[jax.Array, Any]]


def task_gram(updates, shared, params, factory: str):
  """``(gram, mask)``: the Gram matrix of the input and the shared-leaf mask.

  ``mask`` is ``None`` for a :class:`RepresentationGrads`. The input's task
  axis is checked by :func:`check_k` first.
  """
  if isinstance(updates, ub_lib.RepresentationGrads):
    return gram_lib.gram_matrix(updates.rep_grads), None
  mask = mgda_lib.resolve_shared(shared, updates, params)
  shared_grads = [g for g, m in zip(jax.tree.leaves(updates),
                                    jax.tree.leaves(mask)) if m]
  if not shared_grads:
    raise ValueError(f'{factory}: no parameter is marked shared; check '
                     '`shared`.')
  return gram_lib.gram_matrix(shared_grads), mask


def apply_weights(updates, weights, mask):
  """``sum_t w_t g_t`` on the shared part; each task's own gradient elsewhere."""
  if isinstance(updates, ub_lib.RepresentationGrads):
    cotangent = mgda_lib.combine(weights, updates.rep_grads)
    return jax.tree.map(jnp.add, updates.pullback(cotangent),
                        updates.head_grads)
  return jax.tree.map(
      lambda g, m: mgda_lib.combine(weights, g) if m else jnp.sum(g, axis=0),
      updates, mask)


def gram_method(
    factory: str,
    num_tasks: int,
    weight_fn: WeightFn,
    init_inner: Callable[[Any], Any],
    *,
    shared=None,
) -> optax.GradientTransformationExtraArgs:
  """A ``GradientTransformationExtraArgs`` from a Gram-matrix weight rule.

  Args:
    factory: the public name, for error messages.
    num_tasks: ``K`` (already checked static).
    weight_fn: ``(gram, inner, losses) -> (weights, new_inner)``; the new
      inner state is cast to the dtypes of the initial one.
    init_inner: ``dtype -> inner``, the method's initial state.
    shared: which per-task-gradient leaves are shared (see
      :func:`mgda_jax.mgda`); ignored for a :class:`RepresentationGrads`.

  Returns:
    The transform, with state :class:`GradientMethodState`.
  """

  def init_fn(params):
    dtype = jnp.promote_types(
        optax.tree.dtype(params, 'highest') if jax.tree.leaves(params)
        else jnp.float32, jnp.float32)
    return GradientMethodState(jnp.zeros((), jnp.int32),
                               jnp.full((num_tasks,), 1.0 / num_tasks, dtype),
                               init_inner(dtype))

  def update_fn(updates, state, params=None, *, losses=None, **extra_args):
    del extra_args
    check_k(updates, num_tasks, factory)
    gram, mask = task_gram(updates, shared, params, factory)
    # Inside a typed jax.shard_map, per-device representation gradients give
    # per-device Gram blocks: sum them, so that every device gets the global
    # weights (gradients w.r.t. replicated parameters are summed already).
    gram = gram_lib.sum_over_devices(gram, None, legacy=False)
    gram = jax.lax.stop_gradient(gram)
    if losses is not None:
      losses = jax.lax.stop_gradient(jnp.asarray(losses))
    weights, inner = weight_fn(gram, state.inner, losses)
    weights = jax.lax.stop_gradient(weights)
    # The state keeps its dtypes whatever the Gram matrix's (e.g. f32 state,
    # f64 gradients under x64), so that a jitted loop's carry is stable.
    inner = jax.tree.map(lambda new, old: jnp.asarray(new).astype(old.dtype),
                         inner, state.inner)
    new_updates = apply_weights(updates, weights, mask)
    return new_updates, GradientMethodState(
        optax.safe_increment(state.count),
        weights.astype(state.weights.dtype), inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def as_key(key) -> jax.Array:
  """A raw ``uint32[2]`` PRNG key from an int seed or a (typed or raw) key.

  Integer scalars (also traced ones, as ``optax.inject_hyperparams`` makes
  them) are seeds.
  """
  if isinstance(key, int):
    return jax.random.PRNGKey(key)
  key = key if isinstance(key, jax.Array) else jnp.asarray(key)
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key)
  if key.ndim == 0 and jnp.issubdtype(key.dtype, jnp.integer):
    return jax.random.PRNGKey(key)
  if key.shape != (2,) or key.dtype != jnp.uint32:
    raise ValueError('key must be an int seed or a PRNG key (jax.random.key '
                     f'or jax.random.PRNGKey); got {key.dtype}{key.shape}.')
  return key
