"""Training-step benchmark: MGDA-UB and full MGDA against uniform weighting.

The paper's MultiMNIST network (``experiments/multimnist/models.py``), batch
256, SGD with momentum, random inputs (the data do not change the cost). For
each configuration the three steps are jitted and timed round-robin in the
same run (median of repeated steps after compilation), and reported as
ratios to uniform weighting (one backward pass of the summed loss):

* K = 2 heads (dense 50->50->10), and K = 40 heads (dense 50->50->2);
* ``--scaling`` (``--only-scaling``): MGDA-UB / uniform as K grows (2 ...
  256) and as the representation Z grows (50 ... 800 wide), in time and in
  XLA's temporary memory (``compiled.memory_analysis()``); as K grows, also
  MGDA-UB with the heads' ``fuse_copies`` option (``models.dense_on_copies``);
* ``--pool``: the uniform step with reshape-and-max pooling against
  ``lax.reduce_window`` pooling;
* ``--conv``: the uniform and MGDA-UB steps with the first layer as
  ``models.conv_as_matmul`` (the model's) against ``lax.conv_general_dilated``;
* ``--scan``: a step per call against steps inside one ``lax.scan``, with
  the second layer as ``lax.conv_general_dilated`` or
  ``models.conv_nhwc_grads`` (the model's);
* ``--methods``: every gradient method of the library (MGDA-UB's input:
  per-task gradients at Z, one pullback) at K = 2, 10 and 40, as a ratio to
  uniform weighting timed in the same rotation.

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


# Every registered method that reads the gradients (the loss weightings
# cost what uniform weighting costs), on representation gradients (the
# MGDA-UB input), from the registry: a new method is benchmarked as soon as
# it is registered.
GRADIENT_METHODS = {
    ('mgda_ub (library)' if name == 'mgda_ub' else name):
        (lambda k, name=name: mgda_jax.make_method(name, k))
    for name, spec in mgda_jax.METHODS.items()
    if (spec.family == 'gradient' or name == 'gradnorm') and name != 'mgda'
    and 'representation' in spec.inputs
}


def make_steps(num_tasks, num_classes, batch=256, rep_dim=50,
               pool=models.max_pool_2x2, which=('uniform', 'mgda_ub', 'mgda'),
               first_conv=None, second_conv=None, fuse_copies=False):
  """Jitted training steps and their initial arguments (``first_conv``,
  ``second_conv``: another function for that layer's ``nnx.Conv``;
  ``fuse_copies``: the heads' option of that name)."""
  names = [f'task{i}' for i in range(num_tasks)]
  model = models.MultiLeNet(names, num_classes, rngs=nnx.Rngs(0), pool=pool,
                            rep_dim=rep_dim, fuse_copies=fuse_copies)
  if first_conv is not None:
    model.encoder.conv1.conv_general_dilated = first_conv
  if second_conv is not None:
    model.encoder.conv2.conv_general_dilated = second_conv
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
  for name in which:
    if name in GRADIENT_METHODS:
      tx_g = optax.chain(GRADIENT_METHODS[name](num_tasks), sgd)

      def method_step(params, opt_state, x, labels, key, tx_g=tx_g):
        (losses, logits), grads = mgda_jax.representation_grads(
            encode, task_losses, params, x, labels, key, has_aux=True,
            per_task_z=num_tasks)
        kpis = jnp.mean(jnp.argmax(logits, -1) == labels.T, axis=1)
        updates, opt_state = tx_g.update(grads, opt_state, params,
                                         losses=losses, kpis=kpis)
        return optax.apply_updates(params, updates), opt_state, losses

      steps[name] = (jax.jit(method_step), tx_g.init(params))
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


def temp_bytes(steps, params, x, labels):
  """XLA's temporary buffer size of each compiled step (its working memory).

  From ``compiled.memory_analysis()``: the peak of the buffers the program
  allocates beyond its arguments and outputs, as XLA's buffer assignment
  computed it (a static figure, the same on every run).
  """
  key = jax.random.key(1)
  out = {}
  for name, (fn, opt_state) in steps.items():
    mem = fn.lower(params, opt_state, x, labels, key).compile().memory_analysis()
    out[name] = getattr(mem, 'temp_size_in_bytes', float('nan'))
  return out


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


def _main_table(args):
  print('\n== training step, ratios to uniform weighting (same run) ==')
  print(f"  {'K':>3s} {'uniform':>11s} {'MGDA-UB':>11s} {'MGDA':>11s} "
        f"{'UB/unif':>8s} {'MGDA/unif':>9s} {'MGDA/UB':>8s}")
  for k, c in ((2, 10), (40, 2)):
    t = time_steps(*make_steps(k, c), args.repeats)
    print(f"  {k:3d} {t['uniform'] * 1e3:8.2f} ms {t['mgda_ub'] * 1e3:8.2f} ms "
          f"{t['mgda'] * 1e3:8.2f} ms {t['mgda_ub'] / t['uniform']:8.2f} "
          f"{t['mgda'] / t['uniform']:9.2f} {t['mgda'] / t['mgda_ub']:8.2f}")


def _pool(args):
  print('\n== pooling layer, uniform step, K=2 ==')
  t = {}
  for name, pool in (('reshape+max', models.max_pool_2x2),
                     ('reduce_window', models.max_pool_2x2_reduce_window)):
    steps, *rest = make_steps(2, 10, pool=pool, which=('uniform',))
    t[name] = time_steps(steps, *rest, args.repeats)['uniform']
    print(f'  {name:14s} {t[name] * 1e3:8.2f} ms')
  print(f"  reduce_window / reshape+max: "
        f"{t['reduce_window'] / t['reshape+max']:.2f}")


def _conv(args):
  print('\n== first layer (1 -> 10 channels, 5x5): lax convolution against '
        'conv_as_matmul (same rotation) ==')
  for k, c in ((2, 10), (40, 2)):
    steps = {}
    for name, conv in (('matmul', None),
                       ('convolution', jax.lax.conv_general_dilated)):
      # The same parameters and data for both (nnx.Rngs(0)).
      built, *rest = make_steps(k, c, first_conv=conv,
                                which=('uniform', 'mgda_ub'))
      steps.update({f'{m} {name}': s for m, s in built.items()})
    t = time_steps(steps, *rest, args.repeats)
    for m in ('uniform', 'mgda_ub'):
      print(f"  K={k:2d} {m:8s}: convolution {t[f'{m} convolution'] * 1e3:8.2f}"
            f" ms, matmul {t[f'{m} matmul'] * 1e3:8.2f} ms, convolution / "
            f"matmul {t[f'{m} convolution'] / t[f'{m} matmul']:.2f}")


def scanned_seconds(step, params, opt_state, x, labels, length=15,
                    repeats=5):
  """Median seconds per step of ``length`` steps in one ``lax.scan``."""
  key = jax.random.key(1)

  @jax.jit
  def run(params, opt_state):
    def body(carry, i):
      p, s, _ = step(*carry, x, labels, jax.random.fold_in(key, i))
      return (p, s), None
    return jax.lax.scan(body, (params, opt_state), jnp.arange(length))[0]

  state = jax.block_until_ready(run(params, opt_state))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    state = jax.block_until_ready(run(*state))
    times.append((time.perf_counter() - t0) / length)
  return float(np.median(times))


def _scan(args):
  print('\n== a step per call against 15 steps in one lax.scan, with the '
        'second layer (10 -> 20, 5x5) as lax.conv_general_dilated or '
        'conv_nhwc_grads (K=2) ==')
  for name, conv in (('lax', jax.lax.conv_general_dilated),
                     ('conv_nhwc_grads', models.conv_nhwc_grads)):
    steps, params, x, labels = make_steps(2, 10, second_conv=conv,
                                          which=('uniform', 'mgda_ub'))
    per_call = time_steps(steps, params, x, labels, args.repeats)
    for m, (fn, opt_state) in steps.items():
      scanned = scanned_seconds(fn, params, opt_state, x, labels,
                                repeats=max(3, args.repeats // 6))
      print(f'  {name:16s} {m:8s}: per call {per_call[m] * 1e3:8.2f} ms, '
            f'scanned {scanned * 1e3:8.2f} ms per step, scanned / per call '
            f'{scanned / per_call[m]:.2f}', flush=True)


def _scaling(args):
  print('\n== MGDA-UB / uniform as K grows (heads 50->50->2) ==')
  print('  (fused: the heads built with fuse_copies=True, timed in the same '
        'rotation)')
  for k in (2, 10, 40, 100, 256):
    steps, *rest = make_steps(k, 2, which=('uniform', 'mgda_ub'))
    fused, *_ = make_steps(k, 2, which=('mgda_ub',), fuse_copies=True)
    built = ({**steps, 'fused': fused['mgda_ub']}, *rest)
    t = time_steps(*built, args.repeats)
    mem = temp_bytes(*built)
    print(f"  K={k:3d}: uniform {t['uniform'] * 1e3:8.2f} ms, MGDA-UB "
          f"{t['mgda_ub'] * 1e3:8.2f} ms, ratio "
          f"{t['mgda_ub'] / t['uniform']:.2f}, fused "
          f"{t['fused'] * 1e3:8.2f} ms, ratio "
          f"{t['fused'] / t['uniform']:.2f}; XLA temp memory uniform "
          f"{mem['uniform'] / 2**20:7.2f} MiB, MGDA-UB "
          f"{mem['mgda_ub'] / 2**20:7.2f} MiB "
          f"({mem['mgda_ub'] / mem['uniform']:.2f}x), fused "
          f"{mem['fused'] / 2**20:7.2f} MiB "
          f"({mem['fused'] / mem['uniform']:.2f}x)")
  print('\n== MGDA-UB / uniform as the representation grows (K=2) ==')
  for width in (50, 200, 800):
    built = make_steps(2, 10, rep_dim=width, which=('uniform', 'mgda_ub'))
    t = time_steps(*built, args.repeats)
    mem = temp_bytes(*built)
    print(f"  |Z| = 256 x {width:3d}: uniform {t['uniform'] * 1e3:8.2f} ms, "
          f"MGDA-UB {t['mgda_ub'] * 1e3:8.2f} ms, ratio "
          f"{t['mgda_ub'] / t['uniform']:.2f}; XLA temp memory uniform "
          f"{mem['uniform'] / 2**20:7.2f} MiB, MGDA-UB "
          f"{mem['mgda_ub'] / 2**20:7.2f} MiB")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=30)
  parser.add_argument('--scaling', action='store_true')
  parser.add_argument('--pool', action='store_true')
  parser.add_argument('--conv', action='store_true')
  parser.add_argument('--methods', action='store_true')
  parser.add_argument('--only-methods', action='store_true')
  parser.add_argument('--only-scaling', action='store_true')
  parser.add_argument('--only-conv', action='store_true')
  parser.add_argument('--scan', action='store_true')
  parser.add_argument('--only-scan', action='store_true')
  args = parser.parse_args(argv)
  print(f'jax {jax.__version__} on {jax.devices()[0].platform} '
        f'({jax.devices()[0].device_kind}); {platform.processor() or ""} '
        f'{os.cpu_count()} CPUs; batch 256, MultiLeNet')

  if args.methods or args.only_methods:
    print('\n== every gradient method, step time / uniform (same rotation; '
          'heads 50->50->10 at K=2, 50->50->2 above) ==')
    names = ['mgda', *GRADIENT_METHODS]
    print(f"  {'method':24s} " + ' '.join(f'{f"K={k}":>8s}'
                                          for k in (2, 10, 40)))
    table = {}
    uniform_ms = {}
    for k in (2, 10, 40):
      t = time_steps(*make_steps(k, 10 if k == 2 else 2,
                                 which=('uniform', *names)),
                     max(args.repeats // 3, 8))
      uniform_ms[k] = t['uniform'] * 1e3
      for name in names:
        table.setdefault(name, {})[k] = t[name] / t['uniform']
    print(f"  {'uniform (ms)':24s} " + ' '.join(
        f'{uniform_ms[k]:8.2f}' for k in (2, 10, 40)))
    for name in names:
      print(f'  {name:24s} ' + ' '.join(f'{table[name][k]:8.2f}'
                                        for k in (2, 10, 40)))
    if args.only_methods:
      return

  if args.only_conv:
    _conv(args)
    return
  if args.only_scan:
    _scan(args)
    return
  if not args.only_scaling:
    _main_table(args)
    if args.pool:
      _pool(args)
    if args.conv:
      _conv(args)
    if args.scan:
      _scan(args)
  if args.scaling or args.only_scaling:
    _scaling(args)


if __name__ == '__main__':
  main()
