"""Any registered method, built from the config, and the optimizer chain."""

import inspect
from typing import Any, Callable, NamedTuple

import jax
import optax
from ml_collections import config_dict

import mgda_jax


class Method(NamedTuple):
  """A built method: the transform, how its gradients are computed, and its
  diagnostics.

  Attributes:
    tx: ``optax.chain(method, apply_if_finite(optimizer))``, or
      ``optax.chain(method, regularizer, apply_if_finite(optimizer))``.
    grad_kind: ``'representation'`` (one forward pass, per-task gradients at
      Z, one pullback: every method but full MGDA) or ``'parameters'`` (K
      backward passes; full MGDA, whose shared/head split is the
      experiment's ``shared`` mask).
    diagnostics: ``opt_state -> (weights, solver error, solver steps)``, from
      the method's :class:`mgda_jax.MethodState`.
    base: the bare optimizer (no ``apply_if_finite``), for TAG's lookahead.
    base_state: ``opt_state -> base's state`` inside ``tx``'s state.
  """

  tx: optax.GradientTransformationExtraArgs
  grad_kind: str
  diagnostics: Callable[[Any], tuple]
  base: optax.GradientTransformation
  base_state: Callable[[Any], Any]


def learning_rate(c: config_dict.ConfigDict, steps_per_epoch: int = 1):
  """The learning rate, or its step decay: ``lr * decay_factor **
  floor(epoch / decay_every)`` (e.g. the paper's Cityscapes schedule, x0.85
  every 10 epochs)."""
  o = c.optimizer
  if not o.decay_every:
    return o.learning_rate
  return optax.exponential_decay(
      o.learning_rate, transition_steps=o.decay_every * steps_per_epoch,
      decay_rate=o.decay_factor, staircase=True)


def base_optimizer(c: config_dict.ConfigDict, steps_per_epoch: int = 1
                   ) -> optax.GradientTransformation:
  """``config.optimizer``: SGD with momentum, or Adam."""
  o = c.optimizer
  lr = learning_rate(c, steps_per_epoch)
  if o.name == 'sgd':
    return optax.sgd(lr, momentum=o.momentum)
  return optax.adam(lr)


def optimizer(c: config_dict.ConfigDict, steps_per_epoch: int = 1
              ) -> optax.GradientTransformation:
  """The base optimizer, skipping non-finite steps (``apply_if_finite``)."""
  return optax.apply_if_finite(base_optimizer(c, steps_per_epoch),
                               max_consecutive_errors=c.max_consecutive_nonfinite)


def method_kwargs(c: config_dict.ConfigDict, name: str, *,
                  steps_per_epoch: int, extra: dict[str, Any]
                  ) -> dict[str, Any]:
  """The factory's keyword arguments: the config section, the seed for
  stochastic methods, the epoch length where a method takes it, and what
  the experiment supplies (``extra``, e.g. ``priors``)."""
  spec = mgda_jax.method_spec(name)
  kwargs = dict(c[name].to_dict())
  if 'weights' in kwargs:
    if kwargs['weights']:
      kwargs['weights'] = jax.numpy.asarray(kwargs['weights'], 'float32')
    else:
      del kwargs['weights']  # make_method's default: ones
  params = inspect.signature(spec.factory).parameters
  if 'key' in params:
    kwargs['key'] = c.seed
  if 'steps_per_epoch' in params:
    kwargs['steps_per_epoch'] = steps_per_epoch
  kwargs.update(extra)
  return kwargs


def build(c: config_dict.ConfigDict, num_tasks: int, *, steps_per_epoch: int,
          shared: Callable[[Any], Any], extra: dict[str, Any] | None = None,
          regularizer: optax.GradientTransformation | None = None) -> Method:
  """Builds ``c.method`` (``single_task`` trains with uniform weights);
  ``regularizer`` (e.g. MRN's prior) adds to the method's update."""
  name = 'uniform_weighting' if c.method == 'single_task' else c.method
  kwargs = method_kwargs(c, name, steps_per_epoch=steps_per_epoch,
                         extra=(extra or {}).get(name, {}))
  # Full MGDA is the one method run on the parameter gradients; every other
  # one (MGDA-UB's way) on the gradients at the representation.
  grad_kind = 'parameters' if name == 'mgda' else 'representation'
  if grad_kind == 'parameters':
    kwargs['shared'] = shared
  tx = mgda_jax.make_method(name, num_tasks, **kwargs)

  def diagnostics(state):
    return state[0].weights, state[0].info.error, state[0].info.num_steps

  def base_state(state):
    return state[-1].inner_state  # chain(method, ..., apply_if_finite(base))

  parts = (tx,) + (() if regularizer is None else (regularizer,))
  return Method(optax.chain(*parts, optimizer(c, steps_per_epoch)), grad_kind,
                diagnostics, base_optimizer(c, steps_per_epoch), base_state)
