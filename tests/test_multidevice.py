"""Data parallelism over 8 simulated CPU devices equals the one-device step.

JAX fixes the device count at start-up, so the check runs in a fresh
process (``multidevice_script.py``) with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

import json
import os
import subprocess
import sys


def test_data_parallel_mgda_matches_single_device():
  script = os.path.join(os.path.dirname(__file__), 'multidevice_script.py')
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
      [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
       env.get('PYTHONPATH', '')])
  proc = subprocess.run([sys.executable, script], capture_output=True,
                        text=True, env=env, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  for name in ('shard_map_mgda_ub_update', 'shard_map_mgda_ub_alpha',
               'shard_map_mgda_update', 'shard_map_mgda_alpha',
               'jit_sharded_mgda_ub_update', 'jit_sharded_mgda_ub_alpha',
               'untyped_mgda_ub_update', 'untyped_mgda_update',
               'untyped_mgda_alpha'):
    assert out[name] <= 2e-5, (name, out)
  assert out['shard_map_traces'] == 1, out  # 4 steps, one compilation
  assert out['jit_sharded_input_devices'] == 8, out
