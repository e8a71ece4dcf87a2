"""mgda_jax against the PyTorch peers, on the same machine in one run.

``make bench-peers`` builds a separate environment (``.venv-peers``: CPU
``torch==2.13.0``, ``torchjd[quadprog-projector]`` and this project) and runs
this script. It is not part of the tests. Three comparisons:

1. **The solver.** Our jitted min-norm solve (``mgda_weights``) and UPGrad
   (``upgrad_weights``) against TorchJD's ``MGDA`` and ``UPGrad``
   aggregators, for K = 2, 10 and 40 correlated gradients of dimension 1000,
   one problem at a time: time per call, and accuracy (``||d||^2`` over the
   exact optimum from quadprog in float64 for MGDA; the largest conflict
   ``-min_t cos(d, g_t)`` and the distance between the two UPGrad outputs).
2. **A batch.** Our ``vmap``-ped solve of 1024 K = 40 problems against a
   Python loop of TorchJD ``MGDA`` calls over the same problems.
3. **The training step.** MultiMNIST's MGDA-UB step (MultiLeNet, batch 256)
   in mgda_jax against the same step written the way the paper's PyTorch code
   does it: the encoder's output detached, one backward pass per task head
   to get ``dL_t/dZ``, a Python Frank-Wolfe solver on their Gram matrix, then
   a second forward and backward pass of the weighted loss. Also TorchJD's
   ``mtl_backward`` (with its ``MGDA`` aggregator: the Jacobian w.r.t. the
   shared parameters, i.e. full MGDA) and each framework's uniform step.
   K = 2 (heads 50->50->10) and K = 40 (heads 50->50->2).

Every figure is a median over repeated calls after warm-up, except the
TorchJD loop over the batch, which is timed once (1024 calls); ratios
compare timings taken in this run.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

import jax
import jax.numpy as jnp
import torch
from torchjd import aggregation as tjd_agg

import mgda_jax
from benchmarks import bench_solver
from benchmarks.peer_worker import median_time


def _version(dist):
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  try:
    return metadata.version(dist)
  except metadata.PackageNotFoundError:
    return '?'


def correlated(rng, k, dim=1000):
  """Correlated gradients: a shared direction plus task-specific noise."""
  mu = rng.normal(size=dim)
  return (mu + rng.uniform(0.2, 1.5, size=(k, 1)) * rng.normal(size=(k, dim)))


def exact_min_norm(j):
  """min ||J^T a||^2 on the simplex, by quadprog in float64."""
  g = j @ j.T
  a = bench_solver.quadprog_solve(g)
  return float(a @ g @ a)


# ----------------------------------------------------------------------------
# 1-2. Solvers


def solver_section(repeats):
  print('\n== 1. min-norm solve and UPGrad, one problem per call '
        '(correlated gradients, dim 1000, float32) ==')
  print(f"  {'K':>3s} {'ours MGDA':>10s} {'TorchJD MGDA':>13s} {'speed-up':>9s} "
        f"{'ours excess':>12s} {'TorchJD excess':>15s} | {'ours UPGrad':>11s} "
        f"{'TorchJD UPGrad':>15s} {'speed-up':>9s} {'max conflict':>13s} "
        f"{'|ours-TJD|':>10s}")
  ours_mgda = jax.jit(lambda j: mgda_jax.mgda_weights(j).weights @ j)
  ours_up = jax.jit(lambda j: mgda_jax.upgrad_weights(j @ j.T)[0] @ j)
  tjd_mgda, tjd_up = tjd_agg.MGDA(), tjd_agg.UPGrad()
  rng = np.random.default_rng(0)
  for k in (2, 10, 40):
    problems = [correlated(rng, k).astype(np.float32) for _ in range(20)]
    jx = [jnp.asarray(p) for p in problems]
    jt = [torch.from_numpy(p) for p in problems]
    it = iter(range(10 ** 9))
    t_ours = median_time(
        lambda: ours_mgda(jx[next(it) % 20]).block_until_ready(), repeats)
    t_tjd = median_time(lambda: tjd_mgda(jt[next(it) % 20]), repeats)
    t_ours_up = median_time(
        lambda: ours_up(jx[next(it) % 20]).block_until_ready(), repeats)
    t_tjd_up = median_time(lambda: tjd_up(jt[next(it) % 20]), repeats)
    ex_ours, ex_tjd, conflict, diff = [], [], [], []
    for p, a, b in zip(problems, jx, jt):
      best = exact_min_norm(p.astype(np.float64))
      d_o = np.asarray(ours_mgda(a), np.float64)
      d_t = tjd_mgda(b).numpy().astype(np.float64)
      ex_ours.append(d_o @ d_o / best - 1)
      ex_tjd.append(d_t @ d_t / best - 1)
      u_o = np.asarray(ours_up(a), np.float64)
      u_t = tjd_up(b).numpy().astype(np.float64)
      pn = p / np.linalg.norm(p, axis=1, keepdims=True)
      conflict.append(max(0.0, -np.min(pn @ u_o) / np.linalg.norm(u_o)))
      diff.append(np.linalg.norm(u_o - u_t) / np.linalg.norm(u_t))
    print(f'  {k:3d} {t_ours * 1e3:8.3f}ms {t_tjd * 1e3:11.3f}ms '
          f'{t_tjd / t_ours:8.1f}x {np.median(ex_ours):12.2e} '
          f'{np.median(ex_tjd):15.2e} | {t_ours_up * 1e3:9.3f}ms '
          f'{t_tjd_up * 1e3:13.3f}ms {t_tjd_up / t_ours_up:8.1f}x '
          f'{np.max(conflict):13.1e} {np.median(diff):10.1e}')
  print('  (excess: median ||d||^2 / optimum - 1 over 20 problems; max '
        "conflict: largest -cos(d, g_t) of our UPGrad; |ours-TJD|: median "
        'relative distance between the two UPGrad outputs)')

  print('\n== 2. 1024 K=40 problems: our vmapped batch vs a loop of TorchJD '
        'MGDA calls ==')
  batch = np.stack([correlated(rng, 40) for _ in range(1024)]).astype(
      np.float32)
  jb = jnp.asarray(batch)
  ours_batch = jax.jit(jax.vmap(lambda j: mgda_jax.mgda_weights(j).weights @ j))
  t_batch = median_time(lambda: ours_batch(jb).block_until_ready(),
                        max(3, repeats // 10))
  tb = [torch.from_numpy(p) for p in batch]
  t0 = time.perf_counter()
  loop_out = [tjd_mgda(p) for p in tb]
  t_loop = time.perf_counter() - t0
  ours = np.asarray(ours_batch(jb), np.float64)
  ex_o, ex_t = [], []
  for i in range(0, 1024, 16):
    best = exact_min_norm(batch[i].astype(np.float64))
    ex_o.append(ours[i] @ ours[i] / best - 1)
    d = loop_out[i].numpy().astype(np.float64)
    ex_t.append(d @ d / best - 1)
  print(f'  ours: {t_batch * 1e3:.1f} ms for the batch '
        f'({t_batch / 1024 * 1e6:.1f} us per problem); TorchJD loop: '
        f'{t_loop * 1e3:.1f} ms ({t_loop / 1024 * 1e6:.1f} us per problem); '
        f'speed-up {t_loop / t_batch:.1f}x')
  print(f'  median excess over the optimum (64 of the problems): ours '
        f'{np.median(ex_o):.2e}, TorchJD {np.median(ex_t):.2e}; worst: ours '
        f'{np.max(ex_o):.2e}, TorchJD {np.max(ex_t):.2e}')


# ----------------------------------------------------------------------------
# 3. Training step


def run_block(framework, k, repeats):
  """One worker process: ``{'reference': [before, after], 'steps': ...}``."""
  out = subprocess.run(
      [sys.executable, '-m', 'benchmarks.peer_worker', '--framework',
       framework, '--tasks', str(k), '--repeats', str(repeats)],
      check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def noisy(block, quietest, tolerance):
  """A block is noisy when its two reference readings disagree, or either
  is slower than the quietest reading of the run, by more than
  ``tolerance``."""
  before, after = block['reference']
  return (abs(after / before - 1) > tolerance
          or max(before, after) / quietest - 1 > tolerance)


def step_section(repeats, blocks=2, tolerance=0.10, retries=2, log=print):
  """Each framework in its own process, blocks alternating A B A B, each
  checked against the reference kernel; noisy blocks re-run, then
  flagged."""
  print('\n== 3. MultiMNIST training step (MultiLeNet, batch 256), ms per step '
        '==')
  print(f'  each framework in its own process, {blocks} blocks each '
        f'alternating (jax, torch, ...); a block is noisy when the reference '
        f'matmul timed before and after it differs by more than '
        f'{tolerance:.0%} (or from the quietest reading); noisy blocks are '
        f're-run up to {retries} times, then flagged')
  for k in (2, 40):
    done = {'jax': [], 'torch': []}
    reruns = 0
    def refs(extra=()):
      return [r for v in done.values() for x in v for r in x['reference']
              ] + list(extra)

    for b in range(blocks):
      for fw in ('jax', 'torch'):
        for attempt in range(retries + 1):
          block = run_block(fw, k, repeats)
          if not noisy(block, min(refs(block['reference'])), tolerance):
            break
          if attempt < retries:
            reruns += 1
            log(f'  K={k} {fw} block {b + 1}: noisy (reference '
                f'{block["reference"][0] * 1e3:.2f} -> '
                f'{block["reference"][1] * 1e3:.2f} ms), re-running')
        done[fw].append(block)
    # Judged again against the quietest reading of the whole run.
    quietest = min(refs())
    flagged = [f'{fw} block {b + 1}' for fw, v in done.items()
               for b, x in enumerate(v) if noisy(x, quietest, tolerance)]
    t_jax = {n: float(np.median([x['steps'][n] for x in done['jax']]))
             for n in done['jax'][0]['steps']}
    t_torch = {n: float(np.median([x['steps'][n] for x in done['torch']]))
               for n in done['torch'][0]['steps']}
    print(f'  K={k}: mgda_jax uniform {t_jax["uniform"] * 1e3:.1f}, MGDA-UB '
          f'{t_jax["mgda_ub"] * 1e3:.1f} ({t_jax["mgda_ub"] / t_jax["uniform"]:.2f}x '
          f'uniform) | PyTorch uniform {t_torch["uniform"] * 1e3:.1f}, '
          f'paper-style MGDA-UB {t_torch["paper MGDA-UB"] * 1e3:.1f} '
          f'({t_torch["paper MGDA-UB"] / t_torch["uniform"]:.2f}x uniform), '
          f'TorchJD mtl_backward+MGDA '
          f'{t_torch["TorchJD mtl_backward (MGDA)"] * 1e3:.1f}')
    print(f'        paper-style PyTorch MGDA-UB / our MGDA-UB = '
          f'{t_torch["paper MGDA-UB"] / t_jax["mgda_ub"]:.2f}; PyTorch '
          f'uniform / our uniform = '
          f'{t_torch["uniform"] / t_jax["uniform"]:.2f}; TorchJD '
          f'mtl_backward / our MGDA-UB = '
          f'{t_torch["TorchJD mtl_backward (MGDA)"] / t_jax["mgda_ub"]:.2f}')
    if 'uniform (scan)' in t_jax:
      print(f'        in a 15-step lax.scan (how a MultiMNIST epoch runs): '
            f'mgda_jax uniform {t_jax["uniform (scan)"] * 1e3:.1f}, MGDA-UB '
            f'{t_jax["mgda_ub (scan)"] * 1e3:.1f} ms per step; PyTorch '
            f'uniform / ours = '
            f'{t_torch["uniform"] / t_jax["uniform (scan)"]:.2f}; '
            f'paper-style PyTorch MGDA-UB / ours = '
            f'{t_torch["paper MGDA-UB"] / t_jax["mgda_ub (scan)"]:.2f}')
    print(f'        reference matmul {min(refs()) * 1e3:.2f}-'
          f'{max(refs()) * 1e3:.2f}'
          f' ms over the blocks; {reruns} re-run(s); '
          + (f'FLAGGED noisy: {", ".join(flagged)} (figures unreliable)'
             if flagged else 'every block quiet'))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--repeats', type=int, default=30)
  p.add_argument('--skip-step', action='store_true')
  p.add_argument('--blocks', type=int, default=2,
                 help='step section: blocks per framework (A B A B ...)')
  p.add_argument('--tolerance', type=float, default=0.10,
                 help='step section: largest reference-kernel drift of a '
                      'quiet block')
  p.add_argument('--retries', type=int, default=2)
  p.add_argument('--skip-solver', action='store_true')
  args = p.parse_args(argv)
  print(f'{platform.processor() or platform.machine()}, {os.cpu_count()} '
        f'CPUs; jax {jax.__version__} ({jax.devices()[0].platform}), torch '
        f'{torch.__version__} ({torch.get_num_threads()} threads), torchjd '
        f'{_version("torchjd")}')
  if not args.skip_solver:
    solver_section(args.repeats)
  if not args.skip_step:
    step_section(args.repeats, args.blocks, args.tolerance, args.retries)


if __name__ == '__main__':
  main()
