"""Command line: train one method on the dense MultiMNIST scenes.

    python -m experiments.dense_mnist --config.data.mnist_dir=DIR \\
        [--config.method=mgda_ub] [--config.epochs=10]

See :mod:`experiments.common.cli` for the flags (``--help`` lists every
config field and its default).
"""

import os
import sys

from experiments.common import cli
from experiments.dense_mnist import train

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), 'configs',
                              'default.py')


def main(argv=None):
  return cli.run(train.EXPERIMENT, DEFAULT_CONFIG,
                 sys.argv if argv is None else argv)


if __name__ == '__main__':
  main()
