"""Data parallelism over 8 simulated CPU devices equals the one-device step.

JAX fixes the device count at start-up, so the check runs in a fresh
process (``multidevice_script.py``) with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

import json
import os
import subprocess
import sys


import numpy as np
import pytest


def run_script(name, *args):
  script = os.path.join(os.path.dirname(__file__), name)
  env = dict(os.environ)
  env['JAX_PLATFORMS'] = 'cpu'  # simulated devices are CPU devices
  env['PYTHONPATH'] = os.pathsep.join(
      [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
       env.get('PYTHONPATH', '')])
  proc = subprocess.run([sys.executable, script, *args], capture_output=True,
                        text=True, env=env, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_data_parallel_mgda_matches_single_device():
  out = run_script('multidevice_script.py')
  for name in ('shard_map_mgda_ub_update', 'shard_map_mgda_ub_alpha',
               'shard_map_mgda_update', 'shard_map_mgda_alpha',
               'jit_sharded_mgda_ub_update', 'jit_sharded_mgda_ub_alpha',
               'untyped_mgda_ub_update', 'untyped_mgda_ub_alpha',
               'untyped_mgda_update', 'untyped_mgda_alpha',
               'typed_no_axis_mgda_ub_update', 'typed_no_axis_mgda_ub_alpha',
               'typed_no_axis_upgrad_update', 'typed_no_axis_upgrad_weights'):
    assert out[name] <= 2e-5, (name, out)
  assert out['shard_map_traces'] == 1, out  # 4 steps, one compilation
  assert out['jit_sharded_input_devices'] == 8, out


@pytest.mark.parametrize('method', ['mgda_ub', 'mgda'])
def test_multimnist_training_on_8_devices_equals_one_device(method):
  out = run_script('multidevice_multimnist_script.py', method)
  assert any('data parallel over 8 devices' in m for m in out['log8'])
  one, eight = out['1'], out['8']
  assert len(one) == len(eight) == 2
  for a, b in zip(one, eight):
    # Two epochs of SGD with momentum: float32 reassociation only.
    np.testing.assert_allclose(b['train_loss'], a['train_loss'], rtol=2e-4)
    np.testing.assert_allclose(b['weights'], a['weights'], rtol=2e-3,
                               atol=1e-4)
    np.testing.assert_allclose(b['val_loss'], a['val_loss'], rtol=2e-3)
