"""A tiny Cityscapes configuration for tests: the small encoder, one epoch."""

from experiments.cityscapes.configs import default


def get_config():
  c = default.get_config()
  c.epochs = 1
  c.batch_size = 2
  c.eval_batch_size = 2
  c.chunk = 1
  c.model.encoder = 'small'
  c.model.width = 4
  c.model.decoder_width = 8
  c.model.bins = (1, 2)
  c.data.height, c.data.width = 32, 64
  return c
