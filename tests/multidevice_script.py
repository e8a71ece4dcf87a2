"""Run by test_multidevice.py in a fresh process with 8 simulated CPU devices.

For every registered method and both inputs, one step in each
data-parallel mode against the one-device step on the whole batch:

* ``jit_explicit``: jax.jit on a batch sharded over ``jax.make_mesh`` as JAX
  makes it by default (Explicit axes);
* ``jit_auto``: the same on an Auto mesh;
* ``shard_map``: typed ``jax.shard_map`` (no ``axis_name``);
* ``shard_map_untyped``: ``check_vma=False`` with ``axis_name='data'``;
* ``pmap``: ``jax.pmap`` with ``axis_name='data'``.

Per-device losses and KPIs are each device's share of the global mean.
Prints one JSON line: the largest relative difference of the update, the
weights and the method's state, per method, input and mode.
"""

import inspect
import json
import os
import sys

if __name__ == '__main__':  # not when pytest imports it for doctests
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8')
  sys.path.insert(0, os.path.dirname(__file__))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

import mgda_jax  # pylint: disable=g-import-not-at-top,wrong-import-position

K, B, N = 3, 64, 8
MODES = ('jit_explicit', 'jit_auto', 'shard_map', 'shard_map_untyped', 'pmap')


def problem():
  rng = np.random.default_rng(0)
  f32 = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  params = {'encoder': {'w1': f32(6, 8), 'w2': f32(8, 5)},
            'heads': {'w': f32(K, 5, 3)}}
  return params, f32(B, 6), f32(B, K, 3)


def encode(params, x, y):
  del y
  p = params['encoder']
  return jnp.tanh(jnp.tanh(x @ p['w1']) @ p['w2'])


def heads(params, z, x, y, scale=1.0):
  """Per-task MSE, as a mean over the (local) batch times ``scale``."""
  del x
  pred = jnp.einsum('bd,kdo->kbo', z, params['heads']['w'])
  return scale * jnp.mean(jnp.sum((pred - y.transpose(1, 0, 2)) ** 2, -1), -1)


def all_losses(params, x, y, scale=1.0):
  return heads(params, encode(params, x, y), x, y, scale)


def kpis_of(y, scale=1.0):
  return scale * jnp.mean(jax.nn.sigmoid(y[:, :, 0]), axis=0)


def shared(p):
  return {'encoder': jax.tree.map(lambda _: True, p['encoder']),
          'heads': jax.tree.map(lambda _: False, p['heads'])}


def build(name, axis_name=None, kind='representation'):
  spec = mgda_jax.METHODS[name]
  kw = {}
  params = inspect.signature(spec.factory).parameters
  if name == 'prior_loss_weighting':
    kw['priors'] = jnp.array([1.0, 2.0, 0.5])
  if axis_name is not None:
    kw['axis_name'] = axis_name
  if kind == 'per_task' and 'shared' in params:
    kw['shared'] = shared
  return mgda_jax.make_method(name, K, **kw)


def cases():
  return [(n, kind) for n, s in mgda_jax.METHODS.items() for kind in s.inputs]


def step_all(txs, params, states, x, y, scale):
  """One update of every method, on local (scale=1/N) or global data."""
  local_heads = lambda p, z, xx, yy: heads(p, z, xx, yy, scale)
  l, g = mgda_jax.representation_grads(encode, local_heads, params, x, y)
  _, gp = mgda_jax.per_task_grads(
      lambda p, xx, yy: all_losses(p, xx, yy, scale), params, x, y)
  kpis = kpis_of(y, scale)
  out = {}
  for key, tx in txs.items():
    _, kind = key.split('|')
    out[key] = tx.update(g if kind == 'representation' else gp, states[key],
                         params, losses=l, kpis=kpis)
  return out


def rel(a, b):
  worst = 0.0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.dtype.kind not in 'fc' or x.size == 0:
      if not np.array_equal(x, y):
        return float('inf')
      continue
    if np.all(np.isnan(y)) and np.all(np.isnan(x)):
      continue
    worst = max(worst, float(np.max(np.abs(x - y)) /
                             max(np.max(np.abs(y)), 1e-30)))
  return worst


def main():
  assert jax.device_count() == N, jax.devices()
  params, x, y = problem()
  keys = [f'{n}|{kind}' for n, kind in cases()]

  def txs_for(axis_name):
    return {k: build(k.split('|')[0], axis_name, k.split('|')[1])
            for k in keys}

  ref_txs = txs_for(None)
  states0 = {k: tx.init(params) for k, tx in ref_txs.items()}
  ref = jax.jit(lambda p, s, x, y: step_all(ref_txs, p, s, x, y, 1.0))(
      params, states0, x, y)

  got = {}
  explicit = jax.make_mesh((N,), ('data',))  # JAX's default: Explicit axes
  auto = jax.make_mesh((N,), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  for mode in MODES:
    mesh = explicit if mode == 'jit_explicit' else auto
    data = NamedSharding(mesh, P('data'))
    rep = NamedSharding(mesh, P())
    xs, ys = jax.device_put(x, data), jax.device_put(y, data)
    ps, ss = jax.device_put(params, rep), jax.device_put(states0, rep)
    if mode in ('jit_explicit', 'jit_auto'):
      fn = jax.jit(lambda p, s, x, y: step_all(ref_txs, p, s, x, y, 1.0))
      if mode == 'jit_explicit':
        with jax.set_mesh(mesh):
          got[mode] = fn(ps, ss, xs, ys)
      else:
        got[mode] = fn(ps, ss, xs, ys)
    elif mode in ('shard_map', 'shard_map_untyped'):
      typed = mode == 'shard_map'
      txs = txs_for(None if typed else 'data')
      fn = jax.jit(jax.shard_map(
          lambda p, s, x, y: step_all(txs, p, s, x, y, 1.0 / N), mesh=mesh,
          in_specs=(P(), P(), P('data'), P('data')), out_specs=P(),
          check_vma=typed))
      got[mode] = fn(ps, ss, xs, ys)
    else:  # pmap
      txs = txs_for('data')
      fn = jax.pmap(lambda p, s, x, y: step_all(txs, p, s, x, y, 1.0 / N),
                    axis_name='data', in_axes=(None, None, 0, 0))
      out = fn(params, states0, x.reshape(N, B // N, *x.shape[1:]),
               y.reshape(N, B // N, *y.shape[1:]))
      got[mode] = jax.tree.map(lambda a: a[0], out)

  report = {}
  for mode in MODES:
    for k in keys:
      u, s = got[mode][k]
      ru, rs = ref[k]
      report[f'{mode}|{k}'] = {
          'update': rel(u, ru), 'weights': rel(s.weights, rs.weights),
          'inner': rel(s.inner, rs.inner), 'count': int(s.count),
          'result': int(s.info.result)}
  print(json.dumps(report))


if __name__ == '__main__':
  main()
