"""Architectures benchmark: each ``mgda_jax.nn`` architecture's MGDA-UB step
against its uniform step, in one run.

MultiMNIST-sized parts (inputs 28x28x1 flattened to 784 for the MLP
architectures, batch 256; a small convolutional backbone for MTAN, batch
32), K tasks of 10 classes, SGD. Per architecture, two jitted steps timed
round-robin after compilation (median of ``--repeats``):

* ``uniform``: one backward pass of the summed loss;
* ``mgda_ub``: ``mgda_jax.nn.task_gradients(fns, 'representation', ...)``
  (one forward pass, per-task gradients at the architecture's Z, one
  pullback) into ``mgda_jax.mgda_ub``.

The ratio shows whether a multi-tensor or per-task representation keeps
MGDA-UB near uniform's cost, as it is for hard sharing. The MLP steps take
milliseconds, so MGDA-UB's fixed cost per step (the Gram matrix and the
Frank-Wolfe loop) shows in them; ``--parts multimnist`` times instead the
architectures of the MultiMNIST table (``experiments/multimnist/
architectures.py``: LeNet parts, 28x28 inputs, batch 256, K = 2), the
steps the table trains.

    python -m benchmarks.bench_nn [--tasks 2] [--repeats 20]
    python -m benchmarks.bench_nn --parts multimnist
"""

import argparse
import os
import platform
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import mgda_jax
import mgda_jax.nn as mnn

B, D, H = 256, 784, 100


def mlp(i, o):
  return lambda rngs: nnx.Sequential(nnx.Linear(i, o, rngs=rngs), nnx.relu)


def heads(k, width=H):
  r = nnx.Rngs(7)
  return [nnx.Linear(width, 10, rngs=r) for _ in range(k)]


def conv(i, o, rngs, stride=1):
  return nnx.Sequential(nnx.Conv(i, o, (3, 3), strides=stride, rngs=rngs),
                        nnx.relu)


class Pool(nnx.Module):
  """Global average pooling and a linear head on a conv stage's output."""

  def __init__(self, c, rngs):
    self.linear = nnx.Linear(c, 10, rngs=rngs)

  def __call__(self, x):
    return self.linear(jnp.mean(x, axis=(1, 2)))


