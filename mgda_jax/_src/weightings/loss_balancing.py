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

from mgda_jax._src.core import checks
from mgda_jax._src.core import results
from mgda_jax._src.weightings.basic import fixed_weighting
from mgda_jax._src.weightings.basic import loss_method


def _inverse(x):
  """``1/x`` for ``x > 0``; 0 for ``x <= 0`` (a solved or degenerate task)."""
  return jnp.where(x > 0, 1.0 / jnp.where(x > 0, x, 1.0), 0.0)


def _closed():
  return results.closed_form_info()


class InitialLossInner(NamedTuple):
  """Inner state of :func:`initial_loss_weighting` and :func:`lbtw`.

  Attributes:
    initial_losses: ``L^(0)``, recorded at the first (finite) update.
  """

  initial_losses: jax.Array


def _initial_inner(num_tasks):
  return lambda dtype: InitialLossInner(jnp.ones((num_tasks,), jnp.float32))


def initial_loss_weighting(num_tasks: int, *, axis_name=None
                           ) -> optax.GradientTransformationExtraArgs:
  """Initial-loss weighting, ``w_t = 1 / L_t^(0)``.

  ``L^(0)`` is the loss vector of the first update with finite losses (one
  batch). Dividing by it makes every task's loss start at 1, so the
  weighting is invariant to rescaling a task's loss (not to shifting it).

  Args:
    num_tasks: ``K`` (static).
    axis_name: the data-parallel axis for an untyped ``jax.shard_map`` or
      ``jax.pmap``.

  Returns:
    A ``GradientTransformationExtraArgs`` with state
    :class:`mgda_jax.MethodState`; ``update`` needs ``losses=``.

  References:
    Vandenhende et al., *Multi-Task Learning for Dense Prediction Tasks: A
    Survey*, TPAMI 2021, https://arxiv.org/abs/2004.13379
  """
  num_tasks = checks.check_num_tasks(num_tasks, 'initial_loss_weighting')

  def rule(inp, inner):
    initial = jnp.where(inp.count == 0, inp.losses, inner.initial_losses)
    return _inverse(initial), InitialLossInner(initial), _closed()

  return loss_method('initial_loss_weighting', num_tasks, rule,
                     _initial_inner(num_tasks), needs_losses=True,
                     axis_name=axis_name)


def lbtw(num_tasks: int, *, alpha: float = 0.5,
         axis_name=None) -> optax.GradientTransformationExtraArgs:
  """Loss-balanced task weighting, ``w_t = (L_t / L_t^(0))^alpha``.

  Tasks whose loss has fallen most (relative to the first update) are
  weighted least, to limit negative transfer from tasks that are already
  learned.

  Args:
    num_tasks: ``K`` (static).
    alpha: the exponent (``inject_hyperparams``-able); 0 is uniform
      weighting.
    axis_name: the data-parallel axis for an untyped ``jax.shard_map`` or
      ``jax.pmap``.

  Returns:
    A ``GradientTransformationExtraArgs`` with state
    :class:`mgda_jax.MethodState`; ``update`` needs ``losses=``.

  References:
    Liu, Liang & Gitter, *Loss-Balanced Task Weighting to Reduce Negative
    Transfer in Multi-Task Learning*, AAAI 2019 (student abstract),
    https://doi.org/10.1609/aaai.v33i01.33019977
  """
  num_tasks = checks.check_num_tasks(num_tasks, 'lbtw')
  checks.check_scalar('lbtw', 'alpha', alpha)

  def rule(inp, inner):
    initial = jnp.where(inp.count == 0, inp.losses, inner.initial_losses)
    ratio = jnp.maximum(inp.losses * _inverse(initial), 0.0)
    return ratio ** alpha, InitialLossInner(initial), _closed()

  return loss_method('lbtw', num_tasks, rule, _initial_inner(num_tasks),
                     needs_losses=True, axis_name=axis_name)


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


