"""Loss weightings that read the task losses (or KPIs) and set the weights.

Each transform here is a loss weighting in the sense of
:mod:`mgda_jax._src.loss_weighting`: the update is the gradient of ``sum_t
w_t L_t`` with the weights held constant, computed from a
:class:`mgda_jax.RepresentationGrads` (one backward pass) or from per-task
gradients, and ``update`` takes the losses as ``losses=`` (shape ``(K,)``).

Formulas (``sg`` is stop-gradient; ``L^(0)`` the losses at the first
update):

=====================  =====================================================
initial loss           ``w_t = 1 / L_t^(0)``
prior loss             ``w_t = 1 / L_t^prior`` (label statistics)
real-time loss (GLS)   ``w_t = 1 / sg(L_t)``: the gradient is ``K`` times
                       that of ``log (prod_t L_t)^(1/K)``
LBTW                   ``w_t = (L_t / L_t^(0))^alpha``
DWA                    ``w_t = K softmax(r / T)_t``, ``r_t = L_t(e-1) /
                       L_t(e-2)`` over epoch-average losses
DTP                    ``w_t = -(1 - kbar_t)^gamma log kbar_t``, ``kbar`` a
                       moving average of a KPI in ``[0, 1]``
RLW                    ``w = softmax(z)``, ``z ~ N(0, I)`` each step
=====================  =====================================================

The survey of Vandenhende et al. (2021) and the seed notes in this
repository give the same formulas; each factory cites its paper.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mgda_jax._src import aggregation
from mgda_jax._src import mgda as mgda_lib
from mgda_jax._src.loss_weighting import check_k
from mgda_jax._src.loss_weighting import check_losses
from mgda_jax._src.loss_weighting import fixed_weighting
from mgda_jax._src.loss_weighting import weighted_update
from mgda_jax._src.loss_weighting import WeightingState


def _inverse(x):
  """``1/x`` for ``x > 0``; 0 for ``x <= 0`` (a solved or degenerate task)."""
  return jnp.where(x > 0, 1.0 / jnp.where(x > 0, x, 1.0), 0.0)


def _losses(updates, losses, num_tasks, factory):
  k = check_k(updates, num_tasks, factory)
  return jax.lax.stop_gradient(
      check_losses(losses, k, factory)).astype(jnp.float32)


class InitialLossState(NamedTuple):
  """State of :func:`initial_loss_weighting` and :func:`lbtw`.

  Attributes:
    count: updates so far.
    weights: the weights of the last update.
    initial_losses: ``L^(0)``, recorded at the first update.
  """

  count: jax.Array
  weights: jax.Array
  initial_losses: jax.Array


def _initial_state(num_tasks):
  def init_fn(params):
    del params
    ones = jnp.ones((num_tasks,), jnp.float32)
    return InitialLossState(jnp.zeros((), jnp.int32), ones, ones)
  return init_fn


def initial_loss_weighting(
    num_tasks: int) -> optax.GradientTransformationExtraArgs:
  """Initial-loss weighting, ``w_t = 1 / L_t^(0)``.

  ``L^(0)`` is the loss vector of the first update (one batch). Dividing by
  it makes every task's loss start at 1, so the weighting is invariant to
  rescaling a task's loss (not to shifting it).

  Args:
    num_tasks: ``K`` (static).

  Returns:
    A ``GradientTransformationExtraArgs`` with :class:`InitialLossState`;
    ``update`` needs ``losses=``.

  References:
    Vandenhende et al., *Multi-Task Learning for Dense Prediction Tasks: A
    Survey*, TPAMI 2021, https://arxiv.org/abs/2004.13379
  """
  num_tasks = mgda_lib.check_num_tasks(num_tasks, 'initial_loss_weighting')

  def update_fn(updates, state, params=None, *, losses=None, **extra_args):
    del params, extra_args
    losses = _losses(updates, losses, num_tasks, 'initial_loss_weighting')
    initial = jnp.where(state.count == 0, losses, state.initial_losses)
    w = _inverse(initial)
    return weighted_update(updates, w), InitialLossState(
        optax.safe_increment(state.count), w, initial)

  return optax.GradientTransformationExtraArgs(_initial_state(num_tasks),
                                               update_fn)


def lbtw(num_tasks: int, *,
         alpha: float = 0.5) -> optax.GradientTransformationExtraArgs:
  """Loss-balanced task weighting, ``w_t = (L_t / L_t^(0))^alpha``.

  Tasks whose loss has fallen most (relative to the first update) are
  weighted least, to limit negative transfer from tasks that are already
  learned.

  Args:
    num_tasks: ``K`` (static).
    alpha: the exponent (``inject_hyperparams``-able); 0 is uniform
      weighting.

  Returns:
    A ``GradientTransformationExtraArgs`` with :class:`InitialLossState`;
    ``update`` needs ``losses=``.

  References:
    Liu, Liang & Gitter, *Loss-Balanced Task Weighting to Reduce Negative
    Transfer in Multi-Task Learning*, AAAI 2019 (student abstract),
    https://doi.org/10.1609/aaai.v33i01.33019977
  """
  num_tasks = mgda_lib.check_num_tasks(num_tasks, 'lbtw')

  def update_fn(updates, state, params=None, *, losses=None, **extra_args):
    del params, extra_args
    losses = _losses(updates, losses, num_tasks, 'lbtw')
    initial = jnp.where(state.count == 0, losses, state.initial_losses)
    ratio = jnp.maximum(losses * _inverse(initial), 0.0)
    w = ratio ** alpha
    return weighted_update(updates, w), InitialLossState(
        optax.safe_increment(state.count), w, initial)

  return optax.GradientTransformationExtraArgs(_initial_state(num_tasks),
                                               update_fn)


def classification_prior(class_frequencies) -> jax.Array:
  """The prior loss of a classification task: the entropy of its labels.

  ``L^prior = -sum_c p_c log p_c``, the cross-entropy of the best
  label-blind predictor (the class frequencies themselves).

  Args:
    class_frequencies: counts or frequencies ``(C,)`` (normalised here), or
      ``(K, C)`` for ``K`` tasks.

  Returns:
    The entropy (nats), shape ``()`` or ``(K,)``.
  """
  p = jnp.asarray(class_frequencies, jnp.float32)
  p = p / jnp.sum(p, axis=-1, keepdims=True)
  return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)),
                            0.0), axis=-1)


def regression_prior(targets, axis=0) -> jax.Array:
  """The prior loss of a regression task: ``E ||y - E y||^2``.

  The squared error of the best label-blind predictor (the mean target).

  Args:
    targets: the training targets, examples along ``axis``.
    axis: the example axis.

  Returns:
    The mean over examples of the squared distance to the mean, summed over
    the other axes.
  """
  y = jnp.asarray(targets, jnp.float32)
  centred = y - jnp.mean(y, axis=axis, keepdims=True)
  return jnp.sum(jnp.mean(centred ** 2, axis=axis))


def prior_loss_weighting(priors) -> optax.GradientTransformationExtraArgs:
  """Prior-loss weighting, ``w_t = 1 / L_t^prior``, from label statistics.

  Build ``priors`` with :func:`classification_prior` (entropy of the class
  frequencies) or :func:`regression_prior` (variance of the targets) per
  task. The weights are fixed for the run.

  Args:
    priors: the ``K`` prior losses (positive).

  Returns:
    A :func:`mgda_jax.fixed_weighting` with weights ``1 / priors``.

  References:
    Vandenhende et al., *Multi-Task Learning for Dense Prediction Tasks: A
    Survey*, TPAMI 2021, https://arxiv.org/abs/2004.13379
  """
  priors = jnp.asarray(priors, jnp.float32)
  if priors.ndim != 1 or priors.shape[0] == 0:
    raise ValueError('prior_loss_weighting needs a (K,) vector of prior '
                     f'losses; got shape {priors.shape}.')
  return fixed_weighting(_inverse(priors))


def realtime_loss_weighting(
    num_tasks: int) -> optax.GradientTransformationExtraArgs:
  """Real-time loss weighting, ``w_t = 1 / sg(L_t)`` (geometric loss strategy).

  The update ``sum_t grad L_t / L_t`` is ``K`` times the gradient of the
  log of the geometric mean of the losses, ``(1/K) sum_t log L_t``, and is
  parallel to the gradient of the geometric mean itself (GLS). A task with
  ``L_t <= 0`` gets weight 0.

  Args:
    num_tasks: ``K`` (static).

  Returns:
    A ``GradientTransformationExtraArgs`` with :class:`WeightingState`;
    ``update`` needs ``losses=``.

  References:
    Chennupati, Sistu, Yogamani & Rawashdeh, *MultiNet++: Multi-Stream
    Feature Aggregation and Geometric Loss Strategy for Multi-Task
    Learning*, CVPR Workshops 2019, https://arxiv.org/abs/1904.08492
  """
  num_tasks = mgda_lib.check_num_tasks(num_tasks, 'realtime_loss_weighting')

  def init_fn(params):
    del params
    return WeightingState(jnp.zeros((), jnp.int32),
                          jnp.ones((num_tasks,), jnp.float32))

  def update_fn(updates, state, params=None, *, losses=None, **extra_args):
    del params, extra_args
    losses = _losses(updates, losses, num_tasks, 'realtime_loss_weighting')
    w = _inverse(losses)
    return weighted_update(updates, w), WeightingState(
        optax.safe_increment(state.count), w)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------
# DWA


class DWAState(NamedTuple):
  """State of :func:`dwa`.

  Attributes:
    count: updates so far.
    weights: the weights of the last update.
    loss_sum: sum of the losses over the current epoch so far.
    epoch_steps: updates in the current epoch so far.
    last: average losses of the last completed epoch, ``L(e-1)``.
    before_last: those of the epoch before, ``L(e-2)``.
    epochs: completed epochs.
  """

  count: jax.Array
  weights: jax.Array
  loss_sum: jax.Array
  epoch_steps: jax.Array
  last: jax.Array
  before_last: jax.Array
  epochs: jax.Array


def dwa(num_tasks: int, *, temperature: float = 2.0,
        steps_per_epoch: int = 1) -> optax.GradientTransformationExtraArgs:
  """Dynamic weight average (Liu, Johns & Davison 2019, Eq. 7).

  .. math::

    w_t(e) = \\frac{K \\exp(r_t(e-1)/T)}{\\sum_s \\exp(r_s(e-1)/T)}, \\qquad
    r_t(e-1) = \\frac{L_t(e-1)}{L_t(e-2)} ,

  with ``L_t(e)`` the average loss of task ``t`` over epoch ``e``. The
  weights are 1 for the first two epochs. Tasks whose loss falls slowly get
  more weight; equal loss ratios give uniform weights.

  Args:
    num_tasks: ``K`` (static).
    temperature: ``T`` (the paper uses 2; ``inject_hyperparams``-able).
    steps_per_epoch: updates per "epoch" of loss averaging. The paper
      averages over real epochs; ``1`` makes it per step.

  Returns:
    A ``GradientTransformationExtraArgs`` with :class:`DWAState`;
    ``update`` needs ``losses=``.

  References:
    Liu, Johns & Davison, *End-to-End Multi-Task Learning with Attention*,
    CVPR 2019, https://arxiv.org/abs/1803.10704
  """
  num_tasks = mgda_lib.check_num_tasks(num_tasks, 'dwa')
  if not isinstance(steps_per_epoch, jax.core.Tracer) and (
      steps_per_epoch < 1):
    raise ValueError(f'dwa: steps_per_epoch must be >= 1; got '
                     f'{steps_per_epoch}.')

  def init_fn(params):
    del params
    ones = jnp.ones((num_tasks,), jnp.float32)
    zero = jnp.zeros((), jnp.int32)
    return DWAState(zero, ones, jnp.zeros_like(ones), zero, ones, ones, zero)

  def update_fn(updates, state, params=None, *, losses=None, **extra_args):
    del params, extra_args
    losses = _losses(updates, losses, num_tasks, 'dwa')
    ratio = state.last * _inverse(state.before_last)
    w = num_tasks * jax.nn.softmax(ratio / temperature)
    w = jnp.where(state.epochs >= 2, w, jnp.ones_like(w))
    loss_sum = state.loss_sum + losses
    steps = state.epoch_steps + 1
    end = steps >= steps_per_epoch
    mean = loss_sum / steps
    return weighted_update(updates, w), DWAState(
        count=optax.safe_increment(state.count), weights=w,
        loss_sum=jnp.where(end, 0.0, loss_sum),
        epoch_steps=jnp.where(end, 0, steps),
        last=jnp.where(end, mean, state.last),
        before_last=jnp.where(end, state.last, state.before_last),
        epochs=state.epochs + end.astype(jnp.int32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------
# DTP


class DTPState(NamedTuple):
  """State of :func:`dtp`.

  Attributes:
    count: updates so far.
    weights: the weights of the last update.
    kpi: the moving average ``kbar`` of the KPIs.
  """

  count: jax.Array
  weights: jax.Array
  kpi: jax.Array


def dtp(num_tasks: int, *, gamma: float = 1.0,
        kpi_rate: float = 0.5) -> optax.GradientTransformationExtraArgs:
  """Dynamic task prioritisation (Guo et al. 2018): focus on hard tasks.

  .. math::

    w_t = -(1 - \\bar\\kappa_t)^{\\gamma} \\log \\bar\\kappa_t, \\qquad
    \\bar\\kappa_t \\leftarrow a \\, \\kappa_t + (1 - a) \\bar\\kappa_t ,

  a focal-loss weight on a key performance indicator ``kappa_t in [0, 1]``
  (e.g. the batch accuracy), passed to ``update`` as ``kpis=`` (shape
  ``(K,)``). Low-KPI (hard) tasks get large weights. ``kbar`` starts at the
  first KPIs and is clipped to ``[1e-6, 1]``.

  Args:
    num_tasks: ``K`` (static).
    gamma: the focusing exponent (``inject_hyperparams``-able).
    kpi_rate: ``a``, the weight of the new KPI in the moving average.

  Returns:
    A ``GradientTransformationExtraArgs`` with :class:`DTPState`;
    ``update`` needs ``kpis=``.

  References:
    Guo, Haque, Huang, Yeung & Fei-Fei, *Dynamic Task Prioritization for
    Multitask Learning*, ECCV 2018.
  """
  num_tasks = mgda_lib.check_num_tasks(num_tasks, 'dtp')

  def init_fn(params):
    del params
    ones = jnp.ones((num_tasks,), jnp.float32)
    return DTPState(jnp.zeros((), jnp.int32), ones, ones)

  def update_fn(updates, state, params=None, *, kpis=None, **extra_args):
    del params, extra_args
    k = check_k(updates, num_tasks, 'dtp')
    if kpis is None:
      raise ValueError('dtp needs the task KPIs in [0, 1]: pass kpis=<array '
                       'of shape (K,)> (e.g. batch accuracies) to update.')
    kpis = jax.lax.stop_gradient(jnp.asarray(kpis, jnp.float32))
    if kpis.shape != (k,):
      raise ValueError(f'dtp: kpis must have shape ({k},); got {kpis.shape}.')
    kbar = jnp.where(state.count == 0, kpis,
                     kpi_rate * kpis + (1.0 - kpi_rate) * state.kpi)
    kbar = jnp.clip(kbar, 1e-6, 1.0)
    w = -((1.0 - kbar) ** gamma) * jnp.log(kbar)
    return weighted_update(updates, w), DTPState(
        optax.safe_increment(state.count), w, kbar)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------
# RLW


class RLWState(NamedTuple):
  """State of :func:`rlw`: the count, last weights, and the PRNG key."""

  count: jax.Array
  weights: jax.Array
  key: jax.Array


def rlw(num_tasks: int, *, key=0) -> optax.GradientTransformationExtraArgs:
  """Random loss weighting: ``w = softmax(z)``, ``z ~ N(0, I)`` every step.

  Args:
    num_tasks: ``K`` (static).
    key: PRNG key or int seed; the state carries it and splits it every
      step, so a run is reproducible.

  Returns:
    A ``GradientTransformationExtraArgs`` with :class:`RLWState`.

  References:
    Lin, Ye, Xu, Shi & Zhang, *Reasonable Effectiveness of Random Weighting:
    A Litmus Test for Multi-Task Learning*, TMLR 2022,
    https://arxiv.org/abs/2111.10603
  """
  num_tasks = mgda_lib.check_num_tasks(num_tasks, 'rlw')
  key0 = aggregation.as_key(key)

  def init_fn(params):
    del params
    return RLWState(jnp.zeros((), jnp.int32),
                    jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32), key0)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    check_k(updates, num_tasks, 'rlw')
    step_key, next_key = jax.random.split(state.key)
    w = jax.nn.softmax(jax.random.normal(step_key, (num_tasks,), jnp.float32))
    return weighted_update(updates, w), RLWState(
        optax.safe_increment(state.count), w, next_key)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
