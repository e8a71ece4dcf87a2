"""The public registry of methods: one entry per method, iterated everywhere.

Tests, experiments and benchmarks read this table, so adding a method is one
module plus one entry here. Each :class:`MethodSpec` says what a method is
(family, paper), what it needs from ``update`` (``losses=``, ``kpis=``), which
inputs it accepts, its numeric hyperparameters with their defaults (read off
the factory's signature, so they cannot drift), whether it is stochastic,
and whether it is scale-equivariant, ``d(c J) = c d(J)`` for ``c > 0``.
"""

import inspect
from typing import Any, Callable, Mapping, NamedTuple

import jax.numpy as jnp
import optax

from mgda_jax._src.aggregators import aligned_mtl
from mgda_jax._src.aggregators import cagrad
from mgda_jax._src.aggregators import graddrop
from mgda_jax._src.aggregators import gradient_normalization
from mgda_jax._src.aggregators import imtl
from mgda_jax._src.aggregators import jacobian_descent
from mgda_jax._src.aggregators import mgda
from mgda_jax._src.aggregators import nash_mtl
from mgda_jax._src.aggregators import pcgrad
from mgda_jax._src.weightings import basic
from mgda_jax._src.weightings import famo
from mgda_jax._src.weightings import loss_balancing

BOTH = ('representation', 'per_task')
NOT_HYPERPARAMETERS = ('num_tasks', 'axis_name', 'shared', 'key', 'weights',
                       'priors')


class MethodSpec(NamedTuple):
  """One registered method.

  Attributes:
    name: the registry key, the factory's public name.
    factory: the factory, ``factory(num_tasks, **hyperparams)`` (except
      ``fixed_weighting(weights)`` and ``prior_loss_weighting(priors)``;
      :func:`make_method` handles both).
    family: ``'gradient'`` (weights from the task gradients; the shared part
      gets ``sum_t w_t g_t``, heads their own gradient) or ``'loss'`` (the
      gradient of ``sum_t w_t L_t``).
    inputs: the accepted inputs: ``'representation'`` (a
      :class:`mgda_jax.RepresentationGrads`) and/or ``'per_task'``.
    needs: extra ``update`` arguments required: ``'losses'``, ``'kpis'``.
    hyperparams: numeric hyperparameters and their defaults (each live under
      ``optax.inject_hyperparams``).
    stochastic: takes ``key=`` and draws at every step.
    scale_equivariant: ``d(c J) = c d(J)`` for ``c > 0`` with the default
      hyperparameters (the update follows the gradients' scale).
    paper: the reference.
    required: arguments without defaults besides ``num_tasks`` (name ->
      meaning).
  """

  name: str
  factory: Callable[..., optax.GradientTransformationExtraArgs]
  family: str
  inputs: tuple
  needs: tuple
  hyperparams: Mapping[str, Any]
  stochastic: bool
  scale_equivariant: bool
  paper: str
  required: Mapping[str, str]


def _hyperparams(factory) -> dict:
  out = {}
  for name, p in inspect.signature(factory).parameters.items():
    if name in NOT_HYPERPARAMETERS or p.default is inspect.Parameter.empty:
      continue
    if isinstance(p.default, bool) or not isinstance(p.default, (int, float)):
      continue
    out[name] = p.default
  return out


def _spec(factory, family, paper, *, inputs=BOTH, needs=(),
          stochastic=False, scale_equivariant=True, required=None):
  return MethodSpec(factory.__name__, factory, family, inputs, tuple(needs),
                    _hyperparams(factory), stochastic, scale_equivariant,
                    paper, dict(required or {}))


_G, _L = 'gradient', 'loss'
_LOSSES = ('losses',)

