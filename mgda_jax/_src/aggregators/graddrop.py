"""GradDrop: gradient sign dropout (Chen et al. 2020).

At every element of the gradient, GradDrop keeps the task gradients of one
sign only. With ``nabla_t`` the per-task gradients, the positive sign purity

.. math::

  P = \\tfrac12 \\Big(1 + \\frac{\\sum_t \\nabla_t}{\\sum_t |\\nabla_t|}\\Big)
  \\in [0, 1]

is computed elementwise, one uniform ``U`` is drawn per element, and task
``t`` is kept where ``P > U`` and ``nabla_t > 0``, or ``P < U`` and
``nabla_t < 0``. The update is ``sum_t M_t nabla_t`` with the masks ``M_t``
(optionally leaky: ``M_t <- l + (1 - l) M_t``). So each element receives
only positive gradients with probability ``P`` and only negative ones
otherwise.

GradDrop acts on elements, not on the Gram matrix. On a
:class:`mgda_jax.RepresentationGrads` it acts on the per-task gradients at
the shared representation ``Z`` (the paper applies it at an activation
layer), and the masked cotangent is pulled back through the encoder once;
task heads get their own gradients. On per-task parameter gradients it acts
on every shared leaf.

**A documented difference from the paper's Algorithm 1**: there, the
gradients at the activation ``A`` are multiplied by ``sign(A)`` and summed
over the batch before ``P`` is computed, so that ``P`` and ``U`` are one per
feature, shared by the examples of the batch. Here ``P`` and ``U`` are drawn
for every element of the ``[B, ...]`` tensor (a
:class:`mgda_jax.RepresentationGrads` does not carry ``Z``, so ``sign(A)`` is
not available); TorchJD's GradDrop aggregator does the same.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mgda_jax._src import engine
from mgda_jax._src.core import checks
from mgda_jax._src.core import results


def graddrop_combine(task_grads: jax.Array, key: jax.Array,
                     leak=0.0, uniform=None) -> jax.Array:
  """GradDrop's ``sum_t M_t nabla_t`` for one ``(K, ...)`` array.

  ``uniform`` (the draws ``U``, shaped like one task's gradient) may be
  given instead of being drawn from ``key``.
  """
  acc = jnp.promote_types(task_grads.dtype, jnp.float32)
  g = task_grads.astype(acc)
  total = jnp.sum(g, axis=0)
  mass = jnp.sum(jnp.abs(g), axis=0)
  purity = 0.5 * (1.0 + jnp.where(mass > 0, total / jnp.where(mass > 0, mass,
                                                                1.0), 0.0))
  u = (jax.random.uniform(key, purity.shape, acc) if uniform is None
       else uniform.astype(acc))
  keep = ((purity > u) & (g > 0)) | ((purity < u) & (g < 0))
  leak = jnp.asarray(leak, acc)
  if leak.ndim == 1:  # one per task
    leak = jnp.reshape(leak, leak.shape + (1,) * (g.ndim - 1))
  mask = leak + (1.0 - leak) * keep.astype(acc)
  out = jnp.sum(mask * g, axis=0)
  # A dropped NaN/inf must not vanish (XLA turns mask * g into a select):
  # where any task's gradient is not finite, so is the output.
  out = jnp.where(jnp.isfinite(total), out, total)
  return out.astype(task_grads.dtype)


def _draws(key, leaf, mode, is_rep):
  """``U`` for one leaf: the one-device draw, sliced to this device's shard.

  At the representation, inside ``shard_map``/``pmap``, each device holds
  the examples of its batch shard (axis 1 of ``[K, B, ...]``); drawing over
  the global batch and slicing makes the result equal the one-device step.
  """
  shape = leaf.shape[1:]
  acc = jnp.promote_types(leaf.dtype, jnp.float32)
  shard = mode.shard_of(leaf) if is_rep and leaf.ndim >= 2 else None
  if shard is None:
    return jax.random.uniform(key, shape, acc)
  index, count = shard
  local = shape[0]
  full = jax.random.uniform(key, (local * count,) + shape[1:], acc)
  return jax.lax.dynamic_slice_in_dim(full, index * local, local, axis=0)


class GradDropInner(NamedTuple):
  """Inner state of :func:`graddrop`: the PRNG key for the next draws."""

  key: jax.Array


def graddrop(num_tasks: int, *, key=0, leak=0.0, shared=None,
             axis_name=None) -> optax.GradientTransformationExtraArgs:
  """GradDrop as an optax transform (see the module docstring).

  Args:
    num_tasks: ``K`` (static).
    key: PRNG key or int seed; the state carries it and splits it every
      step, so a run is reproducible.
    leak: the leak ``l`` in ``[0, 1]``: a scalar, or one per task (shape
      ``(K,)``); 0 (no leak) is the paper's default.
      ``inject_hyperparams``-able.
    shared: which per-task-gradient leaves are shared (see
      :func:`mgda_jax.mgda`).
    axis_name: the data-parallel axis for an untyped ``jax.shard_map`` or
      ``jax.pmap`` (see the README's "Several devices"). Inside shard_map the
      draws at the representation are made over the global batch and
      sliced, so the step equals the one-device step.

  Returns:
    A ``GradientTransformationExtraArgs`` with state
    :class:`mgda_jax.MethodState`; its ``weights`` are NaN (GradDrop has no
    task weights).

  References:
    Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, *Just Pick a
    Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout*,
    NeurIPS 2020, https://arxiv.org/abs/2010.06808
  """
  num_tasks = checks.check_num_tasks(num_tasks, 'graddrop')
  checks.check_scalar('graddrop', 'leak', leak, low=0.0, high=1.0)
  key0 = checks.as_key(key)

  def rule(inp, inner):
    del inp
    _, next_key = jax.random.split(inner.key)
    return (jnp.full((num_tasks,), jnp.nan), GradDropInner(next_key),
            results.closed_form_info())

  def elementwise(leaves, inner, mode, is_rep):
    step_key, _ = jax.random.split(inner.key)
    keys = jax.random.split(step_key, max(len(leaves), 1))
    return [graddrop_combine(g, kk, leak, _draws(kk, g, mode, is_rep))
            for g, kk in zip(leaves, keys)]

  return engine.method('graddrop', num_tasks, rule,
                       lambda dtype: GradDropInner(key0),
                       family=engine.GRADIENT, needs_gram=False,
                       shared=shared, axis_name=axis_name,
                       elementwise=elementwise)
