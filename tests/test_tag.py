"""TAG: lookahead affinity and network selection, against independent
references (closed forms, jax.jacrev, finite differences, a hand-written
momentum step, brute-force search)."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mgda_jax
from mgda_jax import tag

# ---------------------------------------------------------------- affinity


def quadratic_problem(k=3, d=4, seed=0):
  """L_j = 1/2 (w - c_j)' H_j (w - c_j) + (h_j - e_j)^2 + 1, w shared."""
  rng = np.random.default_rng(seed)
  hs = []
  for _ in range(k):
    m = rng.normal(size=(d, d))
    hs.append(m @ m.T / d + np.eye(d))
  hs = np.stack(hs)
  c = rng.normal(size=(k, d))
  e = rng.normal(size=k)
  params = {'w': jnp.asarray(rng.normal(size=d), jnp.float32),
            'h': jnp.asarray(rng.normal(size=k), jnp.float32)}

  def loss_np(w, h):
    r = w[None] - c
    return 0.5 * np.einsum('kd,kde,ke->k', r, hs, r) + (h - e) ** 2 + 1.0

  def loss(p):
    r = p['w'][None] - c
    return (0.5 * jnp.einsum('kd,kde,ke->k', r, hs, r) + (p['h'] - e) ** 2
            + 1.0)

  return params, loss, loss_np, hs, c


def test_affinity_quadratic_closed_form():
  params, loss, loss_np, hs, c = quadratic_problem()
  lr = 0.1
  opt = optax.sgd(lr)
  out = jax.jit(lambda p: tag.lookahead_affinity(
      loss, p, optimizer=opt, opt_state=opt.init(p),
      shared={'w': True, 'h': False}))(params)
  w = np.asarray(params['w'], np.float64)
  h = np.asarray(params['h'], np.float64)
  l0 = loss_np(w, h)
  expected = np.zeros((3, 3))
  for i in range(3):
    w_i = w - lr * hs[i] @ (w - c[i])  # heads unchanged
    expected[i] = 1.0 - loss_np(w_i, h) / l0
  np.testing.assert_allclose(out.affinity, expected, atol=2e-6)
  np.testing.assert_allclose(out.losses, l0, rtol=1e-6)
  assert bool(out.finite)
  # The official code's division by the learning rate.
  div = tag.lookahead_affinity(loss, params, optimizer=opt,
                               opt_state=opt.init(params),
                               shared={'w': True, 'h': False}, step_size=lr)
  np.testing.assert_allclose(div.affinity, expected / lr, atol=2e-5)


def test_affinity_moves_only_shared_parameters():
  """With every parameter shared, the heads' step changes L_i's own loss."""
  params, loss, loss_np, hs, c = quadratic_problem()
  opt = optax.sgd(0.1)
  state = opt.init(params)
  only_w = tag.lookahead_affinity(loss, params, optimizer=opt,
                                  opt_state=state, shared={'w': True,
                                                           'h': False})
  everything = tag.lookahead_affinity(loss, params, optimizer=opt,
                                      opt_state=state)
  # A head's step helps only its own task: the diagonal differs, nothing
  # else (the losses are separable in w and h).
  off = ~np.eye(3, dtype=bool)
  np.testing.assert_allclose(only_w.affinity[off], everything.affinity[off],
                             atol=1e-6)
  assert np.all(np.diag(everything.affinity) > np.diag(only_w.affinity))


def mlp_problem(k=3, seed=0, dtype=jnp.float64):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(16, 5)), dtype)
  y = jnp.asarray(rng.normal(size=(16, k)), dtype)
  params = {'enc': {'w': jnp.asarray(rng.normal(size=(5, 8)) / 2, dtype),
                    'b': jnp.zeros(8, dtype)},
            'heads': jnp.asarray(rng.normal(size=(8, k)) / 3, dtype)}

  def encode(p, x, y):
    del y
    return jnp.tanh(x @ p['enc']['w'] + p['enc']['b'])

  def heads(p, z, x, y):
    del x
    return jnp.mean((z @ p['heads'] - y) ** 2, axis=0) + 0.1

  def loss(p, x, y):
    return heads(p, encode(p, x, y), x, y)

  return params, loss, encode, heads, x, y


SHARED = {'enc': True, 'heads': False}


