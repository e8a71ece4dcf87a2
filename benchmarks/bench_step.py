"""Training-step benchmark: MGDA-UB and full MGDA against uniform weighting.

The paper's MultiMNIST network (``experiments/multimnist/models.py``), batch
256, SGD with momentum, random inputs (the data do not change the cost). For
each configuration the three steps are jitted and timed round-robin in the
same run (median of repeated steps after compilation), and reported as
ratios to uniform weighting (one backward pass of the summed loss):

* K = 2 heads (dense 50->50->10), and K = 40 heads (dense 50->50->2);
* ``--scaling``: MGDA-UB / uniform as K grows (2 ... 256) and as the
  representation Z grows (50 ... 800 wide);
* ``--pool``: the uniform step with reshape-and-max pooling against
  ``lax.reduce_window`` pooling.

Run with ``make bench`` or ``python -m benchmarks.bench_step``.
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

from experiments.multimnist import models
import mgda_jax


def make_steps(num_tasks, num_classes, batch=256, rep_dim=50,
               pool=models.max_pool_2x2, which=('uniform', 'mgda_ub', 'mgda')):
  """Jitted training steps and their initial arguments."""
  names = [f'task{i}' for i in range(num_tasks)]
  model = models.MultiLeNet(names, num_classes, rngs=nnx.Rngs(0), pool=pool,
                            rep_dim=rep_dim)
  _, params, encode, task_losses = models.functional(model)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(size=(batch, 28, 28, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, num_classes, size=(batch, num_tasks)),
                       jnp.int32)
  sgd = optax.sgd(0.05, momentum=0.9)

  def all_losses(params, x, labels, key):
    z = encode(params, x, labels, key)
    return task_losses(params, z, x, labels, key)

  steps = {}
  if 'uniform' in which:
    tx_u = sgd

    @jax.jit
    def uniform(params, opt_state, x, labels, key):
      def total(p):
        losses, _ = all_losses(p, x, labels, key)
        return jnp.sum(losses), losses
      (_, losses), grads = jax.value_and_grad(total, has_aux=True)(params)
      updates, opt_state = tx_u.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, losses

    steps['uniform'] = (uniform, tx_u.init(params))
  if 'mgda_ub' in which:
    tx_ub = optax.chain(mgda_jax.mgda_ub(num_tasks), sgd)

    @jax.jit
    def mgda_ub(params, opt_state, x, labels, key):
      (losses, _), grads = mgda_jax.representation_grads(
          encode, task_losses, params, x, labels, key, has_aux=True,
          per_task_z=num_tasks)
      updates, opt_state = tx_ub.update(grads, opt_state, params,
                                        losses=losses)
      return optax.apply_updates(params, updates), opt_state, losses

    steps['mgda_ub'] = (mgda_ub, tx_ub.init(params))
  if 'mgda' in which:
    shared = lambda p: jax.tree_util.tree_map_with_path(
        lambda path, _: path[0].key == 'encoder', p)
    tx_m = optax.chain(mgda_jax.mgda(num_tasks, shared=shared), sgd)

    @jax.jit
    def mgda(params, opt_state, x, labels, key):
      (losses, _), grads = mgda_jax.per_task_grads(all_losses, params, x,
                                                   labels, key, has_aux=True)
      updates, opt_state = tx_m.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, losses

    steps['mgda'] = (mgda, tx_m.init(params))
  return steps, params, x, labels


def time_steps(steps, params, x, labels, repeats, block=5):
  """Median seconds per step of each step function.

  Steps run in blocks of ``block`` consecutive calls of one function, blocks
  rotating between the functions; the first call of each block is dropped,
  so that no step is timed right after another one's (much larger) memory
  traffic.
  """
  key = jax.random.key(1)
  states = {}
  for name, (fn, opt_state) in steps.items():
    states[name] = jax.block_until_ready(fn(params, opt_state, x, labels, key))
    states[name] = jax.block_until_ready(fn(*states[name][:2], x, labels, key))
  times = {name: [] for name in steps}
  for r in range(max(1, repeats // (block - 1))):
    for name, (fn, _) in steps.items():
      for i in range(block):
        k = jax.random.fold_in(key, r * block + i)
        t0 = time.perf_counter()
        states[name] = jax.block_until_ready(fn(*states[name][:2], x, labels,
                                                k))
        if i:
          times[name].append(time.perf_counter() - t0)
  return {name: float(np.median(t)) for name, t in times.items()}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=30)
  parser.add_argument('--scaling', action='store_true')
  parser.add_argument('--pool', action='store_true')
  args = parser.parse_args(argv)
  print(f'jax {jax.__version__} on {jax.devices()[0].platform} '
        f'({jax.devices()[0].device_kind}); {platform.processor() or ""} '
        f'{os.cpu_count()} CPUs; batch 256, MultiLeNet')

  print('\n== training step, ratios to uniform weighting (same run) ==')
  print(f"  {'K':>3s} {'uniform':>11s} {'MGDA-UB':>11s} {'MGDA':>11s} "
        f"{'UB/unif':>8s} {'MGDA/unif':>9s} {'MGDA/UB':>8s}")
  for k, c in ((2, 10), (40, 2)):
    t = time_steps(*make_steps(k, c), args.repeats)
    print(f"  {k:3d} {t['uniform'] * 1e3:8.2f} ms {t['mgda_ub'] * 1e3:8.2f} ms "
          f"{t['mgda'] * 1e3:8.2f} ms {t['mgda_ub'] / t['uniform']:8.2f} "
          f"{t['mgda'] / t['uniform']:9.2f} {t['mgda'] / t['mgda_ub']:8.2f}")

  if args.pool:
    print('\n== pooling layer, uniform step, K=2 ==')
    t = {}
    for name, pool in (('reshape+max', models.max_pool_2x2),
                       ('reduce_window', models.max_pool_2x2_reduce_window)):
      steps, *rest = make_steps(2, 10, pool=pool, which=('uniform',))
      t[name] = time_steps(steps, *rest, args.repeats)['uniform']
      print(f'  {name:14s} {t[name] * 1e3:8.2f} ms')
    print(f"  reduce_window / reshape+max: "
          f"{t['reduce_window'] / t['reshape+max']:.2f}")

  if args.scaling:
    print('\n== MGDA-UB / uniform as K grows (heads 50->50->2) ==')
    for k in (2, 10, 40, 100, 256):
      t = time_steps(*make_steps(k, 2, which=('uniform', 'mgda_ub')),
                     args.repeats)
      print(f"  K={k:3d}: uniform {t['uniform'] * 1e3:8.2f} ms, MGDA-UB "
            f"{t['mgda_ub'] * 1e3:8.2f} ms, ratio "
            f"{t['mgda_ub'] / t['uniform']:.2f}")
    print('\n== MGDA-UB / uniform as the representation grows (K=2) ==')
    for width in (50, 200, 800):
      t = time_steps(*make_steps(2, 10, rep_dim=width,
                                 which=('uniform', 'mgda_ub')), args.repeats)
      print(f"  |Z| = 256 x {width:3d}: uniform {t['uniform'] * 1e3:8.2f} ms, "
            f"MGDA-UB {t['mgda_ub'] * 1e3:8.2f} ms, ratio "
            f"{t['mgda_ub'] / t['uniform']:.2f}")


if __name__ == '__main__':
  main()
