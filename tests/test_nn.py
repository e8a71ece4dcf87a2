"""mgda_jax.nn: the architectures against their papers' formulas, their
declared representation and shared parameters against jax.jacrev, and every
registered method on every architecture."""

import functools
import inspect
import itertools
import subprocess
import sys

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from qp_reference import enumerate_qp

import mgda_jax

nnx = pytest.importorskip('flax.nnx')
mnn = pytest.importorskip('mgda_jax.nn')

B, D, H = 6, 4, 6   # batch, input width, feature width


def dense(i, o):
  return lambda rngs: nnx.Sequential(nnx.Linear(i, o, rngs=rngs), nnx.tanh)


def heads(k, width=H, out=1, seed=7):
  r = nnx.Rngs(seed)
  return [nnx.Linear(width, out, rngs=r) for _ in range(k)]


def n_params(module):
  return sum(int(np.prod(l.shape))
             for l in jax.tree.leaves(nnx.state(module, nnx.Param)))


def conv(i, o, rngs, stride=1):
  return nnx.Sequential(nnx.Conv(i, o, (3, 3), strides=stride, rngs=rngs),
                        nnx.tanh)


def mtan_parts(rngs):
  stages = [(conv(3, 3, rngs), conv(3, 3, rngs)),
            conv(3, 4, rngs, 2)]               # a one-module stage
  return stages, [3, 4]


def mtan_heads(k):
  r = nnx.Rngs(7)
  return [nnx.Conv(4, 2, (1, 1), rngs=r) for _ in range(k)]


# name -> (builder(rngs) -> model, input shape, K)
ARCHS = {
    'hard_sharing': (lambda r: mnn.HardSharing(dense(D, H)(r), heads(2)),
                     (B, D), 2),
    'hard_sharing_dict': (lambda r: mnn.HardSharing(
        dense(D, H)(r), dict(zip(('b', 'a'), heads(2)))), (B, D), 2),
    'mmoe': (lambda r: mnn.MMoE(dense(D, H), 3, D, heads(2), rngs=r),
             (B, D), 2),
    'cgc': (lambda r: mnn.CGC(dense(D, H), 2, [2, 0], D, heads(2),
                              rngs=r), (B, D), 2),
    'ple2': (lambda r: mnn.PLE([dense(D, H), dense(H, H)], 1, 1, [D, H],
                               heads(2), num_levels=2, rngs=r), (B, D), 2),
    'ple3': (lambda r: mnn.PLE([dense(D, H), dense(H, H), dense(H, H)], 2, 1,
                               [D, H, H], heads(2), num_levels=3, rngs=r),
             (B, D), 2),
    'mrn': (lambda r: mnn.MRN(dense(D, H)(r), heads(3, out=2)), (B, D), 3),
    # A FAFS tree: tasks 0, 1 share two blocks, task 2 leaves after one.
    'branched': (lambda r: mnn.Branched(
        [dense(D, H), dense(H, H), dense(H, H)], heads(3), rngs=r,
        groups=[[(0, 1, 2)], [(0, 1), (2,)], [(0,), (1,), (2,)]]),
                 (B, D), 3),
    'cross_stitch': (lambda r: mnn.CrossStitch([dense(D, H), dense(H, H)],
                                               heads(2), rngs=r), (B, D), 2),
    'sluice': (lambda r: mnn.Sluice([dense(D, H), dense(H, H), dense(H, H)],
                                    heads(2), rngs=r), (B, D), 2),
    'mtan': (lambda r: mnn.MTAN(*mtan_parts(r), mtan_heads(2), rngs=r),
             (1, 4, 4, 3), 2),
    # MTAN over dense features (no spatial axes), with the official code's
    # one extractor per stage for all tasks.
    'mtan_shared_f': (lambda r: mnn.MTAN(
        [(dense(D, H)(r), dense(H, H)(r)), dense(H, H)(r)], [H, H], heads(2),
        rngs=r, share_extractor=True, norm='layer', spatial_dims=0),
                      (B, D), 2),
}
NAMES = sorted(ARCHS)
REP_NAMES = [n for n in NAMES if n != 'mtan_shared_f']


@functools.lru_cache(maxsize=None)
def _built(name, seed):
  make, shape, k = ARCHS[name]
  model = make(nnx.Rngs(seed))
  x = jax.random.normal(jax.random.key(seed + 1), shape)
  return model, x, k


def build(name, seed=0):
  """A fresh copy of architecture ``name`` (built once per process)."""
  model, x, k = _built(name, seed)
  return nnx.clone(model), x, k


def targets(model, x, seed=3):
  graphdef, state = nnx.split(model)
  outs = jax.eval_shape(lambda s: nnx.merge(graphdef, s)(x), state)
  outs = list(outs.values()) if isinstance(outs, dict) else list(outs)
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=o.shape), jnp.float32)
               for o in outs)


def loss_fn(outputs, ys):
  outs = list(outputs.values()) if isinstance(outputs, dict) else outputs
  return jnp.stack([jnp.mean((o - y) ** 2) for o, y in zip(outs, ys)])


def setup(name, seed=0):
  model, x, k = build(name, seed)
  ys = targets(nnx.clone(model), x)
  return model, mnn.functional(model, loss_fn), x, ys, k


def leaves_with_paths(tree):
  return [(mnn.path_keys(p), l) for p, l in
          jax.tree_util.tree_flatten_with_path(tree)[0]]


# --------------------------------------------------------------------------
# One compiled program per architecture computes everything the contract and
# reference tests read (XLA compiles dominate this file's time on CPU).