def test_affinity_small_step_matches_jacrev_gram():
  """dZ_ij/d(lr) at lr = 0 is <g_i, g_j> / L_j (g: jax.jacrev on the
  encoder), checked by a central finite difference of the lookahead."""
  with jax.enable_x64(True):
    params, loss, _, _, x, y = mlp_problem()
    jac = jax.jacrev(loss)(params, x, y)['enc']
    g = np.concatenate([np.asarray(v).reshape(3, -1)
                        for v in jax.tree.leaves(jac)], axis=1)
    l0 = np.asarray(loss(params, x, y))
    expected = g @ g.T / l0[None, :]

    def z(lr):
      opt = optax.sgd(lr)
      return np.asarray(tag.lookahead_affinity(
          loss, params, x, y, optimizer=opt, opt_state=opt.init(params),
          shared=SHARED).affinity)

    h = 1e-4
    slope = (z(h) - z(-h)) / (2 * h)
    np.testing.assert_allclose(slope, expected, rtol=1e-5, atol=1e-9)
    # linearize: the same first-order term, exactly (no forward pass).
    opt = optax.sgd(0.01)
    lin = tag.lookahead_affinity(loss, params, x, y, optimizer=opt,
                                 opt_state=opt.init(params), shared=SHARED,
                                 linearize=True)
    np.testing.assert_allclose(lin.affinity, 0.01 * expected, rtol=1e-10)
    # ... and its error against the lookahead shrinks like lr^2.
    err = [np.abs(z(lr) - lr * expected).max() for lr in (0.02, 0.01)]
    assert 3.0 < err[0] / err[1] < 5.0


def test_affinity_momentum_matches_hand_written_step():
  """u_i = -lr (g_i + mu m) on the shared parameters (optax's trace), the
  heads unchanged although their momentum is not zero."""
  with jax.enable_x64(True):
    params, loss, _, _, x, y = mlp_problem()
    lr, mu = 0.05, 0.9
    opt = optax.sgd(lr, momentum=mu)
    state = opt.init(params)
    g0 = jax.grad(lambda p: jnp.sum(loss(p, x, y)))(params)
    _, state = opt.update(g0, state, params)  # momentum m = g0
    out = tag.lookahead_affinity(loss, params, x, y, optimizer=opt,
                                 opt_state=state, shared=SHARED)
    jac = jax.jacrev(loss)(params, x, y)
    l0 = np.asarray(loss(params, x, y))
    for i in range(3):
      moved = {
          'enc': jax.tree.map(lambda p, gi, m: p - lr * (gi[i] + mu * m),
                              params['enc'], jac['enc'], g0['enc']),
          'heads': params['heads']}
      expected = 1.0 - np.asarray(loss(moved, x, y)) / l0
      np.testing.assert_allclose(out.affinity[i], expected, rtol=1e-10,
                                 atol=1e-12)


def test_affinity_from_representation_grads_is_exact():
  """MGDA-UB's input (one forward pass, K encoder pullbacks) gives the same
  affinity as the K full backward passes; so does chunking the lookahead."""
  params, loss, encode, heads, x, y = mlp_problem(dtype=jnp.float32)
  opt = optax.sgd(0.05, momentum=0.9)
  state = opt.init(params)
  ref = tag.lookahead_affinity(loss, params, x, y, optimizer=opt,
                               opt_state=state, shared=SHARED)
  losses, rgrads = mgda_jax.representation_grads(encode, heads, params, x, y)
  via_z = tag.lookahead_affinity(loss, params, x, y, optimizer=opt,
                                 opt_state=state, shared=SHARED,
                                 grads=rgrads, losses=losses)
  np.testing.assert_allclose(via_z.affinity, ref.affinity, atol=2e-6)
  chunked = tag.lookahead_affinity(loss, params, x, y, optimizer=opt,
                                   opt_state=state, shared=SHARED,
                                   batch_size=2)
  np.testing.assert_allclose(chunked.affinity, ref.affinity, atol=1e-6)
  unrolled = tag.lookahead_affinity(loss, params, x, y, optimizer=opt,
                                    opt_state=state, shared=SHARED,
                                    unroll=True)
  np.testing.assert_allclose(unrolled.affinity, ref.affinity, atol=1e-6)


