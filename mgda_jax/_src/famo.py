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

from mgda_jax._src import mgda as mgda_lib
from mgda_jax._src.loss_weighting import check_k
from mgda_jax._src.loss_weighting import check_losses
from mgda_jax._src.loss_weighting import weighted_update


class FAMOState(NamedTuple):
  """State of :func:`famo`.

  Attributes:
    count: updates so far.
    weights: the weights ``w`` of the last update (they sum to 1).
    logits: ``xi``.
    prev_losses: the losses of the last update.
    opt_state: the Adam state of ``xi``.
  """

  count: jax.Array
  weights: jax.Array
  logits: jax.Array
  prev_losses: jax.Array
  opt_state: Any


def famo(num_tasks: int, *, learning_rate: float = 0.025,
         weight_decay: float = 1e-3,
         min_losses=0.0, eps: float = 1e-8
         ) -> optax.GradientTransformationExtraArgs:
  """FAMO as an optax transform (see the module docstring).

  Args:
    num_tasks: ``K`` (static).
    learning_rate: Adam step size of the logits (the paper's ``beta``;
      ``inject_hyperparams``-able).
    weight_decay: L2 decay of the logits (the paper's ``gamma``).
    min_losses: lower bounds of the losses (0 for cross-entropy); FAMO uses
      ``L_t - min_t + eps``.
    eps: the offset keeping the logarithms finite.

  Returns:
    A ``GradientTransformationExtraArgs`` with :class:`FAMOState`;
    ``update`` needs ``losses=``.

  References:
    Liu, Liang, Stone & Liu, *FAMO: Fast Adaptive Multitask Optimization*,
    NeurIPS 2023, https://arxiv.org/abs/2306.03792
  """
  num_tasks = mgda_lib.check_num_tasks(num_tasks, 'famo')
  logit_opt = optax.chain(optax.add_decayed_weights(weight_decay),
                          optax.adam(learning_rate))

  def init_fn(params):
    del params
    xi = jnp.zeros((num_tasks,), jnp.float32)
    return FAMOState(jnp.zeros((), jnp.int32),
                     jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32), xi,
                     jnp.ones((num_tasks,), jnp.float32), logit_opt.init(xi))

  def update_fn(updates, state, params=None, *, losses=None, **extra_args):
    del params, extra_args
    k = check_k(updates, num_tasks, 'famo')
    losses = jax.lax.stop_gradient(check_losses(losses, k, 'famo')).astype(
        jnp.float32)
    shifted = jnp.maximum(losses - min_losses, 0.0) + eps
    # Learn the logits from the change in log-loss since the last update.
    delta = jnp.log(jnp.maximum(state.prev_losses - min_losses, 0.0) + eps) - (
        jnp.log(shifted))
    _, softmax_vjp = jax.vjp(jax.nn.softmax, state.logits)
    grad_xi = softmax_vjp(delta)[0]
    step, opt_state = logit_opt.update(grad_xi, state.opt_state, state.logits)
    first = state.count == 0
    xi = jnp.where(first, state.logits, optax.apply_updates(state.logits,
                                                            step))
    opt_state = jax.tree.map(lambda new, old: jnp.where(first, old, new),
                             opt_state, state.opt_state)
    z = jax.nn.softmax(xi)
    w = (z / shifted) / jnp.sum(z / shifted)
    return weighted_update(updates, w), FAMOState(
        optax.safe_increment(state.count), w, xi, losses, opt_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
