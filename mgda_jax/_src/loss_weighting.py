"""Loss weightings as optax transforms: ``sum_t w_t grad L_t`` with ``w`` from state.

Every transform here takes the same inputs as :func:`mgda_jax.mgda` or
:func:`mgda_jax.mgda_ub`, so methods are swapped without touching the training
step:

* a :class:`mgda_jax.RepresentationGrads` (from
  :func:`mgda_jax.representation_grads`): the update is the gradient of
  ``sum_t w_t L_t`` w.r.t. all parameters, computed with one backward pass
  through the heads and one through the encoder
  (:meth:`RepresentationGrads.weighted_grads`); task heads are weighted too,
  since that is the gradient of the weighted loss;
* per-task gradients (a pytree whose leaves have a leading task axis, e.g.
  from :func:`mgda_jax.per_task_grads`): the update is ``sum_t w_t g_t``.

The task losses come as the keyword extra argument ``losses`` (shape
``(K,)``) where a method needs them. The weights are treated as constants
for the parameter update (no gradient flows into them through it); methods
that learn their weights update them inside the transform, from their own
objective, with their own step size.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mgda_jax._src import gram as gram_lib
from mgda_jax._src import mgda as mgda_lib
from mgda_jax._src import mgda_ub as ub_lib


def weighted_update(updates, weights: jax.Array):
  """``sum_t weights[t] * grad L_t`` for either kind of input."""
  weights = jax.lax.stop_gradient(weights)
  if isinstance(updates, ub_lib.RepresentationGrads):
    return updates.weighted_grads(weights)
  return mgda_lib.combine(weights, updates)


def input_num_tasks(updates, factory: str) -> int:
  """K read off the input (either kind), or a clear error."""
  if isinstance(updates, ub_lib.RepresentationGrads):
    return gram_lib.num_tasks(updates.rep_grads, f'{factory} rep_grads')
  return gram_lib.num_tasks(updates, f'{factory} per-task gradients')


def task_norms(updates) -> jax.Array:
  """``||grad L_t||`` per task: at the representation, or of the gradients."""
  tree = (updates.rep_grads if isinstance(updates, ub_lib.RepresentationGrads)
          else updates)
  return jnp.sqrt(jnp.maximum(jnp.diagonal(gram_lib.gram_matrix(tree)), 0.0))


def check_losses(losses, k, factory):
  if losses is None:
    raise ValueError(f'{factory} needs the task losses: pass losses=<array of '
                     'shape (K,)> to update.')
  losses = jnp.asarray(losses)
  if losses.shape != (k,):
    raise ValueError(f'{factory}: losses must have shape ({k},); got '
                     f'{losses.shape}.')
  return losses


def check_k(updates, num_tasks, factory) -> int:
  """K read off the input (either kind), which must equal ``num_tasks``."""
  k = input_num_tasks(updates, factory)
  if k != num_tasks:
    raise ValueError(f'{factory} was built for num_tasks={num_tasks} but the '
                     f'input has {k} tasks.')
  return k


class WeightingState(NamedTuple):
  """State of a stateless weighting: a step count and the last weights."""

  count: jax.Array
  weights: jax.Array


def fixed_weighting(weights) -> optax.GradientTransformationExtraArgs:
  """Fixed task weights: the gradient of ``sum_t w_t L_t``.

  ``fixed_weighting(jnp.ones(K))`` is uniform weighting (the plain sum of the
  task losses), the usual baseline.

  Args:
    weights: the ``K`` weights (static length; the values may be traced).

  Returns:
    A ``GradientTransformationExtraArgs`` with :class:`WeightingState`.
  """
  num_tasks = int(jnp.shape(weights)[0])

  def init_fn(params):
    del params
    return WeightingState(jnp.zeros((), jnp.int32),
                          jnp.asarray(weights, jnp.float32))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    check_k(updates, num_tasks, 'fixed_weighting')
    w = jnp.asarray(weights, jnp.float32)
    return weighted_update(updates, w), WeightingState(
        optax.safe_increment(state.count), w)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def uniform_weighting(num_tasks: int) -> optax.GradientTransformationExtraArgs:
  """Uniform weighting, ``w_t = 1``: the gradient of ``sum_t L_t``."""
  num_tasks = mgda_lib.check_num_tasks(num_tasks, 'uniform_weighting')
  return fixed_weighting(jnp.ones((num_tasks,), jnp.float32))


# ----------------------------------------------------------------------------
# Uncertainty weighting (Kendall et al. 2018)


class UncertaintyState(NamedTuple):
  """State of :func:`uncertainty_weighting`.

  Attributes:
    count: steps so far.
    log_vars: ``s_t = log sigma_t^2``, the learned log-variances.
    momentum: the momentum buffer of ``s``.
    weights: the weights ``exp(-s_t)`` used by the last update.
  """

  count: jax.Array
  log_vars: jax.Array
  momentum: jax.Array
  weights: jax.Array


def uncertainty_weighting(
    num_tasks: int,
    *,
    learning_rate: float = 0.05,
    momentum: float = 0.9,
    init_log_var: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
  """Homoscedastic-uncertainty weighting of Kendall, Gal & Cipolla (2018).

  The total loss ``sum_t exp(-s_t) L_t + s_t / 2`` with learned ``s_t = log
  sigma_t^2`` (their classification form, ``L_t / sigma_t^2 + log sigma_t``;
  the regression form ``L_t / (2 sigma_t^2) + log sigma_t`` is the same up to
  the shift ``s -> s + log 2`` and a constant). The parameter update is the
  gradient of ``sum_t w_t L_t`` with ``w_t = exp(-s_t)``; ``s`` is updated in
  the transform by SGD with momentum on its own gradient ``1/2 - exp(-s_t)
  L_t`` (the same optimiser as the paper's MultiMNIST setup, by default).

  Args:
    num_tasks: ``K`` (static).
    learning_rate: step size for ``s``.
    momentum: heavy-ball momentum for ``s``.
    init_log_var: initial ``s_t`` (0: all weights 1).

  Returns:
    A ``GradientTransformationExtraArgs`` with :class:`UncertaintyState`;
    ``update`` needs ``losses=`` (shape ``(K,)``).

  References:
    Kendall, Gal & Cipolla, *Multi-Task Learning Using Uncertainty to Weigh
    Losses for Scene Geometry and Semantics*, CVPR 2018,
    https://arxiv.org/abs/1705.07115
  """
  num_tasks = mgda_lib.check_num_tasks(num_tasks, 'uncertainty_weighting')

  def init_fn(params):
    del params
    s = jnp.full((num_tasks,), init_log_var, jnp.float32)
    return UncertaintyState(jnp.zeros((), jnp.int32), s, jnp.zeros_like(s),
                            jnp.exp(-s))

  def update_fn(updates, state, params=None, *, losses=None, **extra_args):
    del params, extra_args
    k = check_k(updates, num_tasks, 'uncertainty_weighting')
    losses = jax.lax.stop_gradient(check_losses(losses, k,
                                                 'uncertainty_weighting'))
    weights = jnp.exp(-state.log_vars)
    new_updates = weighted_update(updates, weights)
    grad_s = 0.5 - weights * losses.astype(weights.dtype)
    buf = momentum * state.momentum + grad_s
    return new_updates, UncertaintyState(
        count=optax.safe_increment(state.count),
        log_vars=state.log_vars - learning_rate * buf,
        momentum=buf, weights=weights)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------
# GradNorm (Chen et al. 2018)


class GradNormState(NamedTuple):
  """State of :func:`gradnorm`.

  Attributes:
    count: steps so far.
    weights: the task weights ``w_t`` (they sum to ``K``).
    initial_losses: ``L_t(0)``, recorded at the first update.
  """

  count: jax.Array
  weights: jax.Array
  initial_losses: jax.Array


def gradnorm(
    num_tasks: int,
    *,
    alpha: float = 1.5,
    learning_rate: float = 0.025,
) -> optax.GradientTransformationExtraArgs:
  """GradNorm: balance the tasks' gradient norms by their training rates.

  With ``G_t = w_t ||grad L_t||``, ``Gbar = mean_t G_t``, loss ratios
  ``Ltilde_t = L_t / L_t(0)`` and relative inverse training rates ``r_t =
  Ltilde_t / mean(Ltilde)``, GradNorm (Chen et al. 2018, Eq. 2) minimises

  .. math::

    L_{grad}(w) = \\sum_t \\big| G_t(w) - \\bar G \\, r_t^{\\alpha} \\big|

  over ``w`` with the target ``Gbar r_t^alpha`` held constant, by a gradient
  step ``w_t -= lr * sign(G_t - target_t) ||grad L_t||``, after which ``w``
  is clipped positive and renormalised to sum to ``K``. The parameter update
  is the gradient of ``sum_t w_t L_t`` with the current weights.

  ``||grad L_t||`` is taken where the input provides it: for a
  :class:`mgda_jax.RepresentationGrads`, at the shared representation ``Z``
  (the last shared activation, the MGDA-UB input: no extra backward pass);
  for per-task parameter gradients, over the whole gradient. The paper uses
  the last shared layer's weights; both are its "W" for a linear last layer
  up to the layer's input scale.

  Args:
    num_tasks: ``K`` (static).
    alpha: the asymmetry hyperparameter (the paper's alpha; 0 equalises the
      norms, larger values pull harder on slow tasks).
    learning_rate: step size for the weights.

  Returns:
    A ``GradientTransformationExtraArgs`` with :class:`GradNormState`;
    ``update`` needs ``losses=``.

  References:
    Chen, Badrinarayanan, Lee & Rabinovich, *GradNorm: Gradient Normalization
    for Adaptive Loss Balancing in Deep Multitask Networks*, ICML 2018,
    https://arxiv.org/abs/1711.02257
  """
  num_tasks = mgda_lib.check_num_tasks(num_tasks, 'gradnorm')

  def init_fn(params):
    del params
    return GradNormState(jnp.zeros((), jnp.int32),
                         jnp.ones((num_tasks,), jnp.float32),
                         jnp.ones((num_tasks,), jnp.float32))

  def update_fn(updates, state, params=None, *, losses=None, **extra_args):
    del params, extra_args
    k = check_k(updates, num_tasks, 'gradnorm')
    losses = jax.lax.stop_gradient(
        check_losses(losses, k, 'gradnorm')).astype(jnp.float32)
    initial = jnp.where(state.count == 0, losses, state.initial_losses)
    w = state.weights
    new_updates = weighted_update(updates, w)
    norms = jax.lax.stop_gradient(task_norms(updates)).astype(jnp.float32)
    g = w * norms
    ratio = losses / jnp.where(initial > 0, initial, 1.0)
    r = ratio / jnp.maximum(jnp.mean(ratio), jnp.finfo(jnp.float32).tiny)
    target = jnp.mean(g) * r ** alpha
    new_w = w - learning_rate * jnp.sign(g - target) * norms
    new_w = jnp.maximum(new_w, 1e-3)
    new_w = num_tasks * new_w / jnp.sum(new_w)
    return new_updates, GradNormState(optax.safe_increment(state.count),
                                      new_w, initial)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)