METHODS: Mapping[str, MethodSpec] = {s.name: s for s in (
    _spec(basic.uniform_weighting, _L, 'uniform (sum of the losses)'),
    _spec(basic.fixed_weighting, _L, 'fixed weights',
          required={'weights': 'the K task weights'}),
    _spec(loss_balancing.initial_loss_weighting, _L,
          'Vandenhende et al. 2021 (survey)', needs=_LOSSES),
    _spec(loss_balancing.prior_loss_weighting, _L,
          'Vandenhende et al. 2021 (survey)',
          required={'priors': 'the K prior losses'}),
    _spec(loss_balancing.realtime_loss_weighting, _L,
          'Chennupati et al. 2019 (GLS)', needs=_LOSSES),
    _spec(basic.uncertainty_weighting, _L, 'Kendall et al. 2018',
          needs=_LOSSES),
    _spec(loss_balancing.dwa, _L, 'Liu et al. 2019 (MTAN)', needs=_LOSSES),
    _spec(loss_balancing.dtp, _L, 'Guo et al. 2018', needs=('kpis',)),
    _spec(loss_balancing.lbtw, _L, 'Liu et al. 2019', needs=_LOSSES),
    _spec(loss_balancing.rlw, _L, 'Lin et al. 2022', stochastic=True),
    _spec(famo.famo, _L, 'Liu et al. 2023', needs=_LOSSES),
    _spec(basic.gradnorm, _L, 'Chen et al. 2018', needs=_LOSSES,
          scale_equivariant=False),  # its weights adapt to the norms
    _spec(mgda.mgda, _G, 'Sener & Koltun 2018'),
    _spec(mgda.mgda_ub, _G, 'Sener & Koltun 2018',
          inputs=('representation',)),
    _spec(gradient_normalization.gradient_normalization, _G,
          'Vandenhende et al. 2021 (survey)',
          scale_equivariant=False),  # scale='unit': unit-norm gradients
    _spec(pcgrad.pcgrad, _G, 'Yu et al. 2020', stochastic=True),
    _spec(graddrop.graddrop, _G, 'Chen et al. 2020', stochastic=True),
    _spec(pcgrad.gradvac, _G, 'Wang et al. 2021', stochastic=True),
    _spec(cagrad.cagrad, _G, 'Liu et al. 2021'),
    _spec(imtl.imtl_g, _G, 'Liu et al. 2021 (IMTL)'),
    _spec(nash_mtl.nash_mtl, _G, 'Navon et al. 2022',
          scale_equivariant=False),  # ||d|| = sqrt(K) (normalize=False)
    _spec(aligned_mtl.aligned_mtl, _G, 'Senushkin et al. 2023'),
    _spec(jacobian_descent.upgrad, _G, 'Quinton & Rey 2024'),
    _spec(jacobian_descent.dualproj, _G, 'Quinton & Rey 2024'),
)}


def method_spec(name: str) -> MethodSpec:
  """The :class:`MethodSpec` of ``name``, or a clear error listing them all."""
  if name not in METHODS:
    raise ValueError(f'Unknown method {name!r}; registered methods: '
                     f'{sorted(METHODS)}.')
  return METHODS[name]


def make_method(name: str, num_tasks: int, **kwargs
                ) -> optax.GradientTransformationExtraArgs:
  """Builds a registered method for ``num_tasks`` tasks.

  ``fixed_weighting`` defaults to ones (uniform weighting) and
  ``prior_loss_weighting`` needs ``priors=``.

  Args:
    name: a key of :data:`METHODS`.
    num_tasks: ``K``.
    **kwargs: the factory's keyword arguments (hyperparameters, ``key``,
      ``shared``, ``axis_name``, ...).

  Returns:
    The transform.

  Raises:
    ValueError: for an unknown name or an argument the factory does not
      take.

  Example:
    >>> import mgda_jax
    >>> tx = mgda_jax.make_method('cagrad', 3, c=0.5)
    >>> sorted(mgda_jax.METHODS['cagrad'].hyperparams)
    ['c', 'max_steps', 'tol']
  """
  spec = method_spec(name)
  params = inspect.signature(spec.factory).parameters
  unknown = set(kwargs) - set(params)
  if unknown:
    raise ValueError(f'{name} takes no argument(s) {sorted(unknown)}; it takes '
                     f'{sorted(p for p in params if p != "num_tasks")}.')
  if name == 'fixed_weighting':
    weights = kwargs.pop('weights', jnp.ones((num_tasks,), jnp.float32))
    return spec.factory(weights, **kwargs)
  if name == 'prior_loss_weighting':
    if 'priors' not in kwargs:
      raise ValueError('prior_loss_weighting needs priors=<the K prior '
                       'losses> (see mgda_jax.classification_prior).')
    return spec.factory(kwargs.pop('priors'), **kwargs)
  return spec.factory(num_tasks, **kwargs)
