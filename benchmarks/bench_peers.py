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
import inspect
import os
import platform
import time

import numpy as np

import jax
import jax.numpy as jnp
import torch
from torch import nn
import torch.nn.functional as F
import torchjd
from torchjd import aggregation as tjd_agg

import mgda_jax
from benchmarks import bench_solver
from benchmarks import bench_step


def _version(dist):
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  try:
    return metadata.version(dist)
  except metadata.PackageNotFoundError:
    return '?'


def median_time(fn, repeats, warmup=2):
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


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


class TorchMultiLeNet(nn.Module):
  """The paper's MultiLeNet in PyTorch: a shared encoder and K heads."""

  def __init__(self, num_tasks, num_classes):
    super().__init__()
    self.conv1 = nn.Conv2d(1, 10, 5)
    self.conv2 = nn.Conv2d(10, 20, 5)
    self.fc = nn.Linear(320, 50)
    self.heads = nn.ModuleList(
        [nn.Sequential(nn.Linear(50, 50), nn.ReLU(), nn.Dropout(0.5),
                       nn.Linear(50, num_classes)) for _ in range(num_tasks)])

  def encode(self, x):
    x = F.relu(F.max_pool2d(self.conv1(x), 2))
    x = F.relu(F.max_pool2d(F.dropout2d(self.conv2(x), 0.5, self.training), 2))
    return F.relu(self.fc(x.flatten(1)))

  def task_loss(self, t, z, y):
    return F.cross_entropy(self.heads[t](z), y)


def python_frank_wolfe(grads, max_iter=250, stop=1e-5):
  """The paper's Algorithm 1 in plain Python/numpy, as its code runs it.

  The Gram matrix is built pair by pair from the gradient tensors (K^2
  small reductions), the iterate starts at the best two-task solution, and
  Frank-Wolfe steps use the exact line search of the paper's Eq. 4.
  """
  k = len(grads)
  g = np.zeros((k, k))
  for i in range(k):
    for j in range(i, k):
      g[i, j] = g[j, i] = float(torch.sum(grads[i] * grads[j]))
  alpha = bench_solver.best_pair_start(g)
  if k == 1:
    return alpha
  for _ in range(max_iter):
    grad = g @ alpha
    s = int(np.argmin(grad))
    v1v1, v1v2, v2v2 = alpha @ g @ alpha, grad[s], g[s, s]
    gamma = bench_solver.two_point(v1v1, v1v2, v2v2)
    new = gamma * alpha
    new[s] += 1 - gamma
    if np.sum(np.abs(new - alpha)) < stop:
      return new
    alpha = new
  return alpha


def torch_steps(num_tasks, num_classes, batch=256):
  torch.manual_seed(0)
  model = TorchMultiLeNet(num_tasks, num_classes)
  model.train()
  opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
  rng = np.random.default_rng(0)
  x = torch.from_numpy(rng.uniform(size=(batch, 1, 28, 28)).astype(np.float32))
  y = torch.from_numpy(rng.integers(0, num_classes,
                                    size=(num_tasks, batch))).long()
  shared = [p for n, p in model.named_parameters() if not n.startswith('heads')]

  def uniform():
    opt.zero_grad()
    z = model.encode(x)
    loss = sum(model.task_loss(t, z, y[t]) for t in range(num_tasks))
    loss.backward()
    opt.step()

  def paper_mgda_ub():
    opt.zero_grad()
    with torch.no_grad():
      z = model.encode(x)
    z_var = z.detach().clone().requires_grad_(True)
    grads = []
    for t in range(num_tasks):  # one backward pass per head
      loss_t = model.task_loss(t, z_var, y[t])
      g, = torch.autograd.grad(loss_t, z_var)
      grads.append(g)
    alpha = python_frank_wolfe(grads)
    opt.zero_grad()
    z = model.encode(x)  # second forward pass
    loss = sum(float(alpha[t]) * model.task_loss(t, z, y[t])
               for t in range(num_tasks))
    loss.backward()
    opt.step()

  try:  # torchjd >= 0.17
    from torchjd.autojac import jac_to_grad  # pylint: disable=g-import-not-at-top
    from torchjd.autojac import mtl_backward  # pylint: disable=g-import-not-at-top
  except ImportError:
    jac_to_grad, mtl_backward = None, torchjd.mtl_backward
  sig = inspect.signature(mtl_backward).parameters
  aggregator = tjd_agg.MGDA()

  def torchjd_mgda():
    opt.zero_grad()
    z = model.encode(x)
    losses = [model.task_loss(t, z, y[t]) for t in range(num_tasks)]
    if 'aggregator' in sig:
      mtl_backward(losses=losses, features=z, aggregator=aggregator)
    else:  # torchjd >= 0.17: the Jacobian into .jac, then into .grad
      mtl_backward(losses, features=z)
      jac_to_grad(shared, aggregator)
    opt.step()

  return {'uniform': uniform, 'paper MGDA-UB': paper_mgda_ub,
          'TorchJD mtl_backward (MGDA)': torchjd_mgda}


def step_section(repeats):
  print('\n== 3. MultiMNIST training step (MultiLeNet, batch 256), ms per step '
        '==')
  rows = []
  for k, c in ((2, 10), (40, 2)):
    steps, params, x, labels = bench_step.make_steps(
        k, c, which=('uniform', 'mgda_ub'))
    t_jax = bench_step.time_steps(steps, params, x, labels, repeats)
    t_torch = {name: median_time(fn, repeats)
               for name, fn in torch_steps(k, c).items()}
    rows.append((k, t_jax, t_torch))
  for k, t_jax, t_torch in rows:
    print(f'  K={k}: mgda_jax uniform {t_jax["uniform"] * 1e3:.1f}, MGDA-UB '
          f'{t_jax["mgda_ub"] * 1e3:.1f} ({t_jax["mgda_ub"] / t_jax["uniform"]:.2f}x '
          f'uniform) | PyTorch uniform {t_torch["uniform"] * 1e3:.1f}, '
          f'paper-style MGDA-UB {t_torch["paper MGDA-UB"] * 1e3:.1f} '
          f'({t_torch["paper MGDA-UB"] / t_torch["uniform"]:.2f}x uniform), '
          f'TorchJD mtl_backward+MGDA '
          f'{t_torch["TorchJD mtl_backward (MGDA)"] * 1e3:.1f}')
    print(f'        paper-style PyTorch MGDA-UB / our MGDA-UB = '
          f'{t_torch["paper MGDA-UB"] / t_jax["mgda_ub"]:.2f}; TorchJD '
          f'mtl_backward / our MGDA-UB = '
          f'{t_torch["TorchJD mtl_backward (MGDA)"] / t_jax["mgda_ub"]:.2f}')


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--repeats', type=int, default=30)
  p.add_argument('--skip-step', action='store_true')
  args = p.parse_args(argv)
  print(f'{platform.processor() or platform.machine()}, {os.cpu_count()} '
        f'CPUs; jax {jax.__version__} ({jax.devices()[0].platform}), torch '
        f'{torch.__version__} ({torch.get_num_threads()} threads), torchjd '
        f'{_version("torchjd")}')
  solver_section(args.repeats)
  if not args.skip_step:
    step_section(args.repeats)


if __name__ == '__main__':
  main()
