"""CelebA on the shared framework (Sener & Koltun 2018, Table 1).

What this dataset adds to :mod:`experiments.common`: 40 binary attribute
tasks (error and NLL, reported as the mean error over attributes), the data
(:mod:`.input_pipeline`), the ResNet-18 with BatchNorm (:mod:`.models`; a
stateful experiment: the BatchNorm statistics are the model state), the
evaluation metrics and batch KPIs, and the prior of
``prior_loss_weighting``.
"""

from flax import nnx
import jax.numpy as jnp

from experiments.celeba import input_pipeline
from experiments.celeba import models
from experiments.celeba.configs import default as default_config
from experiments.common import tasks as tasks_lib
from experiments.common import trainer

TASKS = tasks_lib.TaskSpec(
    names=input_pipeline.ATTRIBUTES,
    metrics=(tasks_lib.Metric('err', False, 'error'),
             tasks_lib.Metric('acc', True, 'accuracy'),
             tasks_lib.Metric('loss', False, 'NLL')),
    table_metric='err')


def load_data(config, log=print) -> trainer.Splits:
  d = config.data
  data = input_pipeline.load_celeba(
      d.cache_dir, celeba_dir=d.celeba_dir or None,
      tfds_data_dir=d.tfds_data_dir or None, log=log)
  return trainer.Splits(*((s.images, s.labels) for s in data))


def make_model(config, task_names, rngs):
  return models.FaceNet(task_names, rngs=rngs, small=config.model == 'tag')


def eval_metrics(graphdef, params, x, y, stats):
  """Error, accuracy and NLL sums per task; BatchNorm's running averages."""
  logits = nnx.merge(graphdef, params, stats)(x, train=False)  # (K, B, 2)
  correct = jnp.sum(jnp.argmax(logits, -1) == y.T, axis=1)
  return {'loss': models.nll_per_task(logits, y) * x.shape[0],
          'acc': correct, 'err': x.shape[0] - correct}


def kpis(logits, labels):
  return jnp.mean(jnp.argmax(logits, -1) == labels.T, axis=1)


def method_args(config, data, tasks):
  """Each attribute's prior loss: the entropy of its label frequencies."""
  del config
  return tasks_lib.classification_priors(data.train[1], tasks, 2)


EXPERIMENT = trainer.Experiment(
    name='celeba',
    default_config=default_config.get_config,
    tasks=TASKS,
    load_data=load_data,
    make_model=make_model,
    functional=models.functional,
    eval_metrics=eval_metrics,
    kpis=kpis,
    method_args=method_args,
    stateful=True,
)
