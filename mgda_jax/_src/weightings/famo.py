"""FAMO: fast adaptive multitask optimisation (Liu et al. 2023).

FAMO keeps task logits ``xi`` and weights the log-losses:

.. math::

  z = \\operatorname{softmax}(\\xi), \\qquad
  d = \\sum_t \\frac{z_t / L_t}{\\sum_s z_s / L_s} \\nabla L_t ,

the gradient of ``sum_t (z_t / c) log L_t`` with ``c = sum_s z_s / L_s``
(so the weights ``w_t = z_t / (c L_t)`` sum to 1). After each step it
observes how much each log-loss fell, ``delta_t = log L_t(prev) - log
L_t(now)``, and moves the logits to favour the tasks that improved least:
the gradient of ``xi`` is ``J_z(xi)^T delta`` (the vector-Jacobian product
of the softmax), and ``xi`` takes an Adam step with L2 weight decay
``gamma`` (the reference code's ``Adam(lr, weight_decay=gamma)``). One
forward and one backward pass per step, whatever ``K``.

Here the "now" losses are those passed to the next ``update`` (the next
batch's, as LibMTL does), so FAMO needs no extra forward pass; the authors'
script re-evaluates the same batch after the step instead.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mgda_jax._src.core import checks
from mgda_jax._src.core import results
from mgda_jax._src.weightings.basic import loss_method


class FAMOInner(NamedTuple):
  """Inner state of :func:`famo`.

  Attributes:
    logits: ``xi``.
    prev_losses: the losses of the last (finite) update.
    opt_state: the Adam state of ``xi``.
  """

  logits: jax.Array
  prev_losses: jax.Array
  opt_state: Any


def famo(num_tasks: int, *, learning_rate: float = 0.025,
         weight_decay: float = 1e-3,
         min_losses=0.0, eps: float = 1e-8,
         axis_name=None) -> optax.GradientTransformationExtraArgs:
  """FAMO as an optax transform (see the module docstring).

  Args:
    num_tasks: ``K`` (static).
    learning_rate: Adam step size of the logits (the paper's ``beta``,
      ``> 0``; ``inject_hyperparams``-able).
    weight_decay: L2 decay of the logits (the paper's ``gamma``, ``>= 0``).
    min_losses: lower bounds of the losses (0 for cross-entropy); FAMO uses
      ``L_t - min_t + eps``.
    eps: the offset keeping the logarithms finite (``> 0``).
    axis_name: the data-parallel axis for an untyped ``jax.shard_map`` or
      ``jax.pmap``.

  Returns:
    A ``GradientTransformationExtraArgs`` with state
    :class:`mgda_jax.MethodState` (``inner``: :class:`FAMOInner`);
    ``update`` needs ``losses=``.

  References:
    Liu, Liang, Stone & Liu, *FAMO: Fast Adaptive Multitask Optimization*,
    NeurIPS 2023, https://arxiv.org/abs/2306.03792
  """
  num_tasks = checks.check_num_tasks(num_tasks, 'famo')
  checks.check_scalar('famo', 'learning_rate', learning_rate, low=0.0,
                      low_open=True)
  checks.check_scalar('famo', 'weight_decay', weight_decay, low=0.0)
  checks.check_scalar('famo', 'min_losses', min_losses)
  checks.check_scalar('famo', 'eps', eps, low=0.0, low_open=True)
  logit_opt = optax.chain(optax.add_decayed_weights(weight_decay),
                          optax.adam(learning_rate))

  def init_inner(dtype):
    del dtype
    xi = jnp.zeros((num_tasks,), jnp.float32)
    return FAMOInner(xi, jnp.ones((num_tasks,), jnp.float32),
                     logit_opt.init(xi))

  def rule(inp, inner):
    losses = inp.losses.astype(jnp.float32)
    shifted = jnp.maximum(losses - min_losses, 0.0) + eps
    # Learn the logits from the change in log-loss since the last update.
    delta = jnp.log(jnp.maximum(inner.prev_losses - min_losses, 0.0) + eps) - (
        jnp.log(shifted))
    _, softmax_vjp = jax.vjp(jax.nn.softmax, inner.logits)
    grad_xi = softmax_vjp(delta)[0]
    step, opt_state = logit_opt.update(grad_xi, inner.opt_state, inner.logits)
    first = inp.count == 0
    xi = jnp.where(first, inner.logits, optax.apply_updates(inner.logits,
                                                            step))
    opt_state = jax.tree.map(lambda new, old: jnp.where(first, old, new),
                             opt_state, inner.opt_state)
    z = jax.nn.softmax(xi)
    w = (z / shifted) / jnp.sum(z / shifted)
    return w, FAMOInner(xi, losses, opt_state), results.closed_form_info()

  return loss_method('famo', num_tasks, rule, init_inner, needs_losses=True,
                     axis_name=axis_name)
