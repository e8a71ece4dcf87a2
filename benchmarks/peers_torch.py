"""The MultiMNIST step in PyTorch, the paper's way and TorchJD's (imports
torch only: it runs in its own process in ``bench_peers``' section 3, and
on a GPU in ``benchmarks/gpu.sh``). TorchJD is optional: without it its
step is left out."""

import inspect

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from benchmarks import paper_numpy


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
  alpha = paper_numpy.best_pair_start(g)
  if k == 1:
    return alpha
  for _ in range(max_iter):
    grad = g @ alpha
    s = int(np.argmin(grad))
    v1v1, v1v2, v2v2 = alpha @ g @ alpha, grad[s], g[s, s]
    gamma = paper_numpy.two_point(v1v1, v1v2, v2v2)
    new = gamma * alpha
    new[s] += 1 - gamma
    if np.sum(np.abs(new - alpha)) < stop:
      return new
    alpha = new
  return alpha


def torch_steps(num_tasks, num_classes, batch=256, device='cpu'):
  """The steps as functions of nothing; on a GPU each waits for its work
  (``torch.cuda.synchronize``), so that wall time measures it."""
  torch.manual_seed(0)
  model = TorchMultiLeNet(num_tasks, num_classes).to(device)
  model.train()
  opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
  rng = np.random.default_rng(0)
  x = torch.from_numpy(rng.uniform(size=(batch, 1, 28, 28)).astype(
      np.float32)).to(device)
  y = torch.from_numpy(rng.integers(0, num_classes,
                                    size=(num_tasks, batch))).long().to(device)
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

  steps = {'uniform': uniform, 'paper MGDA-UB': paper_mgda_ub}
  try:
    import torchjd  # pylint: disable=g-import-not-at-top
    from torchjd import aggregation as tjd_agg  # pylint: disable=g-import-not-at-top
  except ImportError:
    return _synchronized(steps, device)
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

  steps['TorchJD mtl_backward (MGDA)'] = torchjd_mgda
  return _synchronized(steps, device)


def _synchronized(steps, device):
  if not str(device).startswith('cuda'):
    return steps

  def wait(fn):
    def step():
      fn()
      torch.cuda.synchronize()
    return step
  return {name: wait(fn) for name, fn in steps.items()}