def test_representation_affinity_with_an_orthonormal_encoder():
  """Z = X W with orthonormal rows of X: J J^T = I, so <r_i, r_j> / L_j
  times the learning rate is the first-order (linearized) affinity."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(8, 5)))
    x = jnp.asarray(q.T)  # (5, 8), orthonormal rows
    y = jnp.asarray(rng.normal(size=(5, 3)))
    params = {'enc': {'w': jnp.asarray(rng.normal(size=(8, 4)))},
              'heads': jnp.asarray(rng.normal(size=(4, 3)))}
    encode = lambda p, x, y: x @ p['enc']['w']
    heads = lambda p, z, x, y: jnp.mean((z @ p['heads'] - y) ** 2, 0) + 0.1
    loss = lambda p, x, y: heads(p, encode(p, x, y), x, y)
    losses, rgrads = mgda_jax.representation_grads(encode, heads, params, x,
                                                   y)
    z_rep = tag.representation_affinity(rgrads, losses)
    opt = optax.sgd(0.01)
    lin = tag.lookahead_affinity(loss, params, x, y, optimizer=opt,
                                 opt_state=opt.init(params), shared=SHARED,
                                 linearize=True)
    np.testing.assert_allclose(0.01 * z_rep, lin.affinity, rtol=1e-10)
    bad = tag.representation_affinity(rgrads, losses.at[1].set(jnp.nan))
    assert np.isnan(bad[:, 1]).all() and np.isfinite(bad[:, 0]).all()


def test_affinity_nonfinite_is_nan_never_finite():
  params, loss, _, _, x, y = mlp_problem(dtype=jnp.float32)
  opt = optax.sgd(0.05)
  state = opt.init(params)
  # A NaN target of task 1: its loss is NaN, so its column is NaN, and its
  # gradient is NaN, so its row is NaN too (in reverse mode the NaN reaches
  # the other tasks' gradients as well, 0 * NaN through the shared Z).
  bad_y = y.at[0, 1].set(jnp.nan)
  out = tag.lookahead_affinity(loss, params, x, bad_y, optimizer=opt,
                               opt_state=state, shared=SHARED)
  z = np.asarray(out.affinity)
  assert not bool(out.finite)
  assert np.all(np.isnan(z[:, 1])) and np.all(np.isnan(z[1, :]))
  # The running average skips it, and says so.
  avg = tag.affinity_average()
  running = avg.update(avg.init(3), lambda: out.affinity)
  assert int(running.count) == 0 and int(running.skipped) == 1
  assert np.isnan(tag.epoch_affinity(running)).all()
  # A zero loss makes the ratio undefined: NaN, not inf or a finite value.
  zero = tag.lookahead_affinity(
      lambda p, x, y: loss(p, x, y).at[2].set(0.0), params, x, y,
      optimizer=opt, opt_state=state, shared=SHARED)
  assert np.all(np.isnan(np.asarray(zero.affinity)[:, 2]))


def test_affinity_errors():
  params, loss, _, _, x, y = mlp_problem(dtype=jnp.float32)
  opt = optax.sgd(0.1)
  with pytest.raises(ValueError, match='without losses'):
    tag.lookahead_affinity(loss, params, x, y, optimizer=opt,
                           opt_state=opt.init(params),
                           grads=jax.jacrev(loss)(params, x, y))
  with pytest.raises(ValueError, match='vector of K >= 1'):
    tag.lookahead_affinity(lambda p, x, y: jnp.sum(loss(p, x, y)), params, x,
                           y, optimizer=opt, opt_state=opt.init(params))
  with pytest.raises(ValueError, match='shared must be'):
    tag.lookahead_affinity(loss, params, x, y, optimizer=opt,
                           opt_state=opt.init(params), shared={'x': True})


def test_cosine_affinity_against_numpy():
  rng = np.random.default_rng(1)
  g = {'a': rng.normal(size=(4, 3, 2)), 'b': rng.normal(size=(4, 5))}
  flat = np.concatenate([g['a'].reshape(4, -1), g['b']], axis=1)
  n = np.linalg.norm(flat, axis=1)
  expected = flat @ flat.T / np.outer(n, n)
  got = tag.cosine_affinity(jax.tree.map(jnp.asarray, g))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # Only the shared leaves count.
  only_b = tag.cosine_affinity(jax.tree.map(jnp.asarray, g),
                               shared={'a': False, 'b': True})
  nb = np.linalg.norm(g['b'], axis=1)
  np.testing.assert_allclose(only_b, g['b'] @ g['b'].T / np.outer(nb, nb),
                             rtol=1e-5)
  # A zero gradient has no direction: NaN in its row and column.
  z = tag.cosine_affinity(jnp.asarray([[1.0, 0.0], [0.0, 0.0]]))
  assert np.isnan(z[1]).all() and np.isnan(z[:, 1]).all()


def test_affinity_average_schedule_and_nonfinite():
  avg = tag.affinity_average(every=3)
  values = [1.0, 100.0, 100.0, np.nan, 100.0, 100.0, 4.0, 100.0]
  calls = []

  @jax.jit
  def step(state, v):
    return avg.update(state, lambda: jnp.full((2, 2), v))

  chex.clear_trace_counter()
  state = avg.init(2)
  for v in values:
    calls.append(v)
    state = step(state, v)
  # Steps 0, 3, 6 are due; step 3 is NaN: skipped and counted.
  assert int(state.count) == 2 and int(state.skipped) == 1
  np.testing.assert_allclose(tag.epoch_affinity(state), np.full((2, 2), 2.5))
  state = tag.reset_epoch(state)
  assert int(state.step) == len(values)
  assert np.isnan(tag.epoch_affinity(state)).all()  # nothing recorded yet
  epochs = np.stack([np.full((2, 2), 1.0), np.full((2, 2), np.nan),
                     np.full((2, 2), 3.0), np.full((2, 2), 9.0)])
  np.testing.assert_allclose(tag.average_affinity(epochs), 13 / 3)
  np.testing.assert_allclose(tag.average_affinity(epochs, drop_last=1), 2.0)
  with pytest.raises(ValueError, match='no epoch'):
    tag.average_affinity(epochs[1:2])
  with pytest.raises(ValueError, match='every'):
    tag.affinity_average(every=0)


def test_affinity_average_in_a_jitted_training_step():
  """The affinity comes out of the training step itself; one trace."""
  params, loss, _, _, x, y = mlp_problem(dtype=jnp.float32)
  opt = optax.sgd(0.05, momentum=0.9)
  avg = tag.affinity_average(every=2)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def train_step(params, opt_state, aff_state):
    losses, grads = mgda_jax.per_task_grads(loss, params, x, y)
    aff_state = avg.update(aff_state, lambda: tag.lookahead_affinity(
        loss, params, x, y, optimizer=opt, opt_state=opt_state,
        shared=SHARED, grads=grads, losses=losses).affinity)
    updates, opt_state = opt.update(jax.tree.map(lambda g: g.sum(0), grads),
                                    opt_state, params)
    return optax.apply_updates(params, updates), opt_state, aff_state

  chex.clear_trace_counter()
  opt_state, aff = opt.init(params), avg.init(3)
  reference = []
  for s in range(4):
    if s % 2 == 0:
      reference.append(tag.lookahead_affinity(
          loss, params, x, y, optimizer=opt, opt_state=opt_state,
          shared=SHARED).affinity)
    params, opt_state, aff = train_step(params, opt_state, aff)
  np.testing.assert_allclose(tag.epoch_affinity(aff),
                             np.mean(reference, axis=0), atol=1e-6)


# --------------------------------------------------------------- selection


def brute_force_collections(a, budget):
  """The official search: every collection of at most ``budget`` subsets."""
  k = a.shape[0]
  subsets = [s for m in range(1, k + 1)
             for s in itertools.combinations(range(k), m)]
  table = np.full((len(subsets), k), -np.inf)
  for n, s in enumerate(subsets):
    for t in s:
      others = [i for i in s if i != t]
      table[n, t] = (np.mean([a[i, t] for i in others]) if others
                     else tag.SINGLETON_SCORE)
  best = -np.inf
  for m in range(1, budget + 1):
    combos = np.array(list(itertools.combinations(range(len(subsets)), m)))
    for start in range(0, len(combos), 200_000):
      c = combos[start:start + 200_000]
      best = max(best, table[c].max(axis=1).mean(axis=1).max())
  return best


def set_partitions(items):
  if not items:
    yield []
    return
  first, rest = items[0], items[1:]
  for part in set_partitions(rest):
    for n in range(len(part)):
      yield part[:n] + [[first] + part[n]] + part[n + 1:]
    yield [[first]] + part


def best_blocks(a):
  """Each serving set's best superset value, by enumeration."""
  k = a.shape[0]
  best_block = {}
  for m in range(1, k + 1):
    for p in itertools.combinations(range(k), m):
      rest = [t for t in range(k) if t not in p]
      best = -np.inf
      for r in range(len(rest) + 1):
        for extra in itertools.combinations(rest, r):
          g = sorted(p + extra)
          best = max(best, sum(tag.group_scores(a, g)[g.index(t)] for t in p))
      best_block[p] = best
  return best_block


