"""A multi-task MNIST set for TAG: eight tasks of varied relatedness.

Every label is derived from the two digits of a MultiMNIST image (Sener &
Koltun's overlay, :mod:`experiments.multimnist.input_pipeline`):

============  =======  ==========================================
task          classes  label
============  =======  ==========================================
left          10       the left digit ``l``
right         10       the right digit ``r``
left_odd      2        ``l`` is odd
right_odd     2        ``r`` is odd
left_ge5      2        ``l >= 5``
right_ge5     2        ``r >= 5``
sum_ge10      2        ``l + r >= 10``
same          2        ``l == r`` (about 10% positive)
============  =======  ==========================================

So the set has close relatives (a digit and its parity or magnitude), tasks
that need both digits (``sum_ge10``, ``same``) and tasks that share nothing
but the image (the two sides). The network is the MultiLeNet (shared LeNet
trunk, one head per task); a binary head's logits beyond its two classes
are masked out, so its loss is a two-class cross-entropy.
"""

from typing import Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import tasks as tasks_lib
from experiments.common import trainer
from experiments.multimnist import input_pipeline
from experiments.multimnist import models
from experiments.multimnist import train as multimnist
from experiments.tag.configs import mnist as mnist_config

NAMES = ('left', 'right', 'left_odd', 'right_odd', 'left_ge5', 'right_ge5',
         'sum_ge10', 'same')
NUM_CLASSES = dict(zip(NAMES, (10, 10, 2, 2, 2, 2, 2, 2)))

TASKS = tasks_lib.TaskSpec(
    names=NAMES,
    metrics=(tasks_lib.Metric('acc', True, 'accuracy'),
             tasks_lib.Metric('loss', False, 'NLL')),
    table_metric='acc')


def derive_labels(digits: np.ndarray) -> np.ndarray:
  """``(N, 2)`` left/right digits -> ``(N, 8)`` labels, in :data:`NAMES`
  order."""
  l, r = digits[:, 0].astype(np.int64), digits[:, 1].astype(np.int64)
  cols = (l, r, l % 2, r % 2, l >= 5, r >= 5, l + r >= 10, l == r)
  return np.stack(cols, axis=1).astype(np.int32)


def load_data(config, log=print) -> trainer.Splits:
  data = multimnist.load_data(config, log)
  return trainer.Splits(*((s.images, derive_labels(s.labels)) for s in data))


class TaskLeNet(models.MultiLeNet):
  """MultiLeNet whose head ``t`` has ``num_classes[t]`` classes (logits past
  them are masked to a large negative value)."""

  def __init__(self, task_names: Sequence[str],
               num_classes: Sequence[int], *, rngs: nnx.Rngs):
    super().__init__(task_names, max(num_classes), rngs=rngs)
    self.num_classes = tuple(int(c) for c in num_classes)

  def mask(self, logits):
    c = jnp.arange(logits.shape[-1])
    valid = c[None, :] < jnp.asarray(self.num_classes)[:, None]  # (K, C)
    return jnp.where(valid[:, None, :], logits, -1e9)

  def __call__(self, x, *, key=None, train: bool = False):
    return self.mask(super().__call__(x, key=key, train=train))


def make_model(config, task_names, rngs):
  del config
  return TaskLeNet(task_names, [NUM_CLASSES[n] for n in task_names],
                   rngs=rngs)


def functional(model: TaskLeNet):
  """As :func:`experiments.multimnist.models.functional`, with the mask."""
  graphdef, params = nnx.split(model)

  def encode(params, x, labels, key):
    del labels
    m = nnx.merge(graphdef, params)
    return m.encoder(x, key=jax.random.fold_in(key, 0), train=True)

  def task_losses(params, z, x, labels, key):
    del x
    m = nnx.merge(graphdef, params)
    logits = m.mask(m.heads(z, key=jax.random.fold_in(key, 1), train=True))
    return models.nll_per_task(logits, labels), logits

  return graphdef, params, encode, task_losses


EXPERIMENT = trainer.Experiment(
    name='tag-mnist',
    default_config=mnist_config.get_config,
    tasks=TASKS,
    load_data=load_data,
    make_model=make_model,
    functional=functional,
    eval_metrics=multimnist.eval_metrics,
    kpis=multimnist.kpis,
)
