"""TAG on CelebA: the official code's 9 attributes and network.

The TAG code's CelebA setup (google-research ``tag/celeba``): 64x64 inputs,
batch 256, its small ResNet trunk (a 3x3 stem, 3x3/2 max-pool, one
BasicBlock of 64 channels, 2x2 average pooling; ``config.model='tag'``) and
one ``Dense(2)`` head per attribute, SGD with momentum 0.9 and learning rate
5e-4, the summed loss, the affinity every step. Differences, documented: the
official code halves the learning rate every 15 epochs and stops early (then
drops the last 10 epochs' affinities); here the learning rate is constant
and all 100 epochs are averaged (``affinity.drop_last`` can drop some).

Run with the CelebA data (see ``experiments/celeba/input_pipeline.py``)::

    python -m experiments.tag --config=experiments/tag/configs/celeba.py \\
        --config.data.celeba_dir=/path/to/celeba --workdir=runs/tag-celeba
"""

from experiments.celeba import input_pipeline
from experiments.celeba.configs import default as celeba
from experiments.common import config as config_lib

ATTRIBUTES = ('5_o_Clock_Shadow', 'Black_Hair', 'Blond_Hair', 'Brown_Hair',
              'Goatee', 'Mustache', 'No_Beard', 'Rosy_Cheeks', 'Wearing_Hat')


def get_config():
  c = celeba.get_config()
  c.method = 'uniform_weighting'
  c.model = 'tag'
  c.epochs = 100
  c.batch_size = 256
  c.optimizer.name = 'sgd'
  c.optimizer.learning_rate = 5e-4
  c.optimizer.momentum = 0.9
  c.tasks = tuple(input_pipeline.ATTRIBUTES.index(a) for a in ATTRIBUTES)
  c.affinity.every = 1
  c.tag = config_lib.config_dict.ConfigDict({
      'experiment': 'celeba',
      'budgets': (2, 3, 4),
      'random_draws': 3,
      'pairs': True,
      'linearized': True,  # also TAG's first-order affinity
      'representation': True,  # and the one from the gradients at Z
  })
  return c