def brute_force_partitions(a, budgets):
  """Serving sets as explicit set partitions, each block's best superset by
  enumeration (checked against the collection search where both run)."""
  k = a.shape[0]
  blocks = best_blocks(a)
  values = [(len(part), sum(blocks[tuple(sorted(b))] for b in part) / k)
            for part in set_partitions(list(range(k)))]
  return {b: max(v for n, v in values if n <= b) for b in budgets}


@pytest.mark.parametrize('k,budgets,reference', [
    (3, range(1, 4), 'collections'), (4, range(1, 5), 'collections'),
    (5, range(1, 6), 'collections'), (6, range(1, 5), 'collections'),
    (8, range(1, 4), 'collections'), (6, range(1, 7), 'partitions'),
    (8, range(1, 9), 'partitions')])
def test_select_groups_is_exact_against_brute_force(k, budgets, reference):
  rng = np.random.default_rng(k)
  for trial in range(2):
    a = rng.normal(size=(k, k))
    if trial:  # planted structure with noise: the realistic case
      blocks = rng.integers(0, 3, k)
      a = a * 0.3 + (blocks[:, None] == blocks[None, :]) - 0.5
    by_partitions = (brute_force_partitions(a, budgets)
                     if reference == 'partitions' else None)
    for b in budgets:
      got = tag.select_groups(a, b)
      assert got.exact
      ref = (brute_force_collections(a, b) if reference == 'collections'
             else by_partitions[b])
      np.testing.assert_allclose(got.score, ref, rtol=1e-12, atol=1e-12)
      # The reported groups really score that, and serve every task.
      score, _, serving = tag.collection_score(a, got.groups)
      np.testing.assert_allclose(score, got.score, rtol=1e-12)
      assert len(got.groups) <= b and serving == got.serving


