"""One framework's MultiMNIST steps in a process of its own, for
``bench_peers`` section 3.

    python -m benchmarks.peer_worker --framework jax --tasks 2 --repeats 30
    python -m benchmarks.peer_worker --framework torch --tasks 40 --device cuda

Times the reference kernel (:func:`reference_seconds`), then the steps, then
the reference kernel again, and prints one JSON line: ``{'framework',
'tasks', 'reference': [before, after], 'steps': {name: seconds}}``. Only
the chosen framework is imported.
"""

import argparse
import json
import time

import numpy as np

# (tasks, classes) of the two step sizes: heads 50->50->10 and 50->50->2.
CLASSES = {2: 10, 40: 2}


def median_time(fn, repeats, warmup=2) -> float:
  """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup``."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def reference_seconds(repeats: int = 30, n: int = 384) -> float:
  """Median time of a fixed numpy matmul: how busy the machine is."""
  rng = np.random.default_rng(0)
  a = rng.normal(size=(n, n)).astype(np.float32)
  return median_time(lambda: a @ a, repeats, warmup=0)


def jax_steps(k, repeats, device=None):
  del device  # JAX's default device
  from benchmarks import bench_step  # pylint: disable=g-import-not-at-top
  steps, params, x, labels = bench_step.make_steps(
      k, CLASSES[k], which=('uniform', 'mgda_ub'))
  times = bench_step.time_steps(steps, params, x, labels, repeats)
  # How an epoch runs (MultiMNIST's chunks of 15 scanned steps).
  for name, (fn, opt_state) in steps.items():
    times[f'{name} (scan)'] = bench_step.scanned_seconds(
        fn, params, opt_state, x, labels, repeats=max(3, repeats // 3))
  return times


def torch_steps(k, repeats, device='cpu'):
  from benchmarks import peers_torch  # pylint: disable=g-import-not-at-top
  return {name: median_time(fn, repeats) for name, fn in
          peers_torch.torch_steps(k, CLASSES[k], device=device).items()}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--framework', choices=('jax', 'torch'), required=True)
  p.add_argument('--tasks', type=int, choices=sorted(CLASSES), required=True)
  p.add_argument('--repeats', type=int, default=30)
  p.add_argument('--device', default='cpu',
                 help="torch's device (cpu, cuda); JAX uses its default")
  args = p.parse_args(argv)
  run = jax_steps if args.framework == 'jax' else torch_steps
  before = reference_seconds()
  steps = run(args.tasks, args.repeats, args.device)
  after = reference_seconds()
  print(json.dumps({'framework': args.framework, 'tasks': args.tasks,
                    'reference': [before, after], 'steps': steps}),
        flush=True)


if __name__ == '__main__':
  main()
