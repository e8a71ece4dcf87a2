"""Command line: TAG's protocol on the eight-task MNIST set, or CelebA.

    python -m experiments.tag --config.data.mnist_dir=../shared/data/mnist \\
        [--config=experiments/tag/configs/mnist.py] [--workdir=runs/tag-mnist]
    python -m experiments.tag --config=experiments/tag/configs/celeba.py \\
        --config.data.celeba_dir=/path/to/celeba --workdir=runs/tag-celeba

Writes ``tag.json`` (every figure), ``table.md`` and ``affinity_TAG.png``
/ ``affinity_CS.png`` into the workdir; re-running resumes (each network is
a resumable run under ``<workdir>/runs``). ``--help`` lists the config
fields.
"""

import json
import os
import runpy
import sys

from experiments.common import cli
from experiments.common import config as config_lib
from experiments.common import download
from experiments.tag import mnist
from experiments.tag import protocol


def experiment_of(argv):
  """The experiment the ``--config`` file names (``config.tag.experiment``)."""
  from experiments.celeba import train as celeba  # pylint: disable=import-outside-toplevel
  experiments = {'mnist': mnist.EXPERIMENT, 'celeba': celeba.EXPERIMENT}
  path = DEFAULT_CONFIG
  for n, a in enumerate(argv[1:], start=1):
    if a.startswith('--config='):
      path = a.split('=', 1)[1]
    elif a == '--config' and n + 1 < len(argv):
      path = argv[n + 1]
  path = path.split(':', 1)[0]  # config_flags' "file:arguments" form
  try:
    name = runpy.run_path(path)['get_config']().tag.experiment
  except Exception as e:  # pylint: disable=broad-except
    sys.exit(f'error: cannot read config.tag.experiment from {path}: '
             f'{type(e).__name__}: {e}')
  if name not in experiments:
    sys.exit(f'error: config.tag.experiment must be one of '
             f'{sorted(experiments)}; got {name!r}')
  return experiments[name]

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), 'configs',
                              'mnist.py')


def main(argv=None):
  argv = list(sys.argv if argv is None else argv)
  experiment = experiment_of(argv)
  flags = cli.make_flags(DEFAULT_CONFIG, experiment.default_config(), argv)
  if any(a in ('--help', '-h', '--helpfull', '-?') for a in argv[1:]):
    print('usage: python -m experiments.tag [flags]\n')
    print(flags.get_help())
    sys.exit(0)
  try:
    flags(argv)
  except Exception as e:  # pylint: disable=broad-except
    sys.exit(f'error: {e}\nTry --help.')
  config = flags.config
  try:
    config_lib.validate(config, experiment.tasks.names,
                        [m.name for m in experiment.tasks.metrics],
                        experiment.default_config())
    if any(b < 1 for b in config.tag.budgets) or config.tag.random_draws < 0:
      raise ValueError('config.tag.budgets must be >= 1 and '
                       'config.tag.random_draws >= 0; got '
                       f'{tuple(config.tag.budgets)} and '
                       f'{config.tag.random_draws}')
  except ValueError as e:
    sys.exit(f'error: {e}')
  workdir = flags.workdir or f'runs/tag-{config.tag.experiment}'
  try:
    report = protocol.run_protocol(experiment, config, workdir)
  except (download.DataError, ValueError) as e:
    sys.exit(f'error: {e}')
  text = protocol.table(report)
  with open(os.path.join(workdir, 'table.md'), 'w') as f:
    f.write(text + '\n')
  for method in ('TAG', 'CS'):
    protocol.heatmap(report, os.path.join(workdir, f'affinity_{method}.png'),
                     method)
  print(text)
  print(json.dumps(report['cost']))
  return report


if __name__ == '__main__':
  main()
