"""Run by test_multidevice.py in a fresh process with 8 simulated CPU devices.

Checks that data-parallel MGDA-UB and MGDA over a ``jax.sharding.Mesh`` give
the single-device step on the whole batch: with ``jax.shard_map`` and the
transforms' ``axis_name``, and with plain ``jax.jit`` on sharded inputs.
Prints one JSON line of the largest relative differences.
"""

import json
import os
import sys

if __name__ == '__main__':  # not when pytest imports it for doctests
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8')
  sys.path.insert(0, os.path.dirname(__file__))

import chex  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import optax  # pylint: disable=g-import-not-at-top,wrong-import-position

import mgda_jax  # pylint: disable=g-import-not-at-top,wrong-import-position

K, B, N = 3, 64, 8


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


def shared(p):
  return {'encoder': jax.tree.map(lambda _: True, p['encoder']),
          'heads': jax.tree.map(lambda _: False, p['heads'])}


def rel(a, b):
  a, b = jax.tree.leaves(a), jax.tree.leaves(b)
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))) /
                   max(np.max(np.abs(np.asarray(y))), 1e-30))
             for x, y in zip(a, b))


def main():
  assert jax.device_count() == N, jax.devices()
  # Auto axes: XLA's partitioner places the reductions (the default in
  # recent JAX is Explicit sharding, which asks for them to be spelled out).
  mesh = jax.make_mesh((N,), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  params, x, y = problem()
  sgd = optax.sgd(0.1)
  out = {}

  # Reference: one device, the whole batch.
  tx_ub = optax.chain(mgda_jax.mgda_ub(K), sgd)
  losses, g = mgda_jax.representation_grads(encode, heads, params, x, y)
  ref_ub, ref_ub_state = tx_ub.update(g, tx_ub.init(params), params,
                                      losses=losses)
  tx_m = optax.chain(mgda_jax.mgda(K, shared=shared), sgd)
  _, gp = mgda_jax.per_task_grads(all_losses, params, x, y)
  ref_m, ref_m_state = tx_m.update(gp, tx_m.init(params), params)

  # 1. shard_map: each device its batch shard, the transforms psum.
  tx_ub_dp = optax.chain(mgda_jax.mgda_ub(K, axis_name='data'), sgd)
  tx_m_dp = optax.chain(mgda_jax.mgda(K, shared=shared, axis_name='data'),
                        sgd)

  def local_step(params, x, y, s_ub, s_m):
    local_heads = lambda p, z, xx, yy: heads(p, z, xx, yy, 1.0 / N)
    l, g = mgda_jax.representation_grads(encode, local_heads, params, x, y)
    u_ub, s_ub = tx_ub_dp.update(g, s_ub, params, losses=l)
    _, gp = mgda_jax.per_task_grads(
        lambda p, xx, yy: all_losses(p, xx, yy, 1.0 / N), params, x, y)
    u_m, s_m = tx_m_dp.update(gp, s_m, params)
    return u_ub, s_ub, u_m, s_m

  traces = []

  def make_dp_step(check_vma):
    @jax.jit
    def dp_step(params, x, y, s_ub, s_m):
      traces.append(check_vma)
      return jax.shard_map(
          local_step, mesh=mesh,
          in_specs=(P(), P('data'), P('data'), P(), P()),
          out_specs=(P(), P(), P(), P()), check_vma=check_vma)(
              params, x, y, s_ub, s_m)
    return dp_step

  dp_step = make_dp_step(True)
  replicated = NamedSharding(mesh, P())
  xs = jax.device_put(x, NamedSharding(mesh, P('data')))
  ys = jax.device_put(y, NamedSharding(mesh, P('data')))
  params_r = jax.device_put(params, replicated)
  s_ub, s_m = jax.device_put((tx_ub_dp.init(params), tx_m_dp.init(params)),
                             replicated)
  u_ub, s_ub2, u_m, s_m2 = dp_step(params_r, xs, ys, s_ub, s_m)
  out['shard_map_mgda_ub_update'] = rel(u_ub, ref_ub)
  out['shard_map_mgda_ub_alpha'] = rel(s_ub2[0].info.weights,
                                       ref_ub_state[0].info.weights)
  out['shard_map_mgda_update'] = rel(u_m, ref_m)
  out['shard_map_mgda_alpha'] = rel(s_m2[0].info.weights,
                                    ref_m_state[0].info.weights)
  for i in range(3):  # a training loop: new data and state, one compilation
    xi = jax.device_put(x * (1.0 + 0.01 * i), NamedSharding(mesh, P('data')))
    params_r = jax.tree.map(lambda p, u: p + u, params_r, u_ub)
    u_ub, s_ub2, u_m, s_m2 = dp_step(params_r, xi, ys, s_ub2, s_m2)
  out['shard_map_traces'] = len(traces)

  # pmap-style semantics (check_vma=False): axis_name sums explicitly.
  u_ub, s_ub3, u_m, s_m3 = make_dp_step(False)(
      jax.device_put(params, replicated),
      jax.device_put(x, NamedSharding(mesh, P('data'))), ys, s_ub, s_m)
  out['untyped_mgda_ub_update'] = rel(u_ub, ref_ub)
  out['untyped_mgda_ub_alpha'] = rel(s_ub3[0].info.weights,
                                     ref_ub_state[0].info.weights)
  out['untyped_mgda_update'] = rel(u_m, ref_m)
  out['untyped_mgda_alpha'] = rel(s_m3[0].info.weights,
                                  ref_m_state[0].info.weights)

  # 1b. Typed shard_map with no axis_name: mgda_ub and a Gram method
  # (UPGrad) find the per-device values from their types.
  plain = {'mgda_ub': optax.chain(mgda_jax.mgda_ub(K), sgd),
           'upgrad': optax.chain(mgda_jax.upgrad(K), sgd)}
  refs = {}
  for name, tx in plain.items():
    refs[name] = tx.update(g, tx.init(params), params, losses=losses)

  def local_plain(params, x, y, states):
    local_heads = lambda p, z, xx, yy: heads(p, z, xx, yy, 1.0 / N)
    l, gg = mgda_jax.representation_grads(encode, local_heads, params, x, y)
    return {n: plain[n].update(gg, states[n], params, losses=l)
            for n in plain}

  states = jax.device_put({n: tx.init(params) for n, tx in plain.items()},
                          replicated)
  got = jax.jit(jax.shard_map(
      local_plain, mesh=mesh, in_specs=(P(), P('data'), P('data'), P()),
      out_specs=P()))(jax.device_put(params, replicated),
                      jax.device_put(x, NamedSharding(mesh, P('data'))), ys,
                      states)
  for n in plain:
    out[f'typed_no_axis_{n}_update'] = rel(got[n][0], refs[n][0])
  out['typed_no_axis_mgda_ub_alpha'] = rel(got['mgda_ub'][1][0].info.weights,
                                           refs['mgda_ub'][1][0].info.weights)
  out['typed_no_axis_upgrad_weights'] = rel(got['upgrad'][1][0].weights,
                                            refs['upgrad'][1][0].weights)

  # 2. jit with sharded inputs: the single-device code, XLA partitions it.
  @jax.jit
  def jit_step(params, x, y, s):
    l, g = mgda_jax.representation_grads(encode, heads, params, x, y)
    return tx_ub.update(g, s, params, losses=l)

  u_jit, s_jit = jit_step(params, xs, ys, tx_ub.init(params))
  out['jit_sharded_mgda_ub_update'] = rel(u_jit, ref_ub)
  out['jit_sharded_mgda_ub_alpha'] = rel(s_jit[0].info.weights,
                                         ref_ub_state[0].info.weights)
  out['jit_sharded_input_devices'] = len(xs.sharding.device_set)
  chex.assert_trees_all_close(s_jit[0].info.weights,
                              ref_ub_state[0].info.weights, rtol=1e-4)
  print(json.dumps(out))


if __name__ == '__main__':
  main()
