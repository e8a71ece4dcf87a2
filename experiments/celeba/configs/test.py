"""A tiny CelebA configuration for tests: one short epoch, the small trunk."""

from experiments.celeba.configs import default


def get_config():
  c = default.get_config()
  c.epochs = 1
  c.batch_size = 8
  c.chunk = 1
  c.eval_batch_size = 8
  c.model = 'tag'
  return c