def prior_loss_weighting(priors, *, axis_name=None
                         ) -> optax.GradientTransformationExtraArgs:
  """Prior-loss weighting, ``w_t = 1 / L_t^prior``, from label statistics.

  Build ``priors`` with :func:`classification_prior` (entropy of the class
  frequencies) or :func:`regression_prior` (variance of the targets) per
  task. The weights are fixed for the run.

  Args:
    priors: the ``K`` prior losses (positive).
    axis_name: the data-parallel axis for an untyped ``jax.shard_map`` or
      ``jax.pmap``.

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
  checks.check_scalar('prior_loss_weighting', 'priors', priors, low=0.0,
                      low_open=True)
  return fixed_weighting(_inverse(priors), axis_name=axis_name)


def realtime_loss_weighting(num_tasks: int, *, axis_name=None
                            ) -> optax.GradientTransformationExtraArgs:
  """Real-time loss weighting, ``w_t = 1 / sg(L_t)`` (geometric loss strategy).

  The update ``sum_t grad L_t / L_t`` is ``K`` times the gradient of the
  log of the geometric mean of the losses, ``(1/K) sum_t log L_t``, and is
  parallel to the gradient of the geometric mean itself (GLS). A task with
  ``L_t <= 0`` gets weight 0.

  Args:
    num_tasks: ``K`` (static).
    axis_name: the data-parallel axis for an untyped ``jax.shard_map`` or
      ``jax.pmap``.

  Returns:
    A ``GradientTransformationExtraArgs`` with state
    :class:`mgda_jax.MethodState`; ``update`` needs ``losses=``.

  References:
    Chennupati, Sistu, Yogamani & Rawashdeh, *MultiNet++: Multi-Stream
    Feature Aggregation and Geometric Loss Strategy for Multi-Task
    Learning*, CVPR Workshops 2019, https://arxiv.org/abs/1904.08492
  """
  num_tasks = checks.check_num_tasks(num_tasks, 'realtime_loss_weighting')

  def rule(inp, inner):
    return _inverse(inp.losses), inner, _closed()

  return loss_method('realtime_loss_weighting', num_tasks, rule,
                     lambda dtype: (), needs_losses=True, axis_name=axis_name)


# ----------------------------------------------------------------------------
# DWA


class DWAInner(NamedTuple):
  """Inner state of :func:`dwa`.

  Attributes:
    loss_sum: sum of the losses over the current epoch so far.
    epoch_steps: updates in the current epoch so far.
    last: average losses of the last completed epoch, ``L(e-1)``.
    before_last: those of the epoch before, ``L(e-2)``.
    epochs: completed epochs.
  """

  loss_sum: jax.Array
  epoch_steps: jax.Array
  last: jax.Array
  before_last: jax.Array
  epochs: jax.Array


def dwa(num_tasks: int, *, temperature: float = 2.0,
        steps_per_epoch: int = 1,
        axis_name=None) -> optax.GradientTransformationExtraArgs:
  """Dynamic weight average (Liu, Johns & Davison 2019, Eq. 7).

  .. math::

    w_t(e) = \\frac{K \\exp(r_t(e-1)/T)}{\\sum_s \\exp(r_s(e-1)/T)}, \\qquad
    r_t(e-1) = \\frac{L_t(e-1)}{L_t(e-2)} ,

  with ``L_t(e)`` the average loss of task ``t`` over epoch ``e``. The
  weights are 1 for the first two epochs. Tasks whose loss falls slowly get
  more weight; equal loss ratios give uniform weights.

  Args:
    num_tasks: ``K`` (static).
    temperature: ``T > 0`` (the paper uses 2; ``inject_hyperparams``-able).
    steps_per_epoch: updates per "epoch" of loss averaging (``>= 1``). The
      paper averages over real epochs; ``1`` makes it per step.
    axis_name: the data-parallel axis for an untyped ``jax.shard_map`` or
      ``jax.pmap``.

  Returns:
    A ``GradientTransformationExtraArgs`` with state
    :class:`mgda_jax.MethodState`; ``update`` needs ``losses=``.

  References:
    Liu, Johns & Davison, *End-to-End Multi-Task Learning with Attention*,
    CVPR 2019, https://arxiv.org/abs/1803.10704
  """
  num_tasks = checks.check_num_tasks(num_tasks, 'dwa')
  checks.check_scalar('dwa', 'temperature', temperature, low=0.0,
                      low_open=True)
  checks.check_scalar('dwa', 'steps_per_epoch', steps_per_epoch, low=1,
                      integer=True)

  def init_inner(dtype):
    del dtype
    ones = jnp.ones((num_tasks,), jnp.float32)
    zero = jnp.zeros((), jnp.int32)
    return DWAInner(jnp.zeros_like(ones), zero, ones, ones, zero)

  def rule(inp, inner):
    ratio = inner.last * _inverse(inner.before_last)
    w = num_tasks * jax.nn.softmax(ratio / temperature)
    w = jnp.where(inner.epochs >= 2, w, jnp.ones_like(w))
    loss_sum = inner.loss_sum + inp.losses
    steps = inner.epoch_steps + 1
    end = steps >= steps_per_epoch
    mean = loss_sum / steps
    return w, DWAInner(
        loss_sum=jnp.where(end, 0.0, loss_sum),
        epoch_steps=jnp.where(end, 0, steps),
        last=jnp.where(end, mean, inner.last),
        before_last=jnp.where(end, inner.last, inner.before_last),
        epochs=inner.epochs + end.astype(jnp.int32)), _closed()

  return loss_method('dwa', num_tasks, rule, init_inner, needs_losses=True,
                     axis_name=axis_name)


# ----------------------------------------------------------------------------
# DTP


class DTPInner(NamedTuple):
  """Inner state of :func:`dtp`: the moving average ``kbar`` of the KPIs."""

  kpi: jax.Array


def dtp(num_tasks: int, *, gamma: float = 1.0, kpi_rate: float = 0.5,
        axis_name=None) -> optax.GradientTransformationExtraArgs:
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
    gamma: the focusing exponent, ``>= 0`` (``inject_hyperparams``-able).
    kpi_rate: ``a`` in ``[0, 1]``, the weight of the new KPI in the moving
      average.
    axis_name: the data-parallel axis for an untyped ``jax.shard_map`` or
      ``jax.pmap`` (per-device KPIs are then each device's share of the
      global mean, like the losses).

  Returns:
    A ``GradientTransformationExtraArgs`` with state
    :class:`mgda_jax.MethodState`; ``update`` needs ``kpis=``.

  References:
    Guo, Haque, Huang, Yeung & Fei-Fei, *Dynamic Task Prioritization for
    Multitask Learning*, ECCV 2018.
  """
  num_tasks = checks.check_num_tasks(num_tasks, 'dtp')
  checks.check_scalar('dtp', 'gamma', gamma, low=0.0)
  checks.check_scalar('dtp', 'kpi_rate', kpi_rate, low=0.0, high=1.0)

  def rule(inp, inner):
    kbar = jnp.where(inp.count == 0, inp.kpis,
                     kpi_rate * inp.kpis + (1.0 - kpi_rate) * inner.kpi)
    kbar = jnp.clip(kbar, 1e-6, 1.0)
    w = -((1.0 - kbar) ** gamma) * jnp.log(kbar)
    return w, DTPInner(kbar), _closed()

  return loss_method('dtp', num_tasks, rule,
                     lambda dtype: DTPInner(jnp.ones((num_tasks,),
                                                     jnp.float32)),
                     needs_kpis=True, axis_name=axis_name)


