"""Command line: train one method on MultiMNIST and print its final metrics.

    python -m experiments.multimnist --config.method=mgda_ub \\
        --config.epochs=10 --config.data.mnist_dir=../shared/data/mnist

See :mod:`experiments.common.cli` for the flags (``--help`` lists every
config field and its default).
"""

import os
import sys

from experiments.common import cli
from experiments.multimnist import train

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), 'configs',
                              'default.py')


def main(argv=None):
  return cli.run(train.EXPERIMENT, DEFAULT_CONFIG,
                 sys.argv if argv is None else argv,
                 choose=train.experiment_for)


if __name__ == '__main__':
  main()
