"""A tiny dense MultiMNIST configuration for tests."""

from experiments.dense_mnist.configs import default


def get_config():
  c = default.get_config()
  c.epochs = 1
  c.batch_size = 4
  c.eval_batch_size = 4
  c.chunk = 1
  c.model.width = 4
  c.model.decoder_width = 8
  c.model.bins = (1, 2)
  c.data.height, c.data.width = 32, 64
  c.data.sizes = (16, 8, 8)
  c.data.min_size, c.data.max_size = 12, 24
  return c