# ----------------------------------------------------------------------------
# RLW


class RLWInner(NamedTuple):
  """Inner state of :func:`rlw`: the PRNG key for the next draw."""

  key: jax.Array


def rlw(num_tasks: int, *, key=0,
        axis_name=None) -> optax.GradientTransformationExtraArgs:
  """Random loss weighting: ``w = softmax(z)``, ``z ~ N(0, I)`` every step.

  Args:
    num_tasks: ``K`` (static).
    key: PRNG key or int seed; the state carries it and splits it every
      step, so a run is reproducible.
    axis_name: the data-parallel axis for an untyped ``jax.shard_map`` or
      ``jax.pmap``.

  Returns:
    A ``GradientTransformationExtraArgs`` with state
    :class:`mgda_jax.MethodState`.

  References:
    Lin, Ye, Xu, Shi & Zhang, *Reasonable Effectiveness of Random Weighting:
    A Litmus Test for Multi-Task Learning*, TMLR 2022,
    https://arxiv.org/abs/2111.10603
  """
  num_tasks = checks.check_num_tasks(num_tasks, 'rlw')
  key0 = checks.as_key(key)

  def rule(inp, inner):
    del inp
    step_key, next_key = jax.random.split(inner.key)
    w = jax.nn.softmax(jax.random.normal(step_key, (num_tasks,), jnp.float32))
    return w, RLWInner(next_key), _closed()

  return loss_method('rlw', num_tasks, rule, lambda dtype: RLWInner(key0),
                     axis_name=axis_name)
