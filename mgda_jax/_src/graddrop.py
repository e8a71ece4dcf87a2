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

from mgda_jax._src import aggregation
from mgda_jax._src import mgda as mgda_lib
from mgda_jax._src import mgda_ub as ub_lib
from mgda_jax._src.loss_weighting import check_k


def graddrop_combine(task_grads: jax.Array, key: jax.Array,
                     leak=0.0) -> jax.Array:
  """GradDrop's ``sum_t M_t nabla_t`` for one ``(K, ...)`` array."""
  acc = jnp.promote_types(task_grads.dtype, jnp.float32)
  g = task_grads.astype(acc)
  total = jnp.sum(g, axis=0)
  mass = jnp.sum(jnp.abs(g), axis=0)
  purity = 0.5 * (1.0 + jnp.where(mass > 0, total / jnp.where(mass > 0, mass,
                                                                1.0), 0.0))
  u = jax.random.uniform(key, purity.shape, acc)
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


class GradDropState(NamedTuple):
  """State of :func:`graddrop`.

  Attributes:
    count: updates so far.
    key: the PRNG key for the next update's draws.
  """

  count: jax.Array
  key: jax.Array


def graddrop(num_tasks: int, *, key=0, leak=0.0,
             shared=None) -> optax.GradientTransformationExtraArgs:
  """GradDrop as an optax transform (see the module docstring).

  Args:
    num_tasks: ``K`` (static).
    key: PRNG key or int seed; the state carries it and splits it every
      step, so a run is reproducible.
    leak: the leak ``l``: a scalar, or one per task (shape ``(K,)``); 0 (no
      leak) is the paper's default. ``inject_hyperparams``-able.
    shared: which per-task-gradient leaves are shared.

  Returns:
    A ``GradientTransformationExtraArgs`` with :class:`GradDropState`.

  References:
    Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, *Just Pick a
    Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout*,
    NeurIPS 2020, https://arxiv.org/abs/2010.06808
  """
  num_tasks = mgda_lib.check_num_tasks(num_tasks, 'graddrop')
  key0 = aggregation.as_key(key)

  def init_fn(params):
    del params
    return GradDropState(jnp.zeros((), jnp.int32), key0)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    check_k(updates, num_tasks, 'graddrop')
    step_key, next_key = jax.random.split(state.key)
    if isinstance(updates, ub_lib.RepresentationGrads):
      leaves, treedef = jax.tree.flatten(updates.rep_grads)
      keys = jax.random.split(step_key, len(leaves))
      cot = treedef.unflatten([graddrop_combine(g, kk, leak)
                               for g, kk in zip(leaves, keys)])
      new_updates = jax.tree.map(jnp.add, updates.pullback(cot),
                                 updates.head_grads)
    else:
      mask = mgda_lib.resolve_shared(shared, updates, params)
      leaves, treedef = jax.tree.flatten(updates)
      keys = jax.random.split(step_key, len(leaves))
      out = [graddrop_combine(g, kk, leak) if m else jnp.sum(g, axis=0)
             for g, kk, m in zip(leaves, keys, jax.tree.leaves(mask))]
      new_updates = treedef.unflatten(out)
    return new_updates, GradDropState(optax.safe_increment(state.count),
                                      next_key)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
