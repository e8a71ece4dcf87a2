"""Run by test_multidevice.py: MultiMNIST on 8 simulated devices vs one.

Trains the test configuration on generated digits with ``devices=1`` and
``devices=8`` (the batch sharded over a mesh under jax.jit) and prints one
JSON line with both runs' per-epoch losses, weights and accuracies.
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
  for devices in (1, 8):
    config = test_config.get_config()
    config.method, config.devices = method, devices
    config.batch_size, config.chunk = 64, 1
    with tempfile.TemporaryDirectory() as d:
      messages = []
      train.train_and_evaluate(config, d, data, log=messages.append)
      with open(os.path.join(d, 'metrics.jsonl')) as f:
        out[devices] = [json.loads(l) for l in f]
      out[f'log{devices}'] = messages
  print(json.dumps(out))


if __name__ == '__main__':
  main()
