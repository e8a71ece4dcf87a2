"""Command line: train one method on CelebA and print its final metrics.

    python -m experiments.celeba --config.data.celeba_dir=/path/to/celeba \\
        [--config.method=mgda_ub] [--config.epochs=100]

See :mod:`experiments.common.cli` for the flags (``--help`` lists every
config field and its default).
"""

import os
import sys

from experiments.celeba import train
from experiments.common import cli

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), 'configs',
                              'default.py')


def main(argv=None):
  return cli.run(train.EXPERIMENT, DEFAULT_CONFIG,
                 sys.argv if argv is None else argv)


if __name__ == '__main__':
  main()
