"""Run by test_multidevice.py: MultiMNIST across processes (jax.distributed).

    multiprocess_script.py worker PROCESS_ID PORT WORKDIR EPOCHS [INPUT]
    multiprocess_script.py single WORKDIR EPOCHS [INPUT]

``worker``: one of two processes of a job on this machine (loopback
coordinator on PORT), each with 4 simulated CPU devices, training the test
configuration on generated digits over all 8 devices through the command
line's own entry (``--distributed``). ``single``: the same run in one
process with 8 simulated devices. Both print the run's result as one JSON
line; process 0 of a job writes the workdir's files.
"""

import json
import os
import sys

if __name__ == '__main__':  # not when pytest imports it for doctests
  os.environ['XLA_FLAGS'] = (
      os.environ.get('XLA_FLAGS', '') +
      ' --xla_force_host_platform_device_count=' +
      ('4' if sys.argv[1] == 'worker' else '8'))
  sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from test_multimnist import fake_mnist, write_idx  # pylint: disable=g-import-not-at-top,wrong-import-position

from experiments.common import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.common import trainer  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.multimnist import train  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  if sys.argv[1] == 'worker':
    pid, port, workdir, epochs, *where = sys.argv[2:]
    dist = ['--distributed', f'--coordinator_address=127.0.0.1:{port}',
            '--num_processes=2', f'--process_id={pid}']
  else:
    workdir, epochs, *where = sys.argv[2:]
    dist = []
  # config.input: the default ('auto') unless given.
  dist += [f'--config.input={w}' for w in where]
  # The IDX files of the generated digits, written once by the test.
  mnist_dir = os.path.join(os.path.dirname(workdir), 'mnist')
  argv = ['prog', '--config=experiments/multimnist/configs/test.py',
          '--config.method=mgda_ub', '--config.devices=0',
          '--config.batch_size=64', '--config.chunk=1',
          f'--config.epochs={epochs}', f'--config.data.mnist_dir={mnist_dir}',
          f'--config.data.cache_dir={os.path.dirname(workdir)}/cache',
          '--config.data.download=False', f'--workdir={workdir}', *dist]
  # Count the batch rows this process gathers for its devices.
  gathered = []
  make = trainer.jax.make_array_from_callback

  def counting(shape, sharding, callback):
    rows = []

    def counted(index):
      block = callback(index)
      rows.append(block.shape[0] * block.shape[1])
      return block
    out = make(shape, sharding, counted)
    # The training images' batches, (chunk, B, H, W, ...) split over the
    # batch axis (not, e.g., a checkpoint's arrays).
    spec = trainer.jax.sharding.PartitionSpec(None, 'data')
    batched = getattr(sharding, 'spec', None) == spec
    if batched and len(shape) >= 4:
      gathered.append(sum(rows))
    return out
  trainer.jax.make_array_from_callback = counting
  try:
    result = cli.run(train.EXPERIMENT,
                     'experiments/multimnist/configs/test.py', argv)
  finally:
    trainer.jax.make_array_from_callback = make
  # The image rows this process gathered per batch (chunk 1): half of each
  # batch in each of two processes (host input, the default there); none
  # in one process (device input, the default there).
  result['rows_per_batch'] = (sum(gathered) / len(gathered) if gathered
                              else 0)
  print(json.dumps(result), flush=True)


def write_mnist(folder):
  """The generated digits as the four IDX files (called by the test)."""
  from experiments.multimnist import input_pipeline as ip  # pylint: disable=g-import-not-at-top
  os.makedirs(folder, exist_ok=True)
  mnist = fake_mnist(np.random.default_rng(5))
  for key, name in ip.IDX_FILES.items():
    write_idx(os.path.join(folder, name), getattr(mnist, key), compress=False)


if __name__ == '__main__':
  main()
