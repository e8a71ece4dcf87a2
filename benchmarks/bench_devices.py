"""Data-parallel training step on N simulated CPU devices: MGDA-UB vs uniform.

    python -m benchmarks.bench_devices        # (part of ``make bench``)

Each device count runs in a fresh process (JAX fixes the device count at
start-up, ``--xla_force_host_platform_device_count=N``). The MultiMNIST
network (batch 256, K = 2 and 40) steps under ``jax.jit`` with the batch
sharded over a ``'data'`` mesh axis, as ``--devices N`` trains it, and the
MGDA-UB step is timed against the uniform step in the same process.

Simulated devices share this machine's cores, so the absolute times do not
show a speed-up; what carries over is the ratio MGDA-UB / uniform at each N
(the extra all-reduce of the K x K Gram matrix and the redundant solve), and
that the step compiles and runs at all device counts.
"""

import json
import os
import subprocess
import sys


def child(n):
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

  from benchmarks import bench_step  # pylint: disable=g-import-not-at-top

  assert jax.device_count() == n
  mesh = jax.make_mesh((n,), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  out = {}
  for k, c in ((2, 10), (40, 2)):
    steps, params, x, labels = bench_step.make_steps(
        k, c, which=('uniform', 'mgda_ub'))
    rep = NamedSharding(mesh, P())
    params = jax.device_put(params, rep)
    steps = {name: (fn, jax.device_put(s, rep))
             for name, (fn, s) in steps.items()}
    x = jax.device_put(x, NamedSharding(mesh, P('data')))
    labels = jax.device_put(labels, NamedSharding(mesh, P('data')))
    t = bench_step.time_steps(steps, params, x, labels, 20)
    out[k] = t
  print(json.dumps(out))


def main():
  print('== MultiMNIST step, batch 256 sharded over N simulated CPU devices '
        '(ms per step; same process per N) ==')
  for n in (1, 2, 4, 8):
    env = dict(os.environ)
    env['JAX_PLATFORMS'] = 'cpu'  # simulated devices are CPU devices
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                        f' --xla_force_host_platform_device_count={n}')
    proc = subprocess.run(
        [sys.executable, '-m', 'benchmarks.bench_devices', '--child', str(n)],
        capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
      print(proc.stderr[-2000:])
      raise SystemExit(proc.returncode)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    cells = []
    for k in ('2', '40'):
      u, ub = res[k]['uniform'], res[k]['mgda_ub']
      cells.append(f'K={k}: uniform {u * 1e3:6.1f}, MGDA-UB {ub * 1e3:6.1f} '
                   f'({ub / u:.2f}x)')
    print(f'  N={n}: ' + ' | '.join(cells))


if __name__ == '__main__':
  if len(sys.argv) == 3 and sys.argv[1] == '--child':
    child(int(sys.argv[2]))
  else:
    main()
