"""The command line of every experiment (absl flags + ``ml_collections``).

    python -m experiments.<name> [--config=experiments/<name>/configs/test.py]
        [--config.<field>=<value> ...] [--workdir=DIR] [--force]

``--config`` names a config file (default: the dataset's
``configs/default.py``); every field can then be overridden, e.g.
``--config.method=cagrad --config.cagrad.c=0.2``. ``--help`` lists every
field with its default. Re-running the same command after an interruption
resumes from the last checkpoint in ``--workdir``; a changed config is an
error naming the fields, unless ``--force``.

It prints the config and, last, one JSON line: the figures of the epoch
selected on validation.
"""

import json
import sys

from absl import flags
from ml_collections import config_flags

from experiments.common import config as config_lib
from experiments.common import download
from experiments.common import trainer

def make_flags(default_config_path: str, default_config,
               argv) -> flags.FlagValues:
  """Fresh flags for one command line: ``--config`` (a file, then field
  overrides), ``--workdir`` and ``--force``; the help text lists every field
  and its default.

  A new ``FlagValues`` per call (not absl's global one), because
  ``config_flags`` defines the ``--config.<field>`` flags from the argv it
  is given, so one process (a test, a notebook) can run several command
  lines.
  """
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
      'config', default_config_path,
      'A config file (default: the dataset\'s configs/default.py). '
      + config_lib.describe(default_config), flag_values=fv,
      lock_config=True, sys_argv=list(argv))
  flags.DEFINE_string('workdir', None,
                      'checkpoints, metrics.jsonl, TensorBoard, final.json '
                      '(default: runs/<dataset>/<method>-seed<seed>)',
                      flag_values=fv)
  flags.DEFINE_bool('distributed', False,
                    'a multi-process job: call jax.distributed.initialize '
                    'first (on a cluster it finds its peers itself; else '
                    'give the three flags below); train with '
                    '--config.devices=0', flag_values=fv)
  flags.DEFINE_string('coordinator_address', None,
                      'with --distributed: host:port of process 0',
                      flag_values=fv)
  flags.DEFINE_integer('num_processes', None,
                       'with --distributed: the number of processes',
                       flag_values=fv)
  flags.DEFINE_integer('process_id', None,
                       'with --distributed: this process\'s index',
                       flag_values=fv)
  flags.DEFINE_bool('force', False,
                    'resume even if the config differs from the run\'s '
                    'config.json (which is kept as config.<n>.json)',
                    flag_values=fv)
  return fv


def run(experiment: trainer.Experiment, default_config_path: str,
        argv=None, choose=None) -> dict:
  """Parses ``argv`` (default ``sys.argv``) and trains one method.

  ``choose``: ``config -> Experiment``, where the config decides the
  experiment (Cityscapes' on-disk layout decides its tasks); ``experiment``
  then gives the help text.
  """
  argv = list(sys.argv if argv is None else argv)
  FLAGS = make_flags(default_config_path, experiment.default_config(), argv)  # pylint: disable=invalid-name
  if any(a in ('--help', '-h', '--helpfull', '-?') for a in argv[1:]):
    print(f'usage: python -m experiments.{experiment.name} [flags]\n')
    print(FLAGS.get_help())
    sys.exit(0)
  try:
    FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'error: {e}\nTry --help.')
  config = FLAGS.config
  if FLAGS.distributed:
    trainer.initialize_distributed(FLAGS.coordinator_address,
                                   FLAGS.num_processes, FLAGS.process_id)
  try:
    if choose is not None:
      experiment = choose(config)
    config_lib.validate(config, experiment.tasks.names,
                        [m.name for m in experiment.tasks.metrics],
                        experiment.default_config())
    trainer.check_devices(config)
  except ValueError as e:
    sys.exit(f'error: {e}')
  workdir = FLAGS.workdir or (f'runs/{experiment.name}/'
                              f'{config.method}-seed{config.seed}')
  print(json.dumps({'config': config_lib.flatten(config),
                    'workdir': workdir}), flush=True)
  try:
    result = trainer.train_and_evaluate(experiment, config, workdir,
                                        force=FLAGS.force)
  except (download.DataError, ValueError) as e:
    sys.exit(f'error: {e}')
  print(json.dumps(result), flush=True)
  return result
