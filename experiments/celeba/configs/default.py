"""Default CelebA configuration: the paper's setup (Sener & Koltun 2018).

64x64 inputs, ResNet-18 to a 2048-d representation, 40 binary heads with
NLL, Adam with learning rate 5e-4, batch 256, MGDA-UB with the 'loss+'
normaliser, 100 epochs; the best epoch by the mean validation error.
"""

from experiments.common import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.method = 'mgda_ub'
  c.epochs = 100
  c.batch_size = 256
  c.eval_batch_size = 500
  c.optimizer.name = 'adam'
  c.optimizer.learning_rate = 5e-4
  c.select = 'err'
  c.model = 'resnet18'  # or 'tag': the TAG code's one-block trunk
  c.mgda_ub.normalizer = 'loss+'
  # Data: a folder of the official files (first choice), else TFDS.
  c.data = config_lib.config_dict.ConfigDict({
      'celeba_dir': '',
      'tfds_data_dir': '',
      'cache_dir': 'data/celeba',
  })
  return c
