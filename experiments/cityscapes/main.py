"""Command line: train one method on Cityscapes and print its final metrics.

    python -m experiments.cityscapes --config.data.cityscapes_dir=/data/cs \\
        [--config.method=mgda_ub] [--config.epochs=100]
    python -m experiments.cityscapes \\
        --config=experiments/cityscapes/configs/preprocessed.py \\
        --config.data.cityscapes_dir=/data/cityscapes-npy

The first reads the official folder (three tasks), the second MTAN/LibMTL's
preprocessed ``.npy`` folders (two tasks). See :mod:`experiments.common.cli`
for the flags (``--help`` lists every config field and its default).
"""

import os
import sys

from experiments.cityscapes import train
from experiments.common import cli

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), 'configs',
                              'default.py')


def main(argv=None):
  return cli.run(train.OFFICIAL, DEFAULT_CONFIG,
                 sys.argv if argv is None else argv,
                 choose=train.experiment_for)


if __name__ == '__main__':
  main()