def architectures(k):
  r = nnx.Rngs(0)
  half = (tuple(range(k // 2)), tuple(range(k // 2, k)))
  return {
      'hard_sharing': (mnn.HardSharing(
          nnx.Sequential(mlp(D, H)(r), mlp(H, H)(r)), heads(k)), (B, D)),
      # Both steps carry the prior (every step), so the row's times against
      # hard sharing's show its cost.
      'mrn (prior on the heads)': (mnn.MRN(
          nnx.Sequential(mlp(D, H)(r), mlp(H, H)(r)), heads(k)), (B, D)),
      'fafs tree (2 groups at block 2)': (mnn.Branched(
          [mlp(D, H), mlp(H, H)], heads(k), rngs=r,
          groups=[[tuple(range(k))], half if k > 1 else [(0,)]]), (B, D)),
      'mmoe (4 experts)': (mnn.MMoE(mlp(D, H), 4, D, heads(k), rngs=r),
                           (B, D)),
      'cgc (2 shared, 1 each)': (mnn.CGC(mlp(D, H), 2, 1, D, heads(k),
                                         rngs=r), (B, D)),
      'ple (2 levels)': (mnn.PLE([mlp(D, H), mlp(H, H)], 2, 1, [D, H],
                                 heads(k), num_levels=2, rngs=r), (B, D)),
      'cross_stitch': (mnn.CrossStitch([mlp(D, H), mlp(H, H)], heads(k),
                                       rngs=r), (B, D)),
      'sluice': (mnn.Sluice([mlp(D, H), mlp(H, H)], heads(k), rngs=r),
                 (B, D)),
      'mtan (conv, batch 32)': (mnn.MTAN(
          [(conv(1, 8, r), conv(8, 8, r)), conv(8, 16, r, 2)], [8, 16],
          [Pool(16, nnx.Rngs(t)) for t in range(k)], rngs=r),
                                (32, 28, 28, 1)),
  }


def multimnist_architectures(k=2):
  """The MultiMNIST table's architectures (K = 2: the FAFS tree's groups
  are those of docs/ARCHITECTURES.md)."""
  from experiments.multimnist import architectures as lenet  # pylint: disable=g-import-not-at-top
  from experiments.multimnist.configs import default  # pylint: disable=g-import-not-at-top
  out = {}
  for name in lenet.NAMES[1:]:
    c = default.get_config()
    c.architecture.name = name
    if name == 'branched':
      c.architecture.groups = '01|0,1|0,1'
    model = lenet.build(c, [f'task{t}' for t in range(k)], nnx.Rngs(0))
    out[name] = (model, (B, 28, 28, 1))
  return out


def loss_fn(outputs, y):
  outs = list(outputs.values()) if isinstance(outputs, dict) else outputs
  return jnp.stack([
      -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(o), y[:, t, None],
                                    -1)) for t, o in enumerate(outs)])


def steps(model, shape, k):
  fns = mnn.functional(model, loss_fn)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, (shape[0], k)), jnp.int32)
  sgd = optax.sgd(0.01)
  tx = optax.chain(mgda_jax.mgda_ub(k), optax.sgd(0.01))
  if isinstance(model, mnn.MRN):
    sgd = optax.chain(model.prior(), sgd)
    tx = optax.chain(mgda_jax.mgda_ub(k), model.prior(), optax.sgd(0.01))

  @jax.jit
  def uniform(params, state, opt_state):
    def total(p):
      losses, (_, new_state) = fns.losses(p, state, x, y)
      return jnp.sum(losses), new_state
    (_, state), g = jax.value_and_grad(total, has_aux=True)(params)
    updates, opt_state = sgd.update(g, opt_state, params)
    return optax.apply_updates(params, updates), state, opt_state

  @jax.jit
  def mgda_ub(params, state, opt_state):
    _, grads, state, _ = mnn.task_gradients(fns, 'representation', params,
                                            state, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), state, opt_state

  return {'uniform': (uniform, (fns.params, fns.state,
                                sgd.init(fns.params))),
          'mgda_ub': (mgda_ub, (fns.params, fns.state,
                                tx.init(fns.params)))}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--tasks', type=int, nargs='+', default=[2, 10])
  p.add_argument('--repeats', type=int, default=20)
  p.add_argument('--parts', choices=['mlp', 'multimnist'], default='mlp',
                 help="'mlp': MLP parts (784-100-100, MTAN a small conv "
                      "net), K from --tasks; 'multimnist': the MultiMNIST "
                      'table\'s LeNet-part architectures, K = 2')
  args = p.parse_args(argv)
  print(f'# bench_nn: {platform.machine()}, {os.cpu_count()} CPUs, '
        f'{jax.devices()[0].platform}; jax {jax.__version__}; batch {B}; '
        f'{args.parts} parts')
  if args.parts == 'multimnist':
    args.tasks = [2]
  print('| architecture | K | uniform (ms) | MGDA-UB (ms) | MGDA-UB / '
        'uniform |')
  print('| --- | ---: | ---: | ---: | ---: |')
  for k in args.tasks:
    archs = (multimnist_architectures(k) if args.parts == 'multimnist'
             else architectures(k))
    for name, (model, shape) in archs.items():
      fns = steps(model, shape, k)
      for f, a in fns.values():
        jax.block_until_ready(f(*a))
      times = {n: [] for n in fns}
      for _ in range(args.repeats):
        for n, (f, a) in fns.items():
          t = time.perf_counter()
          jax.block_until_ready(f(*a))
          times[n].append(time.perf_counter() - t)
      u, m = (1e3 * np.median(times[n]) for n in ('uniform', 'mgda_ub'))
      print(f'| {name} | {k} | {u:.2f} | {m:.2f} | {m / u:.2f} |',
            flush=True)


if __name__ == '__main__':
  main()
