"""Cityscapes on the shared framework (Sener & Koltun 2018, Table 4).

What the dense experiments add to :mod:`experiments.common`: the dense
tasks (:mod:`.dense`: losses, metrics and their reduction over a split),
labels as a dict keyed by task name, the dilated ResNet-50 with one
pyramid-pooling decoder per task (:mod:`.models`; stateful, its BatchNorm
statistics are the model state), and the data (:mod:`.input_pipeline`).

Two experiments, one per on-disk format: ``OFFICIAL`` (the official
folder: semantic, instance and disparity, the paper's three tasks) and
``PREPROCESSED`` (MTAN/LibMTL's ``.npy`` folders: semantic and depth).
:func:`make_experiment` builds either, and the dense MultiMNIST scenes
(:mod:`experiments.dense_mnist`) use it unchanged.
"""

from typing import Callable, Sequence

from flax import nnx

from experiments.cityscapes import dense
from experiments.cityscapes import input_pipeline
from experiments.cityscapes import models
from experiments.cityscapes.configs import default as default_config
from experiments.cityscapes.configs import preprocessed as preprocessed_config
from experiments.common import trainer


def make_model(config, task_names, rngs):
  m = config.model
  return models.DenseNet(
      task_names, config.data.num_classes, in_channels=m.in_channels,
      encoder=m.encoder, width=m.width, decoder_width=m.decoder_width,
      bins=tuple(m.bins), rngs=rngs)


def eval_metrics(graphdef, params, x, labels, stats):
  """Each task's accumulators (:func:`dense.accumulators`), in evaluation
  mode (BatchNorm's running averages)."""
  model = nnx.merge(graphdef, params, stats)
  preds = model(x, train=False)
  num_classes = None
  out = {}
  for name, pred in zip(model.task_names, preds):
    if dense.kind(name) == 'semantic':
      num_classes = pred.shape[-1]
    out.update(dense.accumulators(name, pred, labels[name], num_classes))
  return out


def select_labels(labels: dict, tasks: Sequence[int], names):
  return {names[t]: labels[names[t]] for t in tasks}


def make_experiment(name: str, task_names: Sequence[str],
                    default_config: Callable, load_data: Callable
                    ) -> trainer.Experiment:
  """A dense experiment over ``task_names`` (kinds from :data:`dense.KINDS`).

  ``load_data(config, log) -> trainer.Splits`` with labels a dict keyed by
  task name; the config's ``model`` section and ``data.num_classes`` build
  the network.
  """
  names = tuple(task_names)
  return trainer.Experiment(
      name=name,
      default_config=default_config,
      tasks=dense.task_spec(names),
      load_data=load_data,
      make_model=make_model,
      functional=models.functional,
      eval_metrics=eval_metrics,
      kpis=lambda outputs, labels: outputs,
      stateful=True,
      select_labels=lambda labels, tasks: select_labels(labels, tasks, names),
      reduce_metrics=dense.reduce,
  )


def load_data(config, log=print) -> trainer.Splits:
  d = config.data
  if not d.cityscapes_dir:
    raise input_pipeline.CityscapesError(
        'config.data.cityscapes_dir is empty: name the folder holding '
        'Cityscapes (the official leftImg8bit/, gtFine/ and disparity/, or '
        "the preprocessed {train,val}/image/*.npy); it can't be downloaded "
        'automatically (the Cityscapes licence needs a login).')
  data = input_pipeline.load_cityscapes(
      d.cache_dir, cityscapes_dir=d.cityscapes_dir, layout=d.layout,
      height=d.height, width=d.width,
      num_classes=d.num_classes if d.layout == 'preprocessed' else None,
      max_images=d.max_images or None, seed=config.data_seed, log=log)
  expected = OFFICIAL_TASKS if d.layout == 'official' else PREPROCESSED_TASKS
  if tuple(data.tasks) != expected or data.num_classes != d.num_classes:
    raise input_pipeline.CityscapesError(
        f'{d.cityscapes_dir} holds tasks {data.tasks} with '
        f'{data.num_classes} classes; config.data.layout={d.layout!r} and '
        f'config.data.num_classes={d.num_classes} expect {expected} with '
        f'{d.num_classes}.')
  return trainer.Splits(*((s.images, s.labels) for s in
                          (data.train, data.val, data.test)))


OFFICIAL_TASKS = input_pipeline.OFFICIAL_TASKS
PREPROCESSED_TASKS = input_pipeline.PREPROCESSED_TASKS


OFFICIAL = make_experiment('cityscapes', OFFICIAL_TASKS,
                           default_config.get_config, load_data)
PREPROCESSED = make_experiment('cityscapes', PREPROCESSED_TASKS,
                               preprocessed_config.get_config, load_data)


def experiment_for(config) -> trainer.Experiment:
  """The experiment of ``config.data.layout``."""
  layout = config.data.layout
  if layout not in ('official', 'preprocessed'):
    raise ValueError("config.data.layout must be 'official' or "
                     f"'preprocessed'; got {layout!r}")
  return OFFICIAL if layout == 'official' else PREPROCESSED
