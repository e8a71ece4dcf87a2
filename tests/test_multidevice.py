"""Data parallelism over 8 simulated CPU devices equals the one-device step.

JAX fixes the device count at start-up, so the check runs in a fresh
process (``multidevice_script.py``) with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

import json
import os
import socket
import subprocess
import sys


import numpy as np
import pytest


# On a busy machine the threads of 8 simulated devices can reach a
# collective more than XLA:CPU's default 40 s apart, and XLA then aborts
# the process; here a slow machine should only be slow.
PATIENT_COLLECTIVES = (' --xla_cpu_collective_call_terminate_timeout_seconds'
                       '=900 --xla_cpu_collective_timeout_seconds=900')


def script_env():
  env = dict(os.environ)
  env['JAX_PLATFORMS'] = 'cpu'  # simulated devices are CPU devices
  env['XLA_FLAGS'] = env.get('XLA_FLAGS', '') + PATIENT_COLLECTIVES
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env['PYTHONPATH'] = os.pathsep.join([root, env.get('PYTHONPATH', '')])
  return env


def run_script(name, *args):
  script = os.path.join(os.path.dirname(__file__), name)
  env = script_env()
  proc = subprocess.run([sys.executable, script, *args], capture_output=True,
                        text=True, env=env, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope='module')
def report():
  return run_script('multidevice_script.py')


MODES = ('jit_explicit', 'jit_auto', 'shard_map', 'shard_map_untyped', 'pmap')


def _cases():
  import mgda_jax  # pylint: disable=g-import-not-at-top
  return [f'{n}|{kind}' for n, s in mgda_jax.METHODS.items()
          for kind in s.inputs]


@pytest.mark.parametrize('mode', MODES)
def test_every_method_is_exact_in_every_data_parallel_mode(report, mode):
  """One step on 8 devices equals the one-device step on the whole batch.

  Every registered method, both inputs (representation and parameter
  gradients): the update, the weights and the method's own state (float32
  reassociation only; CAGrad's dual solve stops at its 1e-5 gap).
  """
  cases = _cases()
  assert len(cases) >= 40
  bad = {}
  for case in cases:
    r = report[f'{mode}|{case}']
    # The problem is well conditioned (K = 3 tasks, 320 examples' worth of
    # representation), so the weights are stable to reassociation as well.
    if (r['update'] > 1e-4 or r['weights'] > 1e-3 or r['inner'] > 1e-4
        or r['count'] != 1 or r['result'] != 0):
      bad[case] = r
  assert not bad, bad


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
  if method != 'mgda_ub':
    return
  # Batches gathered on the host (each process its own rows; here one
  # process) are the batches the device path gathers: the same figures.
  assert any('gathered on the host' in m for m in out['log8host'])
  for host, device in (('8host', '8'), ('8host_chunk2', '8'),
                       ('1host_chunk2', '1')):
    assert len(out[host]) == len(out[device]) == 2
    for a, b in zip(out[device], out[host]):
      for k in ('train_loss', 'weights', 'val_loss', 'test_acc'):
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-7,
                                   err_msg=f'{host} {k}')


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _job(workdir, epochs, *where, timeout=420):
  """Two processes (4 simulated devices each) on a loopback coordinator;
  both are stopped here whatever happens. Returns process 0's result."""
  script = os.path.join(os.path.dirname(__file__), 'multiprocess_script.py')
  env = script_env()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  port = str(_free_port())
  # Output to files, not pipes: a process blocked on a full pipe would stall
  # its peer at the next collective.
  logs = [open(f'{workdir}.{i}.log', 'w+') for i in range(2)]  # pylint: disable=consider-using-with
  procs = [subprocess.Popen(
      [sys.executable, script, 'worker', str(i), port, workdir, str(epochs),
       *where],
      stdout=logs[i], stderr=subprocess.STDOUT, text=True, env=env,
      cwd=root) for i in range(2)]
  outs = []
  try:
    for p, log in zip(procs, logs):
      p.wait(timeout=timeout)
      log.seek(0)
      text = log.read()
      assert p.returncode == 0, text[-4000:]
      outs.append(json.loads([l for l in text.splitlines()
                              if l.startswith('{"method"')][-1]))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for log in logs:
      log.close()
  # Every process returns the same figures (its own clock aside).
  for o in outs:
    o.pop('seconds_per_epoch')
  # Host input (the default): each process gathered only its half of each
  # batch of 64; device input: none (the training set is on the devices).
  rows = 0 if where == ('device',) else 32
  assert outs[0]['rows_per_batch'] == outs[1]['rows_per_batch'] == rows
  assert outs[0] == outs[1]
  return outs[0]


def test_multimnist_across_two_processes_equals_one_process(tmp_path):
  """jax.distributed: 2 processes x 4 devices = 1 process x 8 devices.

  The job runs one epoch, stops, and is resumed from its orbax checkpoint
  for the second (a multi-process checkpoint written and restored); its
  losses, weights and accuracies must equal an uninterrupted two-epoch run
  in one process on 8 devices (itself tested equal to one device above).
  Each process gathers only its own half of each batch (host input, the
  default across processes), and only process 0 writes the run's files. A
  job with the training set on the devices (device input) gives the same
  first epoch.
  """
  import multiprocess_script  # pylint: disable=g-import-not-at-top
  multiprocess_script.write_mnist(str(tmp_path / 'mnist'))
  job = str(tmp_path / 'job')
  _job(job, 1)
  resumed = _job(job, 2)
  single = run_script('multiprocess_script.py', 'single',
                      str(tmp_path / 'single'), '2')
  assert resumed['epochs'] == single['epochs'] == 2
  assert single['rows_per_batch'] == 0  # one process: device input
  with open(os.path.join(job, 'metrics.jsonl')) as f:
    a = [json.loads(l) for l in f]
  with open(str(tmp_path / 'single' / 'metrics.jsonl')) as f:
    b = [json.loads(l) for l in f]
  assert [r['epoch'] for r in a] == [r['epoch'] for r in b] == [1, 2]
  for ra, rb in zip(a, b):
    np.testing.assert_allclose(ra['train_loss'], rb['train_loss'], rtol=1e-5)
    np.testing.assert_allclose(ra['weights'], rb['weights'], rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(ra['val_loss'], rb['val_loss'], rtol=1e-5)
    np.testing.assert_allclose(ra['test_acc'], rb['test_acc'], atol=1e-6)
  for k, v in single.items():
    if k.startswith(('val_', 'test_')):
      np.testing.assert_allclose(resumed[k], v, rtol=1e-5, err_msg=k)
  assert os.path.exists(os.path.join(job, 'final.json'))
  assert os.path.isdir(os.path.join(job, 'checkpoints', '2'))
  # Device input across processes (each holds the training set on its
  # devices): the same first epoch.
  on_devices = str(tmp_path / 'on_devices')
  _job(on_devices, 1, 'device')
  with open(os.path.join(on_devices, 'metrics.jsonl')) as f:
    c = [json.loads(l) for l in f]
  assert [r['epoch'] for r in c] == [1]
  for k in ('train_loss', 'weights', 'val_loss', 'test_acc'):
    np.testing.assert_allclose(c[0][k], b[0][k], rtol=1e-5, atol=1e-6,
                               err_msg=k)
