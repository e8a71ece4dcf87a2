"""TAG benchmark: the cost of an affinity step against a training step.

The MultiMNIST network (``experiments/multimnist/models.py``), batch 256,
SGD with momentum, random inputs, at K = 2, 9 and 40 heads. Each step is a
full training step (the update of the summed loss is applied) that also
computes the ``(K, K)`` lookahead affinity, timed round-robin in one run
with the plain training step (``benchmarks.bench_step.time_steps``):

* ``official``: the official code's structure (google-research ``tag/``),
  in JAX: each task's gradient by its own backward pass through the whole
  network, then one lookahead forward pass per source task;
* ``library, vmap``: :func:`mgda_jax.tag.lookahead_affinity` on MGDA-UB's
  input (one forward pass, the per-task gradients at Z pulled back through
  the encoder, ``vmap``-ed), the K lookahead forward passes ``vmap``-ed;
* ``library, unroll``: the same, the forward passes unrolled;
* ``linearized``: the first-order affinity, no lookahead forward pass;
* ``representation``: :func:`mgda_jax.tag.representation_affinity`, from
  the Gram matrix at Z alone (an approximation: its figures differ).

"every 10" is the cost of a run that computes the affinity every 10th step,
``(9 t_plain + t_affinity) / (10 t_plain)``: the issue's target is 1.2 at
K = 9.

Run with ``make bench`` or ``python -m benchmarks.bench_tag``.
"""

import argparse
import os
import platform

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import bench_step
from experiments.multimnist import models
import mgda_jax
from mgda_jax import tag


def make_steps(num_tasks, num_classes, batch=256):
  names = [f'task{i}' for i in range(num_tasks)]
  model = models.MultiLeNet(names, num_classes, rngs=nnx.Rngs(0))
  _, params, encode, task_losses = models.functional(model)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(size=(batch, 28, 28, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, num_classes, size=(batch, num_tasks)),
                       jnp.int32)
  sgd = optax.sgd(0.05, momentum=0.9)
  shared = lambda p: jax.tree_util.tree_map_with_path(
      lambda path, _: path[0].key == 'encoder', p)

  def all_losses(params, x, labels, key):
    return task_losses(params, encode(params, x, labels, key), x, labels,
                       key)[0]

  def apply(params, opt_state, grads):
    updates, opt_state = sgd.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  @jax.jit
  def plain(params, opt_state, x, labels, key):
    grads = jax.grad(lambda p: jnp.sum(all_losses(p, x, labels, key)))(params)
    params, opt_state = apply(params, opt_state, grads)
    return params, opt_state, jnp.zeros(())

  @jax.jit
  def official(params, opt_state, x, labels, key):
    losses = all_losses(params, x, labels, key)
    mask = shared(params)
    rows = []
    for i in range(num_tasks):  # one backward pass per task
      g = jax.grad(lambda p, i=i: all_losses(p, x, labels, key)[i])(params)
      g = jax.tree.map(lambda v, m: v if m else jnp.zeros_like(v), g, mask)
      u, _ = sgd.update(g, opt_state, params)
      u = jax.tree.map(lambda v, m: v if m else jnp.zeros_like(v), u, mask)
      # one lookahead forward pass per source task
      after = all_losses(optax.apply_updates(params, u), x, labels, key)
      rows.append(1.0 - after / losses)
    grads = jax.grad(lambda p: jnp.sum(all_losses(p, x, labels, key)))(params)
    params, opt_state = apply(params, opt_state, grads)
    return params, opt_state, jnp.stack(rows)

  def library(mode):
    @jax.jit
    def step(params, opt_state, x, labels, key):
      (losses, _), grads = mgda_jax.representation_grads(
          encode, task_losses, params, x, labels, key, has_aux=True,
          per_task_z=num_tasks)
      if mode == 'representation':
        z = tag.representation_affinity(grads, losses)
        params, opt_state = apply(params, opt_state,
                                  grads.weighted_grads(jnp.ones(num_tasks)))
        return params, opt_state, z
      z = tag.lookahead_affinity(
          lambda p, *a: (all_losses(p, *a), None), params, x, labels, key,
          has_aux=True, optimizer=sgd, opt_state=opt_state, shared=shared,
          grads=grads, losses=losses, unroll=mode == 'unroll',
          linearize=mode == 'linearized').affinity
      params, opt_state = apply(params, opt_state,
                                grads.weighted_grads(jnp.ones(num_tasks)))
      return params, opt_state, z
    return step

  steps = {'plain': plain, 'official': official,
           'library, vmap': library('vmap'),
           'library, unroll': library('unroll'),
           'linearized': library('linearized'),
           'representation': library('representation')}
  state = sgd.init(params)
  return {n: (f, state) for n, f in steps.items()}, params, x, labels


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--repeats', type=int, default=12)
  p.add_argument('--tasks', type=int, nargs='*', default=[2, 9, 40])
  args = p.parse_args(argv)
  print(f'# {platform.processor() or platform.machine()}, '
        f'{os.cpu_count()} CPUs, jax {jax.__version__} '
        f'({jax.default_backend()})')
  print('\n== TAG affinity step vs training step (same run) ==')
  print(f"  {'K':>3s} {'step':>16s} {'ms':>9s} {'x plain':>8s} "
        f"{'every 10':>9s}")
  for k in args.tasks:
    steps, params, x, labels = make_steps(k, 10 if k == 2 else 2)
    key = jax.random.key(0)
    ref = steps['official'][0](params, steps['official'][1], x, labels, key)[2]
    diff = {n: float(jnp.max(jnp.abs(f(params, s, x, labels, key)[2] - ref)))
            for n, (f, s) in steps.items()
            if n not in ('plain', 'representation')}
    t = bench_step.time_steps(steps, params, x, labels, args.repeats)
    for name, v in t.items():
      ratio = v / t['plain']
      agree = f'  max |Z - Z_official| {diff[name]:.1e}' if name in diff else ''
      print(f'  {k:3d} {name:>16s} {v * 1e3:9.2f} {ratio:8.2f} '
            f'{(9 + ratio) / 10:9.2f}{agree}')


if __name__ == '__main__':
  main()
