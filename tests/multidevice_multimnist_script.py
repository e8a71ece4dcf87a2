"""Run by test_multidevice.py: MultiMNIST on 8 simulated devices vs one.

Trains the test configuration on generated digits with ``devices=1`` and
``devices=8`` (the batch sharded over a mesh under jax.jit), for mgda_ub
also with batches gathered on the host (``config.input='host'``), and
prints one JSON line with the runs' per-epoch losses, weights and
accuracies.
"""

import json
import os
import sys
import tempfile

if __name__ == '__main__':  # not when pytest imports it for doctests
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8')
  sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from test_multimnist import fake_mnist  # pylint: disable=g-import-not-at-top,wrong-import-position

from experiments.multimnist import input_pipeline as ip  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.multimnist import train  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.multimnist.configs import test as test_config  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  method = sys.argv[1] if len(sys.argv) > 1 else 'mgda_ub'
  data = ip.build_multimnist(fake_mnist(np.random.default_rng(5)), seed=0)
  out = {}
  # name: (devices, input, chunk); the host-input runs for mgda_ub only.
  runs = {'1': (1, 'device', 1), '8': (8, 'device', 1)}
  if method == 'mgda_ub':
    runs.update({'8host': (8, 'host', 1), '8host_chunk2': (8, 'host', 2),
                 '1host_chunk2': (1, 'host', 2)})
  for name, (devices, where, chunk) in runs.items():
    config = test_config.get_config()
    config.method, config.devices, config.input = method, devices, where
    config.batch_size, config.chunk = 64, chunk
    with tempfile.TemporaryDirectory() as d:
      messages = []
      train.train_and_evaluate(config, d, data, log=messages.append)
      with open(os.path.join(d, 'metrics.jsonl')) as f:
        out[name] = [json.loads(l) for l in f]
      out[f'log{name}'] = messages
  print(json.dumps(out))


if __name__ == '__main__':
  main()
