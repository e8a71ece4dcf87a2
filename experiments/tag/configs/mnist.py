"""TAG on the eight-task MNIST set (:mod:`experiments.tag.mnist`).

Each network (all tasks, each group, pair and single task) is the
MultiLeNet trained with the sum of its task losses (uniform weighting, as
TAG trains its groups), SGD with momentum 0.9 and learning rate 0.05 (the
MultiMNIST setup), on a 10k-image subset of the
MultiMNIST training split for 8 epochs: CPU-sized, since the protocol trains
about 80 networks. The affinity is recorded every step (TAG's CelebA code).
"""

from experiments.multimnist.configs import default as multimnist


def get_config():
  c = multimnist.get_config()
  del c['architecture']  # TAG's own network (experiments/tag/mnist.py)
  c.method = 'uniform_weighting'
  c.epochs = 8
  c.batch_size = 256
  c.max_train_examples = 10_000
  c.affinity.every = 1
  # The protocol (experiments.tag.protocol).
  c.tag = multimnist.config_lib.config_dict.ConfigDict({
      'experiment': 'mnist',
      'budgets': (2, 3, 4),
      'random_draws': 3,   # random groupings per budget
      'pairs': True,       # HOA: train every pair of tasks
      'linearized': True,  # also TAG's first-order affinity
      'representation': True,  # and the one from the gradients at Z
  })
  return c
