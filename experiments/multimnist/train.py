"""MultiMNIST on the shared framework (Sener & Koltun 2018, Table 3).

What this dataset adds to :mod:`experiments.common`: its task spec (two
digits, accuracy and NLL), the data (:mod:`.input_pipeline`), the model
(:mod:`.models`), evaluation metrics and batch KPIs, and the prior of
``prior_loss_weighting``. ``train_and_evaluate(config, workdir)`` trains one
method and returns the test figures of the best-validation epoch.
"""

import dataclasses
from typing import Any, Callable

from flax import nnx
import jax.numpy as jnp

from experiments.common import config as config_lib
from experiments.common import tasks as tasks_lib
from experiments.common import trainer
from experiments.multimnist import architectures
from experiments.multimnist import input_pipeline
from experiments.multimnist import models
from experiments.multimnist.configs import default as default_config

TASKS = tasks_lib.TaskSpec(
    names=('left', 'right'),
    metrics=(tasks_lib.Metric('acc', True, 'accuracy'),
             tasks_lib.Metric('loss', False, 'NLL')),
    table_metric='acc')


def load_data(config, log=print) -> input_pipeline.MultiMnist:
  d = config.data
  return input_pipeline.load_multimnist(
      d.cache_dir, config.data_seed, mnist_dir=d.mnist_dir or None,
      tfds_data_dir=d.tfds_data_dir or None,
      download_dir=d.download_dir if d.download else None,
      mirrors=tuple(d.mirrors), log=log)


def make_model(config, task_names, rngs):
  del config
  return models.MultiLeNet(task_names, 10, rngs=rngs)


def eval_metrics(graphdef, params, x, y):
  """NLL and accuracy sums per task, dropout off."""
  return models.metric_sums(nnx.merge(graphdef, params)(x, train=False), y)


def kpis(logits, labels):
  """Batch accuracy per task: the KPI of DTP (ignored by other methods)."""
  return jnp.mean(jnp.argmax(logits, -1) == labels.T, axis=1)


def method_args(config, data, tasks):
  """The prior loss of each digit: the entropy of its class frequencies in
  the training labels (log 10 for MultiMNIST's balanced digits)."""
  del config
  return tasks_lib.classification_priors(data.train[1], tasks, 10)


EXPERIMENT = trainer.Experiment(
    name='multimnist',
    default_config=default_config.get_config,
    tasks=TASKS,
    load_data=load_data,
    make_model=make_model,
    functional=models.functional,
    eval_metrics=eval_metrics,
    kpis=kpis,
    method_args=method_args,
    # Chunks of 15 scanned steps on CPU too: the MultiLeNet's convolution
    # gradients are in XLA:CPU's fast layout inside lax.scan
    # (models.conv_nhwc_grads), and the records equal a step per call's.
    cpu_chunk=15,
)


# Architecture fields and the architecture they belong to.
ARCHITECTURE_FIELDS = {'mrn_weight': 'mrn', 'mrn_every': 'mrn',
                       'groups': 'branched', 'experts': 'mmoe'}


def experiment_for(config) -> trainer.Experiment:
  """The experiment of ``config.architecture`` (the MultiLeNet by default,
  else an :mod:`mgda_jax.nn` architecture of LeNet parts).

  Raises:
    ValueError: for an unknown architecture, or an architecture field set
      for another architecture (it would be ignored).
  """
  a = config.architecture
  if a.name not in architectures.NAMES:
    raise ValueError(f'config.architecture.name must be one of '
                     f'{architectures.NAMES}; got {a.name!r}')
  defaults = default_config.get_config().architecture
  for field, owner in ARCHITECTURE_FIELDS.items():
    if a[field] != defaults[field] and a.name != owner:
      raise ValueError(
          f'config.architecture.{field}={a[field]!r} is set, but '
          f'config.architecture.name is {a.name!r}: it applies to '
          f'{owner!r} only and would be ignored.')
  if not a.mrn_weight >= 0 or a.mrn_every < 1:
    raise ValueError('config.architecture.mrn_weight must be >= 0 and '
                     'config.architecture.mrn_every >= 1; got '
                     f'{a.mrn_weight}, {a.mrn_every}')
  if a.experts < 1:
    raise ValueError('config.architecture.experts must be >= 1; got '
                     f'{a.experts}')
  if a.name == 'branched':
    try:
      nnx.eval_shape(lambda: architectures.build(config, TASKS.names,
                                                 nnx.Rngs(0)))
    except ValueError as e:
      raise ValueError(f'config.architecture.groups={a.groups!r}: {e}') from e
  if a.name == 'multilenet':
    return EXPERIMENT
  names = tuple(TASKS.names[t] for t in config_lib.task_indices(
      config, len(TASKS.names)))
  return dataclasses.replace(
      EXPERIMENT,
      make_model=lambda config, task_names, rngs: architectures.build(
          config, task_names, rngs),
      functional=architectures.functional,
      z_copies='tuple',
      eval_metrics=architectures.eval_metrics,
      shared=architectures.shared_mask(config, names),
      regularizer=architectures.regularizer,
      # MTAN's step (LayerNorm, 1x1 and padded convolutions) runs 4.5x
      # slower inside lax.scan on XLA:CPU: a step per call. The others
      # scan as fast or faster, with the same records (BENCHMARKS.md).
      cpu_chunk=1 if a.name == 'mtan' else 15)


def train_and_evaluate(config, workdir: str,
                       data: input_pipeline.MultiMnist | None = None,
                       log: Callable[[str], None] = print,
                       force: bool = False) -> dict[str, Any]:
  """Trains one method; returns the best-validation epoch's test metrics."""
  return trainer.train_and_evaluate(experiment_for(config), config, workdir,
                                    data=data, force=force, log=log)
