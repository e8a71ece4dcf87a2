"""Default dense MultiMNIST configuration: CPU-sized.

The Cityscapes setup (:mod:`experiments.cityscapes.configs.default`) with
the small encoder (output stride 4), narrow decoders, 64x128 scenes, Adam
at 1e-3, batch 32, 8 epochs (a few CPU-minutes a run); MGDA-UB with the
'none' normaliser.
"""

from experiments.cityscapes.configs import default as cityscapes
from experiments.common import config as config_lib
from experiments.multimnist import input_pipeline as mnist_pipeline


def get_config():
  c = cityscapes.get_config()
  c.epochs = 8
  c.batch_size = 32
  c.eval_batch_size = 250
  c.optimizer.learning_rate = 1e-3
  c.optimizer.decay_every = 0
  c.optimizer.decay_factor = 1.0
  c.model.encoder = 'small'
  c.model.in_channels = 1
  c.model.width = 8
  c.model.decoder_width = 16
  c.data = config_lib.config_dict.ConfigDict({
      'mnist_dir': '',
      'tfds_data_dir': '',
      'download': True,
      'download_dir': 'data/mnist',
      'mirrors': mnist_pipeline.MIRRORS,
      'height': 64,
      'width': 128,
      'sizes': (6_000, 1_000, 2_000),  # train, validation, test scenes
      'max_digits': 5,
      'min_size': 24,    # digit sizes in pixels (square)
      'max_size': 48,
      'num_classes': 11,
      'cache_dir': 'data/dense-mnist',
  })
  return c
