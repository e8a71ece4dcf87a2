"""Dense MultiMNIST scenes on the Cityscapes code path.

The experiment is :func:`experiments.cityscapes.train.make_experiment` over
the scenes of :mod:`.input_pipeline`: the same three tasks (semantic,
instance, disparity), losses, metrics, decoders and training step as
Cityscapes, with the small encoder on one-channel 64x128 canvases. A
workload with real images that runs on a CPU; not a Cityscapes result.
"""

from experiments.cityscapes import train as cityscapes
from experiments.common import trainer
from experiments.dense_mnist import input_pipeline
from experiments.dense_mnist.configs import default as default_config


def load_data(config, log=print) -> trainer.Splits:
  d = config.data
  data = input_pipeline.load_dense_mnist(
      d.cache_dir, config.data_seed, sizes=tuple(d.sizes),
      mnist_dir=d.mnist_dir or None, tfds_data_dir=d.tfds_data_dir or None,
      download_dir=d.download_dir if d.download else None,
      mirrors=tuple(d.mirrors), log=log, height=d.height, width=d.width,
      max_digits=d.max_digits, min_size=d.min_size, max_size=d.max_size)
  return trainer.Splits(*((s.images, s.labels) for s in data))


EXPERIMENT = cityscapes.make_experiment(
    'dense_mnist', input_pipeline.TASKS, default_config.get_config, load_data)
