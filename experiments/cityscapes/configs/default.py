"""Default Cityscapes configuration: the paper's setup (Sener & Koltun 2018).

The official folder (semantic, instance, disparity) at 256x512; a dilated
ResNet-50 with one pyramid-pooling decoder per task; Adam, learning rate
5e-4 times 0.85 every 10 epochs, batch 8, 100 epochs; MGDA-UB with the
'none' normaliser. Epochs are selected by the mean validation loss.
"""

from ml_collections import config_dict

from experiments.common import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.method = 'mgda_ub'
  c.epochs = 100
  c.batch_size = 8
  c.eval_batch_size = 8
  c.optimizer.name = 'adam'
  c.optimizer.learning_rate = 5e-4
  c.optimizer.decay_every = 10
  c.optimizer.decay_factor = 0.85
  c.mgda_ub.normalizer = 'none'
  c.select = 'loss'
  c.model = config_dict.ConfigDict({
      'encoder': 'resnet50',   # or 'small' (CPU runs)
      'in_channels': 3,
      'width': 16,             # the small encoder's width
      'decoder_width': 512,
      'bins': (1, 2, 3, 6),
  })
  c.data = config_dict.ConfigDict({
      'cityscapes_dir': '',
      'layout': 'official',    # or 'preprocessed' (configs/preprocessed.py)
      'height': 256,
      'width': 512,
      'num_classes': 19,
      'max_images': 0,         # per split; 0: all
      'cache_dir': 'data/cityscapes',
  })
  return c