@functools.lru_cache(maxsize=None)
def computed(name):
  """Forward passes, jax.jacrev references, and MGDA / MGDA-UB steps.

  Everything flat: ``flat_p`` is ``ravel_pytree(params)``, ``Z`` raveled too.
  """
  model, fns, x, ys, k = setup(name)
  params, state = fns.params, fns.state
  leaves, treedef = jax.tree.flatten(params)
  sizes = [int(np.prod(l.shape)) for l in leaves]
  offsets = np.cumsum([0] + sizes)

  def unravel(v):   # ravel_pytree's inverse, by hand (no eager op)
    return treedef.unflatten([v[o:o + n].reshape(l.shape) for o, n, l in
                              zip(offsets[:-1], sizes, leaves)])

  flat_mask = np.concatenate([np.full(n, bool(m)) for n, m in zip(
      sizes, jax.tree.leaves(fns.shared(params)))])
  rep = fns.representation
  tx_pt = mgda_jax.mgda(k, shared=fns.shared)
  tx_ub = mgda_jax.mgda_ub(k)
  tx_uni = mgda_jax.uniform_weighting(k)

  def merged(p):
    return nnx.merge(fns.graphdef, p, state)

  def losses_of(fp):
    return loss_fn(merged(unravel(fp))(x), ys)

  @jax.jit
  def program(params):
    res = {'out': merged(params)(x)}
    m = merged(params)
    res['again'] = m.decode(m.represent(x), x)
    fp = ravel_pytree(params)[0]
    res['jac'] = jax.jacrev(losses_of)(fp)                         # (K, P)
    losses, grads, _, _ = mnn.task_gradients(fns, 'per_task', params, state,
                                             x, ys)
    d, s = tx_pt.update(grads, tx_pt.init(params), params, losses=losses)
    res['mgda'] = (ravel_pytree(d)[0], s.weights)
    if rep:
      z0 = merged(params).represent(x)
      zf0, unravel_z = ravel_pytree(z0)

      def z_of(fp):
        return ravel_pytree(merged(unravel(fp)).represent(x))[0]

      def heads_of(fp, zf):
        return loss_fn(merged(unravel(fp)).decode(unravel_z(zf), x), ys)

      res['J'] = jax.jacrev(z_of)(fp)                              # (Z, P)
      res['R'] = jax.jacrev(lambda zf: heads_of(fp, zf))(zf0)      # (K, Z)
      res['Hg'] = jax.jacrev(lambda q: heads_of(q, zf0))(fp)       # (K, P)
      losses, grads, _, _ = mnn.task_gradients(
          fns, 'representation', params, state, x, ys)
      d, s = tx_ub.update(grads, tx_ub.init(params), params, losses=losses)
      res['mgda_ub'] = (ravel_pytree(d)[0], s.weights)
      d, _ = tx_uni.update(grads, tx_uni.init(params), params, losses=losses)
      res['uniform'] = ravel_pytree(d)[0]
    return res

  res = jax.tree.map(np.asarray, program(params))
  return model, fns, k, flat_mask, (offsets, sizes), res


