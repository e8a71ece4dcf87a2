"""Command line: train one method on MultiMNIST and print its final metrics.

    python -m experiments.multimnist --method mgda_ub --epochs 10 \\
        --mnist-dir ../shared/data/mnist --workdir runs/multimnist/mgda_ub-0

Prints a progress bar per epoch, a line of validation and test accuracies
after each, and, last, one JSON line: the test accuracies of the epoch with
the best mean validation accuracy. Re-running the same command after an
interruption resumes from the last checkpoint in ``--workdir``.
"""

import argparse
import dataclasses
import json
import sys

from experiments.multimnist import input_pipeline
from experiments.multimnist import train
from experiments.multimnist.configs import default
from experiments.multimnist.configs import test as test_config


def parse_args(argv=None):
  d = default.Config()
  p = argparse.ArgumentParser(
      prog='python -m experiments.multimnist',
      description=__doc__.splitlines()[0])
  p.add_argument('--method', default=d.method, choices=default.METHODS)
  p.add_argument('--epochs', type=int, default=d.epochs)
  p.add_argument('--seed', type=int, default=d.seed)
  p.add_argument('--data-seed', type=int, default=d.data_seed)
  p.add_argument('--batch-size', type=int, default=d.batch_size)
  p.add_argument('--devices', type=int, default=d.devices,
                 help='data parallelism: shard each batch over this many '
                 'devices (0: all visible devices)')
  p.add_argument('--learning-rate', type=float, default=d.learning_rate)
  p.add_argument('--normalizer', default=d.normalizer,
                 choices=('none', 'l2', 'loss', 'loss+'))
  p.add_argument('--gradnorm-alpha', type=float, default=d.gradnorm_alpha)
  p.add_argument('--mnist-dir', default=None,
                 help='folder with the four MNIST IDX files (.gz or not)')
  p.add_argument('--tfds-data-dir', default=None,
                 help='TFDS data dir with prepared mnist (default: TFDS\'s)')
  p.add_argument('--cache-dir', default=d.cache_dir)
  p.add_argument('--workdir', default=None,
                 help='default: runs/multimnist/<method>-seed<seed>')
  p.add_argument('--config', choices=('default', 'test'), default='default',
                 help="'test': a tiny CPU-sized run for smoke tests")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  overrides = dict(
      method=args.method, epochs=args.epochs, seed=args.seed,
      data_seed=args.data_seed, batch_size=args.batch_size,
      learning_rate=args.learning_rate, normalizer=args.normalizer,
      gradnorm_alpha=args.gradnorm_alpha, mnist_dir=args.mnist_dir,
      tfds_data_dir=args.tfds_data_dir, cache_dir=args.cache_dir,
      devices=args.devices)
  module = test_config if args.config == 'test' else default
  try:
    config = module.get_config(**overrides)
    train.check_devices(config)
  except ValueError as e:
    sys.exit(f'error: {e}')
  workdir = args.workdir or f'runs/multimnist/{config.method}-seed{config.seed}'
  print(json.dumps({'config': dataclasses.asdict(config),
                    'workdir': workdir}), flush=True)
  try:
    result = train.train_and_evaluate(config, workdir)
  except input_pipeline.MnistError as e:
    sys.exit(f'error: {e}')
  print(json.dumps(result), flush=True)
  return result


if __name__ == '__main__':
  main()