def test_select_groups_local_search_past_the_limit():
  rng = np.random.default_rng(3)
  k = 9
  blocks = np.repeat(np.arange(3), 3)
  a = 0.2 * rng.normal(size=(k, k)) + (blocks[:, None] == blocks[None, :])
  exact = tag.select_groups(a, 3)
  approx = tag.select_groups(a, 3, max_exact_tasks=0)
  assert exact.exact and not approx.exact
  assert approx.score <= exact.score + 1e-12
  # The planted groups are found by both.
  assert exact.groups == approx.groups == ((0, 1, 2), (3, 4, 5), (6, 7, 8))
  # Random instances: never above the optimum, always a valid cover.
  for seed in range(3):
    a = np.random.default_rng(seed).normal(size=(8, 8))
    approx = tag.select_groups(a, 3, max_exact_tasks=0)
    assert approx.score <= tag.select_groups(a, 3).score + 1e-12
    tag.collection_score(a, approx.groups)  # raises unless a cover
  # 40 tasks (CelebA): the local search, in reasonable time.
  big = tag.select_groups(np.random.default_rng(0).normal(size=(40, 40)), 4)
  assert not big.exact and len(big.groups) <= 4
  assert sorted({t for g in big.groups for t in g}) == list(range(40))


def test_select_groups_errors_and_edge_cases():
  with pytest.raises(ValueError, match='non-finite'):
    tag.select_groups(np.array([[0.0, np.nan], [1.0, 0.0]]), 1)
  with pytest.raises(ValueError, match=r'\(K, K\)'):
    tag.select_groups(np.zeros((2, 3)), 1)
  with pytest.raises(ValueError, match='budget'):
    tag.select_groups(np.zeros((2, 2)), 0)
  one = tag.select_groups(np.zeros((1, 1)), 3)
  assert one.groups == ((0,),) and one.serving == (0,)
  # The diagonal (self-affinity) is never read.
  a = np.random.default_rng(0).normal(size=(5, 5))
  b = a.copy()
  np.fill_diagonal(b, 1e9)
  assert tag.select_groups(a, 2).groups == tag.select_groups(b, 2).groups
  np.fill_diagonal(b, np.nan)
  assert tag.select_groups(a, 2).score == tag.select_groups(b, 2).score
  with pytest.raises(ValueError, match='do not cover'):
    tag.collection_score(a, [(0, 1)])


def test_hoa_affinity():
  pair = np.array([[0.0, 0.9, 0.5], [0.8, 0.0, 0.6], [0.7, 0.95, 0.0]])
  single = np.array([0.8, 0.9, 0.5])
  a = tag.hoa_affinity(pair, single)
  np.testing.assert_allclose(a[0, 1], 0.0)          # 0.9 vs 0.9 alone
  np.testing.assert_allclose(a[1, 2], 0.2)          # 0.6 vs 0.5
  np.testing.assert_allclose(a[2, 0], -0.125)       # 0.7 vs 0.8
  np.testing.assert_allclose(np.diag(a), 0.0)
  err = tag.hoa_affinity(1 - pair, 1 - single, higher_is_better=False)
  np.testing.assert_array_equal(np.sign(err), np.sign(a))
