"""Default MultiMNIST configuration: the paper's setup, CPU-sized epochs.

The optimisation follows Sener & Koltun's code: SGD with momentum 0.9,
learning rate 0.05, batch 256, normaliser 'none' for MGDA-UB. They trained
for 100 epochs; ``epochs`` defaults to 10 so the main job finishes in
minutes on a CPU (see ``docs/RESULTS.md`` for what each figure used).
"""

from experiments.common import config as config_lib
from experiments.multimnist import input_pipeline


def get_config():
  c = config_lib.base_config()
  c.method = 'mgda_ub'
  c.epochs = 10
  c.batch_size = 256
  c.eval_batch_size = 1000
  c.optimizer.name = 'sgd'
  c.optimizer.learning_rate = 0.05
  c.optimizer.momentum = 0.9
  c.select = 'acc'  # best epoch: mean validation accuracy over the digits
  # The network: the paper's MultiLeNet, or an mgda_jax.nn architecture of
  # LeNet parts (experiments/multimnist/architectures.py).
  c.architecture = config_lib.config_dict.ConfigDict({
      'name': 'multilenet',
      'mrn_weight': 1.0,
      'mrn_every': 1,
      'groups': '',
      'experts': 3,
  })
  # Data: a folder of MNIST IDX files, else a TFDS data dir ('': TFDS's
  # default), else a verified download into download_dir (if download).
  c.data = config_lib.config_dict.ConfigDict({
      'mnist_dir': '',
      'tfds_data_dir': '',
      'download': True,
      'download_dir': 'data/mnist',
      'mirrors': input_pipeline.MIRRORS,
      'cache_dir': 'data/multimnist',
  })
  # Method settings of this experiment that differ from the library's
  # defaults (docs/RESULTS.md was made with them):
  # Nash-MTL on G / ||G||_F (an update that scales like the gradients), not
  # the library's default, the authors' raw Gram (constant-norm updates);
  c.nash_mtl.normalize = True
  # the mean-norm scale: unit weights at Z diverge at this learning rate.
  c.gradient_normalization.scale = 'mean'
  return c
