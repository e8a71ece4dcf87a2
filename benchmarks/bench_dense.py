"""Dense-representation benchmark: MGDA-UB's memory and time on Cityscapes.

The Cityscapes network (``experiments/cityscapes/models.py``: dilated
ResNet-50, three pyramid-pooling decoders; semantic, instance, disparity),
Adam, random inputs. The per-task gradients at ``Z`` are ``K x B x |Z|``
floats: 3 x 8 x (2048 x 32 x 64), about 400 MB, at the paper's 256x512 and
batch 8. Three training steps, each one jitted program:

* ``sum``: one backward pass of the summed loss (plain uniform weighting,
  the baseline of every ratio);
* ``uniform``: the experiment framework's step for uniform weighting
  (through ``representation_grads``, as every method but full MGDA runs);
* ``mgda_ub``: the framework's MGDA-UB step (normaliser 'none').

For each: XLA's peak temporary memory (``compiled.memory_analysis()``,
``temp_size_in_bytes``, plus arguments and outputs), and, with ``--time``,
the median step time over ``--repeats`` steps timed round-robin after
compilation. ``--height/--width/--batch`` shrink the problem for a CPU
(the default is the paper's input at batch 2; memory is read from the
compiled program, so it needs no run).

    python -m benchmarks.bench_dense [--batch 2] [--time] [--small]
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

from experiments.cityscapes import models
from experiments.cityscapes import train
from experiments.common import methods as methods_lib
from experiments.common import trainer

TASKS = train.OFFICIAL_TASKS


def batch(b, h, w, rng):
  x = jnp.asarray(rng.integers(0, 256, (b, h, w, 3)), jnp.uint8)
  labels = {
      'semantic': jnp.asarray(rng.integers(0, 19, (b, h, w)), jnp.uint8),
      'instance': {'offset': jnp.asarray(rng.normal(size=(b, h, w, 2)),
                                         jnp.float32),
                   'valid': jnp.asarray(rng.random((b, h, w)) > 0.5,
                                        jnp.float32)},
      'disparity': jnp.asarray(rng.random((b, h, w)) * 50, jnp.float32)}
  return x, labels


def steps(config):
  """``{name: (jitted step, args)}`` for the three steps."""
  model = train.make_model(config, TASKS, nnx.Rngs(0))
  graphdef, params, stats, encode, task_losses = models.functional(model)
  rng = np.random.default_rng(0)
  x, labels = batch(config.batch_size, config.data.height, config.data.width,
                    rng)
  key = jax.random.key(0)
  out = {}

  tx = optax.adam(1e-4)

  @jax.jit
  def sum_step(params, stats, opt_state, x, labels):
    def total(p):
      z, new_stats = encode(p, stats, x, labels, key)
      losses, _ = task_losses(p, z[None].repeat(len(TASKS), 0), x, labels,
                              key)
      return jnp.sum(losses), new_stats
    (_, stats), g = jax.value_and_grad(total, has_aux=True)(params)
    updates, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state

  out['sum'] = (sum_step, (params, stats, tx.init(params), x, labels))
  experiment = train.OFFICIAL
  for name in ('uniform_weighting', 'mgda_ub'):
    c = config.copy_and_resolve_references()
    c.method = name
    method = methods_lib.build(c, len(TASKS), steps_per_epoch=1,
                               shared=experiment.shared)
    train_chunk, _ = trainer.make_functions(
        experiment, c, (graphdef, encode, task_losses, None), method,
        len(TASKS), names=TASKS)
    opt_state = method.tx.init(params)
    idx = jnp.arange(config.batch_size)[None]
    args = (params, stats, opt_state, (), x, labels,
            idx, key, 0)
    out['uniform' if name == 'uniform_weighting' else name] = (
        train_chunk, args)
  return out


def memory(fn, args):
  compiled = fn.lower(*args).compile()
  m = compiled.memory_analysis()
  return m.temp_size_in_bytes + m.argument_size_in_bytes + \
      m.output_size_in_bytes, m.temp_size_in_bytes


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--batch', type=int, default=2)
  p.add_argument('--height', type=int, default=256)
  p.add_argument('--width', type=int, default=512)
  p.add_argument('--time', action='store_true', help='also time the steps')
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--small', action='store_true',
                 help='the small encoder (a quick check)')
  args = p.parse_args(argv)
  config = train.OFFICIAL.default_config()
  config.batch_size = args.batch
  config.data.height, config.data.width = args.height, args.width
  if args.small:
    config.model.encoder, config.model.decoder_width = 'small', 32
  print(f'# bench_dense: {platform.machine()}, {os.cpu_count()} CPUs, '
        f'{jax.devices()[0].platform}; jax {jax.__version__}; '
        f'{config.model.encoder}, batch {args.batch}, '
        f'{args.height}x{args.width}, K = {len(TASKS)}')
  fns = steps(config)
  z = jax.eval_shape(
      lambda x: train.make_model(config, TASKS, nnx.Rngs(0)).encoder(x),
      jax.ShapeDtypeStruct((args.batch, args.height, args.width, 3),
                           jnp.uint8))
  stack = len(TASKS) * np.prod(z.shape) * 4
  print(f'Z: {z.shape}; the K x B x |Z| stack: {stack / 2**20:.0f} MiB')
  mem = {}
  for name, (fn, a) in fns.items():
    mem[name] = memory(fn, a)
  base = mem['sum'][0]
  print('| step | peak (MiB) | temp (MiB) | peak / sum |')
  print('| --- | ---: | ---: | ---: |')
  for name, (peak, temp) in mem.items():
    print(f'| {name} | {peak / 2**20:.0f} | {temp / 2**20:.0f} | '
          f'{peak / base:.3f} |')
  if not args.time:
    return
  times = {n: [] for n in fns}
  state = {n: a for n, (f, a) in fns.items()}
  for n, (f, a) in fns.items():
    jax.block_until_ready(f(*a))  # compile and warm up
  for _ in range(args.repeats):
    for n, (f, a) in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(f(*state[n]))
      times[n].append(time.perf_counter() - t)
  base = np.median(times['sum'])
  print('| step | median (s) | / sum |')
  print('| --- | ---: | ---: |')
  for n, t in times.items():
    print(f'| {n} | {np.median(t):.3f} | {np.median(t) / base:.3f} |')


if __name__ == '__main__':
  main()
