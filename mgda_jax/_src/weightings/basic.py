"""Loss weightings with fixed or learned weights: ``sum_t w_t grad L_t``.

Every transform here takes the same inputs as every other method (see
:mod:`mgda_jax._src.engine`):

* a :class:`mgda_jax.RepresentationGrads`: the update is the gradient of
  ``sum_t w_t L_t`` w.r.t. all parameters, computed with one backward pass
  through the heads and one through the encoder; task heads are weighted
  too, since that is the gradient of the weighted loss;
* per-task gradients (leaves with a leading task axis): ``sum_t w_t g_t``.

The task losses come as ``losses=`` (shape ``(K,)``) where a method needs
them. The weights are constants of the parameter update; methods that learn
their weights update them inside the transform, from their own objective,
with their own step size, and only on steps whose inputs are finite.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mgda_jax._src import engine
from mgda_jax._src.core import checks
from mgda_jax._src.core import results


def loss_method(factory, num_tasks, rule, init_inner, *, needs_losses=False,
                needs_kpis=False, needs_gram=False, axis_name=None):
  """A loss weighting on the engine (``family='loss'``)."""
  return engine.method(factory, num_tasks, rule, init_inner,
                       family=engine.LOSS, needs_gram=needs_gram,
                       needs_losses=needs_losses, needs_kpis=needs_kpis,
                       axis_name=axis_name)


def fixed_weighting(weights, *, axis_name=None
                    ) -> optax.GradientTransformationExtraArgs:
  """Fixed task weights: the gradient of ``sum_t w_t L_t``.

  ``fixed_weighting(jnp.ones(K))`` is uniform weighting (the plain sum of the
  task losses), the usual baseline.

  Args:
    weights: the ``K`` weights (static length; the values may be traced).
    axis_name: the data-parallel axis for an untyped ``jax.shard_map`` or
      ``jax.pmap`` (see the README's "Several devices").

  Returns:
    A ``GradientTransformationExtraArgs`` with state
    :class:`mgda_jax.MethodState`.
  """
  shape = jnp.shape(weights)
  if len(shape) != 1 or shape[0] == 0:
    raise ValueError('fixed_weighting needs a (K,) vector of weights, K >= 1; '
                     f'got shape {shape}.')
  num_tasks = int(shape[0])
  checks.check_scalar('fixed_weighting', 'weights', weights)

  def rule(inp, inner):
    del inp
    return jnp.asarray(weights, jnp.float32), inner, results.closed_form_info()

  return loss_method('fixed_weighting', num_tasks, rule, lambda dtype: (),
                     axis_name=axis_name)


def uniform_weighting(num_tasks: int, *, axis_name=None
                      ) -> optax.GradientTransformationExtraArgs:
  """Uniform weighting, ``w_t = 1``: the gradient of ``sum_t L_t``.

  Args:
    num_tasks: ``K`` (static).
    axis_name: the data-parallel axis for an untyped ``jax.shard_map`` or
      ``jax.pmap``.

  Returns:
    A ``GradientTransformationExtraArgs`` with state
    :class:`mgda_jax.MethodState`.
  """
  num_tasks = checks.check_num_tasks(num_tasks, 'uniform_weighting')

  def rule(inp, inner):
    del inp
    return jnp.ones((num_tasks,), jnp.float32), inner, (
        results.closed_form_info())

  return loss_method('uniform_weighting', num_tasks, rule, lambda dtype: (),
                     axis_name=axis_name)


# ----------------------------------------------------------------------------
# Uncertainty weighting (Kendall et al. 2018)


class UncertaintyInner(NamedTuple):
  """Inner state of :func:`uncertainty_weighting`.

  Attributes:
    log_vars: ``s_t = log sigma_t^2``, the learned log-variances.
    momentum: the momentum buffer of ``s``.
  """

  log_vars: jax.Array
  momentum: jax.Array


def uncertainty_weighting(
    num_tasks: int,
    *,
    learning_rate: float = 0.05,
    momentum: float = 0.9,
    init_log_var: float = 0.0,
    axis_name=None,
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
    learning_rate: step size for ``s`` (``> 0``).
    momentum: heavy-ball momentum for ``s``, in ``[0, 1)``.
    init_log_var: initial ``s_t`` (0: all weights 1).
    axis_name: the data-parallel axis for an untyped ``jax.shard_map`` or
      ``jax.pmap``.

  Returns:
    A ``GradientTransformationExtraArgs`` with state
    :class:`mgda_jax.MethodState` (``inner``: :class:`UncertaintyInner`);
    ``update`` needs ``losses=``.

  References:
    Kendall, Gal & Cipolla, *Multi-Task Learning Using Uncertainty to Weigh
    Losses for Scene Geometry and Semantics*, CVPR 2018,
    https://arxiv.org/abs/1705.07115
  """
  factory = 'uncertainty_weighting'
  num_tasks = checks.check_num_tasks(num_tasks, factory)
  checks.check_scalar(factory, 'learning_rate', learning_rate, low=0.0,
                      low_open=True)
  checks.check_scalar(factory, 'momentum', momentum, low=0.0, high=1.0)
  checks.check_scalar(factory, 'init_log_var', init_log_var)

  def init_inner(dtype):
    del dtype
    s = jnp.full((num_tasks,), init_log_var, jnp.float32)
    return UncertaintyInner(s, jnp.zeros_like(s))

  def rule(inp, inner):
    weights = jnp.exp(-inner.log_vars)
    grad_s = 0.5 - weights * inp.losses.astype(weights.dtype)
    buf = momentum * inner.momentum + grad_s
    return weights, UncertaintyInner(inner.log_vars - learning_rate * buf,
                                     buf), results.closed_form_info()

  return loss_method(factory, num_tasks, rule, init_inner, needs_losses=True,
                     axis_name=axis_name)


# ----------------------------------------------------------------------------
# GradNorm (Chen et al. 2018)


class GradNormInner(NamedTuple):
  """Inner state of :func:`gradnorm`.

  Attributes:
    weights: the learned task weights ``w_t`` for the next update (they sum
      to ``K``).
    initial_losses: ``L_t(0)``, recorded at the first (finite) update.
  """

  weights: jax.Array
  initial_losses: jax.Array


def gradnorm(
    num_tasks: int,
    *,
    alpha: float = 1.5,
    learning_rate: float = 0.025,
    axis_name=None,
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
    alpha: the asymmetry hyperparameter (``>= 0``; 0 equalises the norms,
      larger values pull harder on slow tasks).
    learning_rate: step size for the weights (``> 0``).
    axis_name: the data-parallel axis for an untyped ``jax.shard_map`` or
      ``jax.pmap``.

  Returns:
    A ``GradientTransformationExtraArgs`` with state
    :class:`mgda_jax.MethodState` (``inner``: :class:`GradNormInner`);
    ``update`` needs ``losses=``.

  References:
    Chen, Badrinarayanan, Lee & Rabinovich, *GradNorm: Gradient Normalization
    for Adaptive Loss Balancing in Deep Multitask Networks*, ICML 2018,
    https://arxiv.org/abs/1711.02257
  """
  num_tasks = checks.check_num_tasks(num_tasks, 'gradnorm')
  checks.check_scalar('gradnorm', 'alpha', alpha, low=0.0)
  checks.check_scalar('gradnorm', 'learning_rate', learning_rate, low=0.0,
                      low_open=True)

  def init_inner(dtype):
    del dtype
    ones = jnp.ones((num_tasks,), jnp.float32)
    return GradNormInner(ones, ones)

  def rule(inp, inner):
    losses = inp.losses.astype(jnp.float32)
    initial = jnp.where(inp.count == 0, losses, inner.initial_losses)
    w = inner.weights
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(inp.gram), 0.0)).astype(
        jnp.float32)
    g = w * norms
    ratio = losses / jnp.where(initial > 0, initial, 1.0)
    r = ratio / jnp.maximum(jnp.mean(ratio), jnp.finfo(jnp.float32).tiny)
    target = jnp.mean(g) * r ** alpha
    new_w = w - learning_rate * jnp.sign(g - target) * norms
    new_w = jnp.maximum(new_w, 1e-3)
    new_w = num_tasks * new_w / jnp.sum(new_w)
    return w, GradNormInner(new_w, initial), results.closed_form_info()

  return loss_method('gradnorm', num_tasks, rule, init_inner,
                     needs_losses=True, needs_gram=True, axis_name=axis_name)
