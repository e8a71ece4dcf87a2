"""A tiny configuration for tests: two short epochs on a data subset."""

from experiments.multimnist.configs import default


def get_config():
  c = default.get_config()
  c.epochs = 2
  c.batch_size = 32
  c.chunk = 2
  c.eval_batch_size = 50
  c.max_train_examples = 256
  return c