@pytest.mark.parametrize('name', NAMES)
def test_decode_of_represent_is_the_model_and_shared_is_what_jacrev_says(
    name):
  """decode(represent(x)) == model(x); represent reads only the shared
  parameters and decode only task-specific ones; ``shared`` is exactly the
  set of parameters whose jax.jacrev rows are non-zero for >= 2 tasks."""
  model, fns, k, mask, (offsets, sizes), res = computed(name)
  for a, b in zip(jax.tree.leaves(res['out']), jax.tree.leaves(res['again'])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  assert mask.any() and not mask.all()
  # Per leaf: how many tasks' losses it reaches. (A bias just before a
  # training-mode BatchNorm reaches none.)
  paths = [p for p, _ in leaves_with_paths(fns.params)]
  own = 0
  for path, o, n in zip(paths, offsets, sizes):
    g = res['jac'][:, o:o + n]
    shared = bool(mask[o])
    reached = int(np.sum(np.max(np.abs(g), axis=1) > 1e-8))
    if shared:
      assert reached >= 2, (name, path, reached)
    else:
      assert reached <= 1, (name, path, reached)
      own += reached
  assert own >= k
  if model.supports_representation:
    assert not np.any(res['J'][:, ~mask]), name      # Z: shared only
    assert not np.any(res['Hg'][:, mask]), name      # heads: task-specific
    # The chain rule the bound rests on: task gradients = R J + heads.
    np.testing.assert_allclose(res['jac'], res['R'] @ res['J'] + res['Hg'],
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('name', REP_NAMES)
def test_mgda_ub_against_jacrev_and_an_exact_qp(name):
  """The min-norm weights on the Gram of dL_t/dZ (jax.jacrev) meet the exact
  QP's optimum; the update is J^T sum_t alpha_t r_t plus each head's own
  gradient; a loss weighting gets the plain sum of the task gradients."""
  _, _, k, _, _, res = computed(name)
  r, jz, hg = res['R'].astype(np.float64), res['J'], res['Hg']
  gram = r @ r.T
  _, f_ref = enumerate_qp(gram)
  direction, alpha = res['mgda_ub']
  alpha = alpha.astype(np.float64)
  assert abs(alpha.sum() - 1) < 1e-5 and np.all(alpha >= -1e-7)
  assert alpha @ gram @ alpha <= (1 + 1e-4) * f_ref + 1e-10, name
  expect = alpha @ r @ jz + hg.sum(0)
  np.testing.assert_allclose(direction, expect, rtol=2e-4, atol=2e-6)
  np.testing.assert_allclose(res['uniform'], res['jac'].sum(0), rtol=2e-4,
                             atol=2e-6)
  if name in ('cross_stitch', 'sluice'):
    # Per-task columns: dL_t/dZ lives in task t's slots, the Gram at Z is
    # diagonal, and the min-norm weights are 1 / ||r_t||^2, normalised.
    np.testing.assert_array_equal(gram - np.diag(np.diag(gram)), 0.0)
    inv = 1.0 / np.diag(gram)
    np.testing.assert_allclose(alpha, inv / inv.sum(), rtol=1e-3)


@pytest.mark.parametrize('name', NAMES)
def test_full_mgda_against_jacrev_and_an_exact_qp(name):
  """Full MGDA on the parameter gradients over the declared shared mask."""
  _, _, k, mask, _, res = computed(name)
  g = res['jac'].astype(np.float64)
  gram = g[:, mask] @ g[:, mask].T
  _, f_ref = enumerate_qp(gram)
  direction, alpha = res['mgda']
  alpha = alpha.astype(np.float64)
  assert alpha @ gram @ alpha <= (1 + 1e-4) * f_ref + 1e-10, name
  expect = np.where(mask, alpha @ g, g.sum(0))
  np.testing.assert_allclose(direction, expect, rtol=2e-4, atol=2e-6)


def test_outputs_are_a_tuple_or_a_dict_and_shapes():
  model, x, _ = build('hard_sharing_dict')
  out = model(x)
  assert list(out) == ['b', 'a'] and out['a'].shape == (B, 1)
  model, x, _ = build('mtan')
  out = model(x)
  assert isinstance(out, tuple) and [o.shape for o in out] == [(1, 2, 2, 2)] * 2
  model, x, _ = build('cgc')
  assert [o.shape for o in model(x)] == [(B, 1)] * 2


# --------------------------------------------------------------------------
# Parameter counts from each paper's formula.

LIN = lambda i, o: i * o + o   # a dense layer with bias


def test_parameter_counts_follow_the_papers():
  head = LIN(H, 1)
  assert n_params(build('hard_sharing')[0]) == LIN(D, H) + 2 * head
  # Branched: one copy of block l per group at layer l.
  assert n_params(build('branched')[0]) == (
      LIN(D, H) + 2 * LIN(H, H) + 3 * LIN(H, H) + 3 * head)
  # MRN: hard sharing; the prior's precisions live in the optimizer state.
  assert n_params(build('mrn')[0]) == LIN(D, H) + 3 * LIN(H, 2)
  # MMoE: n experts, a gate W_g^t in R^{n x d} per task, towers.
  assert n_params(build('mmoe')[0]) == 3 * LIN(D, H) + 2 * D * 3 + 2 * head
  # CGC: m_s shared + sum_k m_k task experts; gate k: d x (m_k + m_s).
  m = [2, 0]
  assert n_params(build('cgc')[0]) == (
      (2 + sum(m)) * LIN(D, H) + sum(D * (mk + 2) for mk in m) + 2 * head)
  # PLE, 3 levels, m_s = 2, m_k = 1: per level experts and task gates, and a
  # shared gate over all (sum_k m_k + m_s) experts below the last level.
  e = [LIN(D, H), LIN(H, H), LIN(H, H)]
  d = [D, H, H]
  ple = sum((2 + 2) * e[l] + 2 * d[l] * (1 + 2) for l in range(3))
  ple += sum(d[l] * (2 + 2) for l in range(2))
  assert n_params(build('ple3')[0]) == ple + 2 * head
  # Cross-stitch: K columns, a (K, K) unit per block ((K, K, C) per channel).
  cols = 2 * (LIN(D, H) + LIN(H, H))
  assert n_params(build('cross_stitch')[0]) == cols + 2 * 4 + 2 * head
  assert n_params(cross_stitch_channels()) == cols + 2 * 4 * H + 2 * head
  # Sluice: K columns, a (KM, KM) alpha per layer, a (L,) beta per task.
  assert n_params(build('sluice')[0]) == (
      2 * (LIN(D, H) + 2 * LIN(H, H)) + 3 * 4 ** 2 + 2 * 3 + 2 * head)
  # MTAN: per task and stage g (1x1 conv, norm, 1x1 conv, norm) and, from the
  # second stage, f (3x3 conv, norm); BatchNorm/LayerNorm: 2 per channel.
  conv3 = lambda i, o: 9 * i * o + o
  backbone = conv3(3, 3) + conv3(3, 3) + conv3(3, 4)
  cu, cp = [3, 4], [3, 4]
  g = sum(LIN(cu[j] * (1 if j == 0 else 2), cp[j]) + 2 * cp[j]
          + LIN(cp[j], cp[j]) + 2 * cp[j] for j in range(2))
  f = sum(conv3(cp[j - 1], cu[j]) + 2 * cu[j] for j in range(1, 2))
  mtan_head = LIN(4, 2)
  assert n_params(build('mtan')[0]) == backbone + 2 * (g + f) + 2 * mtan_head
  # Dense MTAN (no spatial axes: the "convolutions" are dense layers), one
  # extractor f per stage shared by the tasks.
  g = (LIN(H, H) + 2 * H + LIN(H, H) + 2 * H
       + LIN(2 * H, H) + 2 * H + LIN(H, H) + 2 * H)
  f = LIN(H, H) + 2 * H
  assert n_params(build('mtan_shared_f')[0]) == (
      LIN(D, H) + 2 * LIN(H, H) + 2 * g + f + 2 * head)


def test_initial_mixing_units():
  a = mnn.stitch_init(3)
  np.testing.assert_allclose(a, [[.9, .05, .05], [.05, .9, .05],
                                 [.05, .05, .9]], rtol=1e-6)
  s = mnn.alpha_init(2, 1)
  np.testing.assert_allclose(s, [[.9, .1], [.1, .9]], rtol=1e-6)
  s = mnn.alpha_init(2, 2)
  np.testing.assert_allclose(s.sum(1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(s[:2, :2], 0.45, rtol=1e-6)
  np.testing.assert_allclose(s[:2, 2:], 0.05, rtol=1e-6)
  np.testing.assert_allclose(mnn.beta_init(4), 0.25)
  np.testing.assert_allclose(mnn.beta_init(3, 'imbalanced'), [.05, .05, .9],
                             rtol=1e-6)


# --------------------------------------------------------------------------
# Special cases that reduce to a simpler architecture.


def copy_into(dst, src):
  nnx.update(dst, nnx.state(src, nnx.Param))


def cross_stitch_channels():
  return mnn.CrossStitch([dense(D, H), dense(H, H)], heads(2),
                         rngs=nnx.Rngs(0), channel_wise=True, channels=[H, H])


def test_cross_stitch_at_identity_is_independent_columns():
  x = build('cross_stitch')[1]
  for model in (build('cross_stitch')[0], cross_stitch_channels()):
    for u in model.units:
      eye = jnp.eye(2) if u[...].ndim == 2 else jnp.eye(2)[:, :, None]
      u[...] = jnp.broadcast_to(eye, u[...].shape)
    out = model(x)
    for t in range(2):
      h = x
      for column in model.columns:
        h = column[t](h)
      np.testing.assert_allclose(out[t], model.decoders[t](h), rtol=1e-6,
                                 atol=1e-6)
  # Channel-wise units mix each channel with its own weights.
  model = cross_stitch_channels()
  a = np.asarray(model.units[0][...]).copy()
  a[0, 1, 0] = 0.5
  model.units[0][...] = jnp.asarray(a)
  h = jnp.stack([c(x) for c in model.columns[0]])
  want = np.einsum('tsc,sbc->tbc', a, np.asarray(h))
  from mgda_jax._src.nn import cross_stitch as cs
  np.testing.assert_allclose(cs.stitch(jnp.asarray(a), h), want, rtol=1e-6,
                             atol=1e-6)


def hard_twin(encoder_factory, decoders_src):
  r = nnx.Rngs(99)
  return mnn.HardSharing(encoder_factory(r), heads(len(decoders_src), seed=99))


def test_mmoe_with_one_expert_and_cgc_with_one_shared_expert_are_hard_sharing():
  x = jax.random.normal(jax.random.key(5), (B, D))
  for model in (mnn.MMoE(dense(D, H), 1, D, heads(2), rngs=nnx.Rngs(1)),
                mnn.CGC(dense(D, H), 1, 0, D, heads(2), rngs=nnx.Rngs(1))):
    hard = hard_twin(dense(D, H), heads(2))
    experts = (model.experts if isinstance(model, mnn.MMoE)
               else model.shared_experts[0])
    copy_into(hard.encoder, experts[0])
    for t in range(2):
      copy_into(hard.decoders[t], model.decoders[t])
    for a, b in zip(model(x), hard(x)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('norm', [None, 'batch'])
def test_mtan_with_all_ones_attention_is_hard_sharing(norm):
  rngs = nnx.Rngs(0)
  stages, channels = mtan_parts(rngs)
  model = mnn.MTAN(stages, channels, mtan_heads(2), rngs=rngs, norm=norm)
  for per_task in model.attention:
    for g in per_task:   # sigmoid(30) == 1 in float32
      if norm is None:
        g.conv2.kernel[...] = jnp.zeros_like(g.conv2.kernel[...])
        g.conv2.bias[...] = jnp.full_like(g.conv2.bias[...], 30.0)
      else:
        g.norm2.scale[...] = jnp.zeros_like(g.norm2.scale[...])
        g.norm2.bias[...] = jnp.full_like(g.norm2.bias[...], 30.0)
  x = jax.random.normal(jax.random.key(2), (2, 4, 4, 3))

  class Backbone(nnx.Module):
    def __init__(self, stages):
      self.stages = nnx.List([nnx.Sequential(*s) if isinstance(s, tuple)
                              else s for s in stages])

    def __call__(self, x):
      for s in self.stages:
        x = s(x)
      return x

  hard = mnn.HardSharing(Backbone(stages), model.decoders[0:2])
  for a, b in zip(model(x), hard(x)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------
# Direct evaluations of the papers' equations.


def test_sluice_forward_and_orthogonality_penalty_against_numpy():
  model, x, _ = build('sluice')
  alphas = [np.asarray(a[...], np.float64) for a in model.alphas]
  # Perturb alpha and beta away from their symmetric initial values.
  rng = np.random.default_rng(0)
  for a in model.alphas:
    a[...] = a[...] + 0.1 * jnp.asarray(rng.normal(size=a.shape), jnp.float32)
  for b in model.betas:
    b[...] = b[...] + 0.1 * jnp.asarray(rng.normal(size=b.shape), jnp.float32)
  alphas = [np.asarray(a[...], np.float64) for a in model.alphas]
  betas = [np.asarray(b[...], np.float64) for b in model.betas]
  k, m = 2, 2
  h = [np.asarray(x, np.float64)] * k
  raw, mixed = [], []
  for l, column in enumerate(model.columns):
    outs = []
    for t in range(k):
      lin = column[t].layers[0]
      outs.append(np.tanh(h[t] @ np.asarray(lin.kernel[...], np.float64)
                          + np.asarray(lin.bias[...], np.float64)))
    raw.append(outs)
    d = outs[0].shape[-1] // m
    sub = [outs[t][:, j * d:(j + 1) * d] for t in range(k) for j in range(m)]
    new = [sum(alphas[l][i, jj] * sub[jj] for jj in range(k * m))
           for i in range(k * m)]
    h = [np.concatenate(new[t * m:(t + 1) * m], axis=-1) for t in range(k)]
    mixed.append(h)
  out = model(x)
  for t in range(k):
    feat = sum(betas[t][l] * mixed[l][t] for l in range(3))
    dec = model.decoders[t]
    ref = feat @ np.asarray(dec.kernel[...]) + np.asarray(dec.bias[...])
    np.testing.assert_allclose(out[t], ref, rtol=1e-5, atol=1e-5)
  penalty = sum(np.sum((g[:, :H // 2].T @ g[:, H // 2:]) ** 2)
                for outs in raw for g in outs)
  np.testing.assert_allclose(model.orthogonality_penalty(x), penalty,
                             rtol=1e-5)


def test_ple_against_the_papers_recursion():
  model, x, _ = build('ple3')
  sm = jax.nn.softmax

  def mix(gate, h, experts):
    w = sm(h.reshape(h.shape[0], -1) @ gate.kernel[...])
    return sum(w[:, i:i + 1] * e for i, e in enumerate(experts))

  g_tasks, g_shared = [x, x], x
  for j in range(3):
    s = [e(g_shared) for e in model.shared_experts[j]]
    own = [[e(g_tasks[k]) for e in model.task_experts[j][k]] for k in range(2)]
    new_tasks = [mix(model.task_gates[j][k], g_tasks[k], own[k] + s)
                 for k in range(2)]
    if j < 2:
      g_shared = mix(model.shared_gates[j], g_shared, own[0] + own[1] + s)
    g_tasks = new_tasks
  for k, o in enumerate(model(x)):
    np.testing.assert_allclose(o, model.decoders[k](g_tasks[k]), rtol=1e-5,
                               atol=1e-6)


# --------------------------------------------------------------------------
# Every registered method, one jitted step, on every architecture.


def make(name, k, shared):
  factory = mgda_jax.METHODS[name].factory
  kw = {}
  if name == 'prior_loss_weighting':
    kw['priors'] = jnp.linspace(0.5, 2.0, k)
  if 'shared' in inspect.signature(factory).parameters:
    kw['shared'] = shared
  return mgda_jax.make_method(name, k, **kw)


def _pullback(jz, cot):
  return {'p': cot @ jz}


def _heads_pullback(r, hg, w):
  return w @ r, {'p': w @ hg}


NZ, NP = 512, 2048   # every architecture's Z and parameters, zero-padded


@functools.lru_cache(maxsize=None)
def every_method_steps(k):
  """One compiled program per (K, input kind) running all registered
  methods, fed each architecture's exact inputs in a fixed padded layout.

  Compiling the 24 methods once per architecture would cost minutes on two
  cores; the inputs here are the architecture's own linear maps (jax.jacrev
  of its losses, its ``dZ/dtheta``, ``dL_t/dZ`` and head gradients, from
  :func:`computed`), zero-padded, so every method sees what it would see on
  that model, up to padding that changes no Gram entry and no update. The
  engine's handling of the architectures' own pytrees is checked by the
  MGDA, MGDA-UB and loss-weighting references above.
  """
  shared = {'sh': True, 'own': False}
  txs = {n: optax.chain(make(n, k, shared if 'shared' in inspect.signature(
      mgda_jax.METHODS[n].factory).parameters else None), optax.sgd(0.1))
         for n in mgda_jax.METHODS}
  kpis = jnp.full((k,), 0.5)

  @jax.jit
  def per_task(g_sh, g_own, losses):
    params = {'sh': jnp.zeros(NP), 'own': jnp.zeros(NP)}
    grads = {'sh': g_sh, 'own': g_own}
    out = {}
    for n, tx in txs.items():
      if 'per_task' in mgda_jax.METHODS[n].inputs:
        u, s = tx.update(grads, tx.init(params), params, losses=losses,
                         kpis=kpis)
        out[n] = (optax.apply_updates(params, u), s[0].count)
    return out

  @jax.jit
  def representation(r, jz, hg, losses):
    params = {'p': jnp.zeros(NP)}
    grads = mgda_jax.RepresentationGrads(
        r, jax.tree_util.Partial(_pullback, jz), {'p': hg.sum(0)},
        jax.tree_util.Partial(_heads_pullback, r, hg))
    out = {}
    for n, tx in txs.items():
      if 'representation' in mgda_jax.METHODS[n].inputs:
        u, s = tx.update(grads, tx.init(params), params, losses=losses,
                         kpis=kpis)
        out[n] = (optax.apply_updates(params, u), s[0].count)
    return out

  return per_task, representation


def pad(a, shape):
  out = np.zeros(shape, np.float32)
  out[tuple(slice(0, n) for n in a.shape)] = a
  return jnp.asarray(out)


@pytest.mark.parametrize('arch', NAMES)
def test_every_registered_method_steps_on_every_architecture(arch):
  model, fns, k, mask, _, res = computed(arch)
  per_task, representation = every_method_steps(k)
  g = res['jac']
  p = g.shape[1]
  assert p <= NP
  losses = jnp.asarray(np.linspace(1.0, 2.0, k), jnp.float32)
  done = {}
  out = per_task(pad(np.where(mask, g, 0.0), (k, NP)),
                 pad(np.where(mask, 0.0, g), (k, NP)), losses)
  for n, (params, count) in out.items():
    flat = np.asarray(params['sh']) + np.asarray(params['own'])
    done.setdefault(n, []).append((flat, int(count)))
  if model.supports_representation:
    assert res['J'].shape[0] <= NZ
    out = representation(pad(res['R'], (k, NZ)), pad(res['J'], (NZ, NP)),
                         pad(res['Hg'], (k, NP)), losses)
    for n, (params, count) in out.items():
      done.setdefault(n, []).append((np.asarray(params['p']), int(count)))
  else:
    with pytest.raises(ValueError, match='per_task'):
      mnn.task_gradients(fns, 'representation', fns.params, fns.state,
                         jnp.zeros(ARCHS[arch][1]), targets(model, jnp.zeros(
                             ARCHS[arch][1])))
  expected = {n for n, s in mgda_jax.METHODS.items()
              if 'per_task' in s.inputs or model.supports_representation}
  assert set(done) == expected, set(mgda_jax.METHODS) ^ set(done)
  for n, runs in done.items():
    for flat, count in runs:
      assert count == 1, (arch, n)
      assert np.all(np.isfinite(flat)), (arch, n)
      assert np.any(flat[:p] != 0) and not np.any(flat[p:]), (arch, n)


# --------------------------------------------------------------------------
# MRN: the tensor-normal prior against explicit Kronecker algebra (numpy).


def spd(rng, d):
  a = rng.normal(size=(d, d))
  return a @ a.T + d * np.eye(d)


def kron_penalty(w, precisions):
  """vec(W)^T (O1 kron O2 kron O3) vec(W) with the explicit matrix."""
  o1, o2, o3 = (np.asarray(o, np.float64) for o in precisions)
  v = np.asarray(w, np.float64).reshape(-1)
  return float(v @ np.kron(o1, np.kron(o2, o3)) @ v)


def test_mrn_penalty_against_the_explicit_kronecker_product():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(5, 3, 4))
  om = tuple(spd(rng, d) for d in w.shape)
  got = jax.jit(mnn.tensor_normal_penalty)(
      jnp.asarray(w, jnp.float32), tuple(jnp.asarray(o, jnp.float32)
                                         for o in om))
  np.testing.assert_allclose(float(got), kron_penalty(w, om), rtol=1e-5)
  # The gradient 2 (O1 kron O2 kron O3) vec(W).
  g = jax.grad(mnn.tensor_normal_penalty)(jnp.asarray(w, jnp.float32), tuple(
      jnp.asarray(o, jnp.float32) for o in om))
  want = 2 * np.kron(om[0], np.kron(om[1], om[2])) @ w.reshape(-1)
  np.testing.assert_allclose(np.asarray(g).reshape(-1), want, rtol=1e-4)


def normalized_inverse(s):
  o = np.linalg.inv(s)
  return o * (len(o) / np.trace(o))


def test_mrn_covariance_update_is_the_flip_flop_mle():
  """Against the unfoldings: S_1 = W_(1) (O2 kron O3) W_(1)^T / (D2 K),
  Sigma_1 = S_1 + eps tr(S_1) / D1 I, then Sigma_2 with the new O1, then
  Sigma_3; precisions of trace D_i."""
  rng = np.random.default_rng(1)
  d1, d2, k = 6, 3, 4
  w = rng.normal(size=(d1, d2, k))
  om = [normalized_inverse(spd(rng, d)) for d in (d1, d2, k)]
  eps = 1e-3

  def ridge(s):
    return s + eps * np.trace(s) / len(s) * np.eye(len(s))

  w1 = w.reshape(d1, d2 * k)
  o1 = normalized_inverse(ridge(w1 @ np.kron(om[1], om[2]) @ w1.T / (d2 * k)))
  w2 = w.transpose(1, 0, 2).reshape(d2, d1 * k)
  o2 = normalized_inverse(ridge(w2 @ np.kron(o1, om[2]) @ w2.T / (d1 * k)))
  w3 = w.transpose(2, 0, 1).reshape(k, d1 * d2)
  o3 = normalized_inverse(ridge(w3 @ np.kron(o1, o2) @ w3.T / (d1 * d2)))
  with jax.enable_x64(True):
    args = (jnp.asarray(w), tuple(jnp.asarray(o) for o in om), eps)
    got = mnn.tensor_normal_update(*args, modes='all')
    for g, want in zip(got, (o1, o2, o3)):
      np.testing.assert_allclose(np.asarray(g), want, rtol=1e-8, atol=1e-12)
    # Only the task mode (the later official code): the others are kept.
    got = mnn.tensor_normal_update(*args, modes=(2,))
    w3o = w3 @ np.kron(om[0], om[1]) @ w3.T / (d1 * d2)
    np.testing.assert_allclose(np.asarray(got[2]),
                               normalized_inverse(ridge(w3o)), rtol=1e-8)
    for g, o in zip(got[:2], om[:2]):
      np.testing.assert_array_equal(np.asarray(g), o)


def test_mrn_keeps_an_ill_posed_mode_and_the_prior_stays_on():
  """A last layer of 50 features x 10 classes x 2 tasks: the feature mode
  (50 > 10 * 2) keeps Omega_1 = I, and after re-estimation the prior's
  gradient is still of the order of the weights (estimating the feature
  mode would put its precision on W's null space and switch the prior
  off)."""
  rng = np.random.default_rng(4)
  w = jnp.asarray(0.1 * rng.normal(size=(50, 10, 2)), jnp.float32)
  assert mnn.well_posed_modes(w.shape) == (1, 2)
  om = mnn.tensor_normal_update(w, mnn.tensor_normal_init(w.shape))
  np.testing.assert_array_equal(np.asarray(om[0]), np.eye(50))
  for o, d in zip(om, w.shape):
    assert float(jnp.trace(o)) == pytest.approx(d, rel=1e-5)
  _, g = mnn.tensor_normal_value_and_grad(w, om)
  ratio = float(jnp.linalg.norm(g) / jnp.linalg.norm(w))
  assert ratio > 0.5, ratio
  bad = mnn.tensor_normal_update(w, mnn.tensor_normal_init(w.shape),
                                 modes='all')
  _, g_bad = mnn.tensor_normal_value_and_grad(w, bad)
  assert float(jnp.linalg.norm(g_bad) / jnp.linalg.norm(w)) < 0.1 * ratio


def test_mrn_learns_the_task_correlation():
  """Two tasks with (nearly) the same last layer and one independent: the
  estimated task covariance correlates the first two, not the third (a
  well-posed shape: every dimension at most the product of the others)."""
  rng = np.random.default_rng(2)
  base_w = rng.normal(size=(8, 8))
  w = np.stack([base_w, base_w + 0.1 * rng.normal(size=(8, 8)),
                rng.normal(size=(8, 8))], axis=-1).astype(np.float32)
  om = mnn.tensor_normal_init(w.shape)
  for _ in range(5):
    om = mnn.tensor_normal_update(jnp.asarray(w), om)
  sigma = np.linalg.inv(np.asarray(om[2], np.float64))
  corr = sigma / np.sqrt(np.outer(np.diag(sigma), np.diag(sigma)))
  assert corr[0, 1] > 0.95, corr
  assert abs(corr[0, 2]) < 0.3 and abs(corr[1, 2]) < 0.3, corr


def test_mrn_prior_transformation_adds_the_penalty_gradient_and_refits():
  model, fns, x, ys, k = setup('mrn')
  params = fns.params
  rng = np.random.default_rng(3)
  weight, every = 0.3, 2
  tx = optax.chain(mgda_jax.mgda_ub(k), model.prior(weight, every=every))
  base_tx = mgda_jax.mgda_ub(k)

  @jax.jit
  def steps(params, state):
    out = []
    for _ in range(3):
      losses, grads, _, _ = mnn.task_gradients(fns, 'representation', params,
                                               fns.state, x, ys)
      u, state = tx.update(grads, state, params, losses=losses)
      b, _ = base_tx.update(grads, base_tx.init(params), params,
                            losses=losses)
      out.append((params, u, b, state[1]))
      params = optax.apply_updates(params, jax.tree.map(lambda v: -0.5 * v,
                                                        u))
    return out

  state = tx.init(params)
  # Start from non-trivial precisions, so that the gradient reads them.
  om = tuple(jnp.asarray(normalized_inverse(spd(rng, d)), jnp.float32)
             for d in (H, 2, k))
  state = (state[0], state[1]._replace(precisions=(om,)))
  prev = om
  for i, (p, u, b, st) in enumerate(steps(params, state)):
    w = np.asarray(model.task_weights(p)[0], np.float64)
    # The update is the method's plus weight * 2 (O kron) vec(W), on the
    # decoders' kernels only; with the precisions of before this step.
    want = 2 * weight * (np.kron(prev[0], np.kron(prev[1], prev[2]))
                         @ w.reshape(-1)).reshape(w.shape)
    diff = (np.asarray(model.task_weights(u)[0], np.float64)
            - np.asarray(model.task_weights(b)[0], np.float64))
    np.testing.assert_allclose(diff, want, rtol=2e-4, atol=1e-6)
    rest = [(path, a, c) for (path, a), (_, c) in zip(
        leaves_with_paths(u), leaves_with_paths(b)) if path[-1] != 'kernel'
            or path[0] != 'decoders']
    for path, a, c in rest:
      np.testing.assert_array_equal(np.asarray(a), np.asarray(c), str(path))
    np.testing.assert_allclose(float(st.penalty), weight * kron_penalty(
        w, prev), rtol=1e-4)
    assert int(st.count) == i + 1
    if (i + 1) % every == 0:   # refitted from this step's parameters
      want_om = mnn.tensor_normal_update(jnp.asarray(w, jnp.float32), prev)
      for a, c in zip(st.precisions[0], want_om):
        # float32 inverses: to 1e-4 of the matrix's scale.
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-4,
                                   atol=1e-4 * float(np.abs(c).max()))
    else:
      for a, c in zip(st.precisions[0], prev):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    prev = tuple(np.asarray(o, np.float64) for o in st.precisions[0])


def test_mrn_weight_survives_inject_hyperparams_and_cost_formula():
  model, fns, _, _, k = setup('mrn')
  tx = optax.inject_hyperparams(mnn.tensor_normal_prior,
                                static_args=('select', 'every'))(
                                    model.task_weights, weight=0.5)
  state = tx.init(fns.params)
  zeros = jax.tree.map(jnp.zeros_like, fns.params)
  u, _ = jax.jit(tx.update)(zeros, state, fns.params)
  w = np.asarray(model.task_weights(fns.params)[0], np.float64)
  om = [np.eye(d) for d in w.shape]   # the identity start
  want = 2 * 0.5 * (np.kron(om[0], np.kron(om[1], om[2])) @ w.reshape(-1))
  np.testing.assert_allclose(
      np.asarray(model.task_weights(u)[0]).reshape(-1), want, rtol=1e-5,
      atol=1e-7)
  # The documented count against XLA's own: the penalty and its gradient.
  shape = (64, 16, 4)
  w = jnp.ones(shape)
  om = mnn.tensor_normal_init(shape)
  xla = jax.jit(mnn.tensor_normal_value_and_grad).lower(
      w, om).compile().cost_analysis()
  xla = xla[0] if isinstance(xla, (list, tuple)) else xla
  c = mnn.tensor_normal_cost(shape)
  assert 0.8 <= xla['flops'] / c['step_flops'] <= 1.25, (xla['flops'], c)
  assert c['state_floats'] == 64 ** 2 + 16 ** 2 + 4 ** 2


def test_mrn_errors():
  r = nnx.Rngs(0)
  with pytest.raises(ValueError, match='differ in shape'):
    mnn.MRN(dense(D, H)(r), [nnx.Linear(H, 1, rngs=r),
                             nnx.Linear(H, 2, rngs=r)])
  with pytest.raises(ValueError, match='no parameter at'):
    mnn.MRN(dense(D, H)(r), heads(2), layers=[('layers', 0, 'kernel')])
  with pytest.raises(ValueError, match='not a kernel'):
    mnn.MRN(dense(D, H)(r), heads(2), layers=[('bias',)])
  model = mnn.MRN(dense(D, H)(r), heads(2))
  with pytest.raises(ValueError, match='positive'):
    model.prior(every=0)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  tx = model.prior()
  with pytest.raises(ValueError, match='needs params'):
    tx.update(params, tx.init(params))
  with pytest.raises(ValueError, match=r'\(D1, D2, K\)'):
    mnn.tensor_normal_penalty(jnp.ones((2, 2)), (jnp.eye(2),) * 3)
  with pytest.raises(ValueError, match='weight must be'):
    model.prior(weight=-1.0)
  with pytest.raises(ValueError, match='modes must be'):
    model.prior(modes=(3,))

  class TwoLayers(nnx.Module):
    def __init__(self, rngs):
      self.proj = nnx.Linear(H, 4, rngs=rngs)
      self.classifier = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, z):
      return self.classifier(self.proj(z))

  with pytest.raises(ValueError, match='cannot tell which'):
    mnn.MRN(dense(D, H)(r), [TwoLayers(r), TwoLayers(r)])
  seq = mnn.MRN(dense(D, H)(r), [nnx.Sequential(
      nnx.Linear(H, 4, rngs=r), nnx.relu, nnx.Linear(4, 2, rngs=r))
                                 for _ in range(2)])
  assert seq.prior_layers == (('layers', 2, 'kernel'),)


# --------------------------------------------------------------------------
# FAFS: the branched network, widening, the affinities and the grouping.


def test_branched_all_shared_is_hard_sharing_and_widening_keeps_the_function():
  r = nnx.Rngs(0)
  blocks = [dense(D, H), dense(H, H), dense(H, H)]
  thin = mnn.Branched(blocks, heads(3), rngs=r)
  x = jax.random.normal(jax.random.key(0), (B, D))
  # The same modules as a HardSharing over a Sequential of the blocks.
  hs = mnn.HardSharing(nnx.Sequential(*[nnx.clone(thin.blocks[l][0])
                                        for l in range(3)]),
                       [nnx.clone(d) for d in thin.decoders])
  for a, b in zip(thin(x), hs(x)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  n_thin = n_params(thin)
  wide = mnn.widen(thin, 2, [[0, 2], [1]])
  assert wide.groups[2] == ((0, 2), (1,)) and thin.groups[2] == ((0, 1, 2),)
  wider = mnn.widen(wide, 1, [[(0, 2)], [(1,)]])
  assert wider.groups == (((0, 1, 2),), ((0, 2), (1,)), ((0, 2), (1,)))
  for m in (wide, wider):
    for a, b in zip(m(x), thin(x)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert n_params(wide) == n_thin + LIN(H, H)
  assert n_params(wider) == n_thin + 2 * LIN(H, H)
  # The copies are independent parameters afterwards.
  mask = leaves_with_paths(wider.shared_mask(nnx.as_pure(
      nnx.state(wider, nnx.Param))))
  shared = {p[:3] for p, m in mask if m}
  assert shared == {('blocks', 0, 0), ('blocks', 1, 0), ('blocks', 2, 0)}
  assert wider.z_sources() == ((2, 0), (0, 0))
  with pytest.raises(ValueError, match='not a branch'):
    mnn.widen(wide, 1, [[(0, 1)], [(2,)]])
  with pytest.raises(ValueError, match='empty group'):
    mnn.widen(thin, 2, [[0, 1, 2], []])
  with pytest.raises(ValueError, match='refine'):
    mnn.Branched(blocks, heads(3), rngs=r,
                 groups=[[(0,), (1, 2)], [(0, 1), (2,)], [(0, 1), (2,)]])
  with pytest.raises(ValueError, match='partition'):
    mnn.Branched(blocks, heads(3), rngs=r, groups=[[(0, 1)]] * 3)


def test_a_task_alone_from_the_first_block_has_zero_shared_gradient():
  """Task 2 shares nothing: on both paths MGDA sees a zero gradient of the
  shared blocks for it, so the min-norm point and the shared update are
  zero, while every decoder and task-2 block gets its own gradient."""
  r = nnx.Rngs(0)
  model = mnn.Branched([dense(D, H), dense(H, H)], heads(3), rngs=r,
                       groups=[[(0, 1), (2,)], [(0,), (1,), (2,)]])
  x = jax.random.normal(jax.random.key(0), (B, D))
  ys = targets(nnx.clone(model), x)
  fns = mnn.functional(model, loss_fn)
  assert model.represent(x)[model.z_index(2)].shape == (B, 0)
  for kind, tx in (('representation', mgda_jax.mgda_ub(3)),
                   ('per_task', mgda_jax.mgda(3, shared=fns.shared))):
    losses, grads, _, _ = mnn.task_gradients(fns, kind, fns.params, fns.state,
                                             x, ys)
    d, _ = tx.update(grads, tx.init(fns.params), fns.params, losses=losses)
    for (path, v), (_, m) in zip(leaves_with_paths(d), leaves_with_paths(
        fns.shared(fns.params))):
      if m:
        np.testing.assert_allclose(np.asarray(v), 0.0, atol=1e-7)
    own = jax.grad(lambda p: jnp.sum(loss_fn(nnx.merge(
        fns.graphdef, p, fns.state)(x), ys)))(fns.params)
    for (path, v), (_, g), (_, m) in zip(leaves_with_paths(d),
                                         leaves_with_paths(own),
                                         leaves_with_paths(fns.shared(
                                             fns.params))):
      if not m:
        np.testing.assert_allclose(np.asarray(v), np.asarray(g), rtol=1e-4,
                                   atol=1e-6, err_msg=str(path))


def test_separation_by_hand_with_a_multi_task_branch():
  """Branches {0, 1} and {2}: A_b({0,1},{0,1}) = mean(min(1, .6),
  min(.6, 1)) = .6, A_b({2},{2}) = 1, A_b({0,1},{2}) = (mean(.3, .5) +
  min(.3, .5)) / 2 = .35."""
  a = np.array([[1.0, 0.6, 0.3], [0.6, 1.0, 0.5], [0.3, 0.5, 1.0]])
  ab = mnn.branch_affinity(a, [(0, 1), (2,)])
  np.testing.assert_allclose(ab, [[0.6, 0.35], [0.35, 1.0]])
  # One group: 1 - mean(min(.6, .35), min(.35, 1)) = .65; two: (.4 + 0) / 2.
  assert mnn.separation(ab, [[0, 1]]) == pytest.approx(0.65)
  assert mnn.separation(ab, [[0], [1]]) == pytest.approx(0.2)


def test_error_affinity_and_branch_affinity_against_loops():
  rng = np.random.default_rng(0)
  m = rng.random((50, 4))
  m[3, 1] = np.nan                                   # an unlabelled example
  a = mnn.error_affinity(m)
  for i in range(4):
    for j in range(4):
      agree = n = 0
      mi, mj = np.nanmean(m[:, i]), np.nanmean(m[:, j])
      for row in m:
        if np.isnan(row[i]) or np.isnan(row[j]):
          continue
        ei, ej = row[i] >= mi, row[j] >= mj
        agree += int(ei == ej)
        n += 1
      assert a[i, j] == pytest.approx(agree / n)
  branches = [(0, 2), (1,), (3,)]
  ab = mnn.branch_affinity(a, branches)
  for p, bk in enumerate(branches):
    for q, bl in enumerate(branches):
      lhs = np.mean([min(a[i, j] for j in bl) for i in bk])
      rhs = np.mean([min(a[j, i] for i in bk) for j in bl])
      assert ab[p, q] == pytest.approx((lhs + rhs) / 2)


def brute_force_groupings(ab, alpha, cost):
  """min over every labelling of the n branches with d labels."""
  n = ab.shape[0]
  best = {}
  for labels in itertools.product(range(n), repeat=n):
    groups = [[i for i in range(n) if labels[i] == g] for g in range(n)]
    groups = [g for g in groups if g]
    d = len(groups)
    val = mnn.separation(ab, groups)
    best[d] = min(best.get(d, np.inf), val)
  return [(d - 1) * cost + alpha * best[d] for d in range(1, n + 1)]


def test_grouping_is_the_exact_minimiser_and_greedy_is_no_better():
  rng = np.random.default_rng(1)
  for trial in range(6):
    n = 5
    a = rng.random((n, n))
    a = (a + a.T) / 2
    np.fill_diagonal(a, 1.0)
    ab = mnn.branch_affinity(a, [(i,) for i in range(n)])
    alpha, cost = 1.0 + trial, 0.05
    g = mnn.group_branches(ab, alpha, cost)
    np.testing.assert_allclose(g.loss, brute_force_groupings(ab, alpha, cost),
                               rtol=1e-12)
    assert g.exact
    greedy = mnn.group_branches(ab, alpha, cost, exact_max=0)
    assert not greedy.exact
    assert all(x >= y - 1e-12 for x, y in zip(greedy.loss, g.loss))
  # Two blocks of similar tasks: split into exactly those blocks.
  a = np.full((5, 5), 0.2)
  a[:3, :3] = 0.9
  a[3:, 3:] = 0.9
  np.fill_diagonal(a, 1.0)
  ab = mnn.branch_affinity(a, [(i,) for i in range(5)])
  for exact_max in (8, 0):
    assert mnn.group_branches(ab, 2.0, 0.2, exact_max=exact_max).groups == [
        [0, 1, 2], [3, 4]]
  assert mnn.group_branches(ab, 0.0, 0.2).groups == [[0, 1, 2, 3, 4]]
  assert len(mnn.group_branches(ab, 2.0, 0.0).groups) == 5
  assert len(mnn.group_branches(ab, 2.0, 0.0, max_groups=2).groups) == 2


def test_fafs_procedure_widens_top_down_by_affinity():
  """Four tasks in two related pairs: the top layer splits into the pairs;
  one layer down the two pair-branches split only where branching is
  cheap."""
  a = np.full((4, 4), 0.3)
  a[:2, :2] = a[2:, 2:] = 0.9
  np.fill_diagonal(a, 1.0)
  r = nnx.Rngs(0)
  thin = mnn.Branched([dense(D, H), dense(H, H), dense(H, H)], heads(4),
                      rngs=r)
  x = jax.random.normal(jax.random.key(0), (B, D))
  calls = []

  def train(model, rnd):
    calls.append((rnd, model.groups))
    for u, v in zip(model(x), thin(x)):   # widening keeps the function
      np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    return model, a

  # Branching costs 2^{p_l} / 64 with p = (2, 1, 0) pooling layers above:
  # at the top, pairs (loss 1/64 + 0.2 * 0.1) beat singletons (3/64) and
  # one group (0.2 * 0.7); below, splitting the pairs (2/64 + 0.02) beats
  # keeping them together (0.14), and so on down to the first layer.
  costs = [4 / 64, 2 / 64, 1 / 64]
  model, rounds = mnn.fafs(thin, train, alpha=0.2, branch_costs=costs)
  assert [c[0] for c in calls] == [0, 1, 2]
  assert [rd.layer for rd in rounds] == [2, 1, 0]
  assert rounds[0].groups[2] == ((0, 1), (2, 3))
  np.testing.assert_allclose(rounds[0].decisions[0].loss[:2],
                             [0.2 * 0.7, 1 / 64 + 0.2 * 0.1])
  assert model.groups == (((0, 1), (2, 3)),) * 3
  # Expensive branching low down keeps the lower layers shared.
  calls.clear()
  model, _ = mnn.fafs(thin, train, alpha=0.2, branch_costs=[0.5, 0.5, 1 / 64])
  assert model.groups == (((0, 1, 2, 3),), ((0, 1, 2, 3),), ((0, 1), (2, 3)))
  # A high separation weight: every task its own branch at the top.
  model, _ = mnn.fafs(thin, train, alpha=1.0, branch_costs=[0.5, 0.5, 1 / 64])
  assert model.groups[2] == ((0,), (1,), (2,), (3,))
  with pytest.raises(ValueError, match='one per layer'):
    mnn.fafs(thin, train, alpha=1.0, branch_costs=[0.1])


# --------------------------------------------------------------------------
# State, errors, and the optional import.


def test_batchnorm_statistics_update_once_on_both_paths():
  model, fns, x, ys, _ = setup('mtan')
  ref = nnx.clone(model)
  ref(x)                                    # one forward in training mode
  want = nnx.as_pure(nnx.state(ref, nnx.BatchStat))
  for kind in ('representation', 'per_task'):
    new_state = jax.jit(lambda p, s, kind=kind: mnn.task_gradients(
        fns, kind, p, s, x, ys)[2])(fns.params, fns.state)
    m = nnx.merge(fns.graphdef, fns.params, new_state)
    got = nnx.as_pure(nnx.state(m, nnx.BatchStat))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # Not the initial statistics: something was updated.
    assert any(bool(jnp.any(a != b)) for a, b in zip(
        jax.tree.leaves(got), jax.tree.leaves(nnx.as_pure(
            nnx.state(model, nnx.BatchStat)))))


def test_clear_errors():
  _, fns, x, ys, _ = setup('mtan_shared_f')
  with pytest.raises(ValueError, match='per_task'):
    mnn.task_gradients(fns, 'representation', fns.params, fns.state, x, ys)
  with pytest.raises(ValueError, match="'representation' or 'per_task'"):
    mnn.task_gradients(fns, 'heads', fns.params, fns.state, x, ys)
  with pytest.raises(ValueError, match='HardSharing'):
    mnn.functional(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), loss_fn)
  with pytest.raises(ValueError, match='at least one task'):
    mnn.HardSharing(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), [])
  with pytest.raises(ValueError, match='shared expert'):
    mnn.CGC(dense(D, H), 0, 0, D, heads(2), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='divisible'):
    mnn.Sluice([dense(D, 5)], heads(2, 5), rngs=nnx.Rngs(0))(
        jnp.ones((2, D)))
  _, fns, x, ys, _ = setup('hard_sharing')
  with pytest.raises(ValueError, match='a tuple of 2 copies of Z'):
    mgda_jax.representation_grads(fns.encode, fns.task_losses, fns.params,
                                  fns.state, x, ys, has_aux=True,
                                  encoder_has_aux=True)
  with pytest.raises(ValueError, match='a tuple of 2 copies of Z'):
    mgda_jax.representation_grads(fns.encode, fns.task_losses, fns.params,
                                  fns.state, x, ys, has_aux=True,
                                  encoder_has_aux=True, per_task_z=2)


def test_import_mgda_jax_does_not_import_flax():
  code = ('import sys, mgda_jax; assert "flax" not in sys.modules; '
          'import mgda_jax.nn; assert "flax" in sys.modules')
  subprocess.run([sys.executable, '-c', code], check=True)
