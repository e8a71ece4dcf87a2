"""Gradient methods against the property that defines each in its paper.

Every reference here is independent of the code under test: plain numpy on
explicit gradient vectors (not Gram matrices), brute-force enumeration of a
QP's supports, random search over a feasible set, or a closed form.
"""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_transforms import all_losses
from test_transforms import encode
from test_transforms import heads
from test_transforms import K
from test_transforms import make_problem
from test_transforms import shared_mask

import mgda_jax


def grads(seed, k, dim, kind='iid'):
  rng = np.random.default_rng(seed)
  if kind == 'iid':
    return rng.normal(size=(k, dim))
  if kind == 'conflicting':  # a common direction plus strong conflicts
    base = rng.normal(size=dim)
    return 0.3 * base + rng.normal(size=(k, dim))
  if kind == 'scaled':
    return rng.normal(size=(k, dim)) * np.logspace(-2, 2, k)[:, None]
  raise ValueError(kind)


def gram_of(j, dtype=jnp.float32):
  return jnp.asarray(j @ j.T, dtype)


# ----------------------------------------------------------------------------
# PCGrad / GradVac


def pcgrad_reference(j, orders):
  """The paper's Algorithm 1 on explicit vectors."""
  k = j.shape[0]
  out = []
  for i in range(k):
    gi = j[i].copy()
    for jj in orders[i]:
      if jj == i:
        continue
      dot = gi @ j[jj]
      if dot < 0:
        gi = gi - dot / (j[jj] @ j[jj]) * j[jj]
    out.append(gi)
  return np.sum(out, axis=0)


@pytest.mark.parametrize('seed', range(4))
def test_pcgrad_matches_the_vector_algorithm(seed):
  j = grads(seed, 5, 12, 'conflicting')
  orders = np.asarray(mgda_jax.task_orders(jax.random.PRNGKey(seed), 5))
  assert all(sorted(o) == list(range(5)) for o in orders)
  with jax.enable_x64(True):
    w = mgda_jax.pcgrad_weights(gram_of(j, jnp.float64), jnp.asarray(orders))
  np.testing.assert_allclose(np.asarray(w) @ j, pcgrad_reference(j, orders),
                             rtol=1e-10, atol=1e-10)


def test_pcgrad_two_tasks_projected_gradients_do_not_conflict():
  j = np.array([[1.0, 0.2], [-0.8, 1.0]])  # conflicting: <g1, g2> < 0
  assert j[0] @ j[1] < 0
  w = mgda_jax.pcgrad_weights(gram_of(j), mgda_jax.task_orders(None, 2))
  d = np.asarray(w) @ j
  g1p = j[0] - (j[0] @ j[1]) / (j[1] @ j[1]) * j[1]
  g2p = j[1] - (j[1] @ j[0]) / (j[0] @ j[0]) * j[0]
  np.testing.assert_allclose(d, g1p + g2p, rtol=1e-5, atol=1e-6)
  # The defining property: neither projected gradient conflicts.
  assert g1p @ j[1] >= -1e-6 and g2p @ j[0] >= -1e-6


def test_pcgrad_without_conflict_is_the_sum():
  j = np.abs(grads(1, 4, 6))  # all inner products positive
  w = mgda_jax.pcgrad_weights(gram_of(j), mgda_jax.task_orders(None, 4))
  np.testing.assert_allclose(w, np.ones(4), rtol=1e-6)


def test_gradvac_with_zero_targets_is_pcgrad():
  j = grads(3, 6, 10, 'conflicting')
  orders = mgda_jax.task_orders(jax.random.PRNGKey(3), 6)
  w, _ = mgda_jax.gradvac_weights(gram_of(j), orders, jnp.zeros((6, 6)), 0.0)
  np.testing.assert_allclose(np.asarray(w) @ j,
                             pcgrad_reference(j, np.asarray(orders)),
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('target', [0.3, -0.2, 0.8])
def test_gradvac_raises_the_cosine_to_its_target(target):
  j = np.array([[1.0, 0.3, -0.5], [-0.4, 1.2, 0.9]])
  cos = j[0] @ j[1] / np.linalg.norm(j[0]) / np.linalg.norm(j[1])
  assert cos < target
  with jax.enable_x64(True):
    w, new_t = mgda_jax.gradvac_weights(
        gram_of(j, jnp.float64), mgda_jax.task_orders(None, 2),
        jnp.full((2, 2), target, jnp.float64), 0.25)
  # Task 0's edited gradient: d = g0' + g1' and g1' = g1 + c g0; recover g0'
  # by rerunning with task 1 unconflicted is circular, so check directly:
  # g0' = g0 + a g1 with cos(g0', g1) == target.
  a = (np.asarray(w)[1] - 1.0)  # weight of g1 from task 0's row ...
  # ... plus task 1's own row, which adds b g0 to g1: w = (1 + b, 1 + a).
  g0p = j[0] + a * j[1]
  np.testing.assert_allclose(
      g0p @ j[1] / np.linalg.norm(g0p) / np.linalg.norm(j[1]), target,
      atol=1e-8)
  # The targets move towards the observed cosine (before the edit).
  np.testing.assert_allclose(new_t[0, 1], 0.75 * target + 0.25 * cos,
                             atol=1e-12)


# ----------------------------------------------------------------------------
# CAGrad


def cagrad_direction(j, c, rescale):
  with jax.enable_x64(True):
    w, info = mgda_jax.cagrad_weights(gram_of(j, jnp.float64), c,
                                      rescale=rescale)
  assert bool(info.converged)
  return np.asarray(w) @ j


@pytest.mark.parametrize('rescale', [True, False])
def test_cagrad_at_c0_is_the_mean_gradient(rescale):
  j = grads(0, 5, 9, 'conflicting')
  np.testing.assert_allclose(cagrad_direction(j, 0.0, rescale), j.mean(0),
                             rtol=1e-12)


@pytest.mark.parametrize('seed,c', [(0, 0.4), (1, 0.5), (2, 0.9), (3, 0.2)])
def test_cagrad_solves_its_primal_problem(seed, c):
  """d maximises min_t <g_t, d> over the ball ||d - g0|| <= c ||g0||.

  Certified by duality, in numpy: any feasible d and any w on the simplex
  satisfy min_t <g_t, d> <= <g_w, g0> + r ||g_w|| (weak duality), so equal
  values at the returned d and dual w prove both optimal.
  """
  j = grads(seed, 4, 6, 'conflicting')
  g0 = j.mean(0)
  r = c * np.linalg.norm(g0)
  with jax.enable_x64(True):
    _, info = mgda_jax.cagrad_weights(gram_of(j, jnp.float64), c,
                                      rescale=False)
  w = np.asarray(info.dual_weights)
  assert np.all(w >= -1e-12) and abs(w.sum() - 1) < 1e-9
  d = cagrad_direction(j, c, rescale=False)
  assert np.linalg.norm(d - g0) <= r * (1 + 1e-9)          # feasible
  primal = np.min(j @ d)
  g_w = w @ j
  dual = g_w @ g0 + r * np.linalg.norm(g_w)
  assert primal <= dual + 1e-9 * abs(dual)                  # weak duality
  np.testing.assert_allclose(primal, dual, rtol=1e-6, atol=1e-8)
  # And the primal is no worse than the mean gradient, a feasible point.
  assert primal >= np.min(j @ g0) - 1e-12


def test_cagrad_dual_solution_in_float32_is_honest():
  """Norms over 4 decades: where the dual solve says converged, its gap
  (recomputed in float64) is within tol of the dual objective's size; where
  projected gradient is too slow for that, it says MAX_STEPS_REACHED.

  (The old stopping rule, relative to the longest gradient, said converged
  on all five while up to 45% of the dual objective away.)"""
  converged = 0
  for seed in range(5):
    j = grads(seed, 10, 30, 'scaled')
    w, info = mgda_jax.cagrad_weights(gram_of(j), 0.5)
    assert np.all(np.isfinite(w))
    g = j @ j.T / np.max(np.diag(j @ j.T))
    x = np.asarray(info.dual_weights, np.float64)
    r = 0.5 * np.sqrt(g.mean())
    norm = np.sqrt(x @ g @ x)
    grad = g.mean(1) + r * g @ x / norm
    gap = grad @ x - grad.min()
    size = abs(g.mean(1) @ x) + r * norm
    if bool(info.converged):
      converged += 1
      assert gap <= 1e-4 * size + 1e-5 * (x @ np.abs(grad))
    else:
      assert int(info.result) == int(mgda_jax.SolverResult.MAX_STEPS_REACHED)
  # Known limit: projected gradient on the dual converges slowly when the
  # norms are spread over decades (seed 3 is still 29% off after 5000
  # steps), which the result code now says instead of "converged".
  assert converged >= 1


# ----------------------------------------------------------------------------
# IMTL-G, Nash-MTL, Aligned-MTL


@pytest.mark.parametrize('kind', ['iid', 'conflicting', 'scaled'])
def test_imtl_g_projections_onto_unit_gradients_are_equal(kind):
  j = grads(4, 5, 16, kind)
  with jax.enable_x64(True):
    alpha = np.asarray(mgda_jax.imtl_g_weights(gram_of(j, jnp.float64)))
  np.testing.assert_allclose(alpha.sum(), 1.0, rtol=1e-12)
  d = alpha @ j
  proj = j @ d / np.linalg.norm(j, axis=1)
  np.testing.assert_allclose(proj, np.full(5, proj[0]), rtol=1e-8)
  alpha32 = np.asarray(mgda_jax.imtl_g_weights(gram_of(j)))
  np.testing.assert_allclose(alpha32, alpha, rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize('kind', ['iid', 'conflicting', 'scaled'])
def test_nash_mtl_weights_solve_the_bargaining_equation(kind):
  j = grads(5, 6, 20, kind)
  g = j @ j.T
  with jax.enable_x64(True):
    alpha, info = mgda_jax.nash_mtl_weights(jnp.asarray(g))
  alpha = np.asarray(alpha)
  assert bool(info.converged) and np.all(alpha > 0)
  np.testing.assert_allclose(g @ alpha, 1.0 / alpha, rtol=1e-8)
  d = alpha @ j
  np.testing.assert_allclose(d @ d, 6.0, rtol=1e-8)  # ||d||^2 = K
  alpha32, info32 = mgda_jax.nash_mtl_weights(gram_of(j))
  assert bool(info32.converged)
  np.testing.assert_allclose(alpha32, alpha, rtol=1e-3)


@pytest.mark.parametrize('k,dim', [(4, 10), (6, 3)])
def test_aligned_mtl_aligned_gradients_are_orthogonal_with_equal_norms(k, dim):
  j = grads(6, k, dim, 'scaled')
  with jax.enable_x64(True):
    b = np.asarray(mgda_jax.aligned_mtl_matrix(gram_of(j, jnp.float64)))
  aligned = b.T @ j  # rows: the aligned task gradients, J^T B
  sv = np.linalg.svd(j, compute_uv=False)
  rank = min(k, dim)
  sigma_min = sv[rank - 1]
  # Singular values of the aligned system: sigma_min on the span, else 0.
  sv_aligned = np.linalg.svd(aligned, compute_uv=False)
  np.testing.assert_allclose(sv_aligned[:rank], sigma_min, rtol=1e-8)
  np.testing.assert_allclose(sv_aligned[rank:], 0.0, atol=1e-8 * sigma_min)
  if k <= dim:  # full rank: orthogonal rows of equal norm
    np.testing.assert_allclose(aligned @ aligned.T,
                               sigma_min ** 2 * np.eye(k), atol=1e-8 * sv[0])


# ----------------------------------------------------------------------------
# UPGrad, DualProj, and their QP solver


def brute_nonneg_qp(g, c):
  k = len(c)
  best = (np.inf, None)
  for r in range(k + 1):
    for s in itertools.combinations(range(k), r):
      x = np.zeros(k)
      if s:
        s = list(s)
        z = np.linalg.lstsq(g[np.ix_(s, s)], -c[s], rcond=None)[0]
        if np.any(z < -1e-12):
          continue
        x[s] = z
      f = 0.5 * x @ g @ x + c @ x
      if f < best[0]:
        best = (f, x)
  return best


@pytest.mark.parametrize('dtype', ['float32', 'float64'])
def test_nonneg_qp_matches_enumeration(dtype):
  rng = np.random.default_rng(11)
  tol = 1e-9 if dtype == 'float64' else 3e-4
  with jax.enable_x64(dtype == 'float64'):
    solve = jax.jit(mgda_jax.nonneg_qp)
    for _ in range(60):
      k, dim = rng.integers(2, 8), rng.integers(1, 12)
      j = rng.normal(size=(k, dim)) * np.exp(rng.normal(size=(k, 1)))
      g = j @ j.T
      c = g @ rng.normal(size=k)
      f_ref, _ = brute_nonneg_qp(g, c)
      sol = solve(jnp.asarray(g, dtype), jnp.asarray(c, dtype))
      x = np.asarray(sol.x, np.float64)
      assert np.all(x >= 0) and bool(sol.converged)
      f = 0.5 * x @ g @ x + c @ x
      assert f - f_ref <= tol * max(np.max(np.diag(g)), abs(f_ref))


def projection_reference(j, u):
  """The projection of J^T u onto the dual cone, by enumeration."""
  g = j @ j.T
  _, x = brute_nonneg_qp(g, g @ u)
  return (u + x) @ j


@pytest.mark.parametrize('kind', ['iid', 'conflicting', 'scaled'])
def test_upgrad_is_the_mean_of_the_dual_cone_projections(kind):
  j = grads(7, 5, 8, kind)
  with jax.enable_x64(True):
    w, info = mgda_jax.upgrad_weights(gram_of(j, jnp.float64))
  assert bool(info.converged)
  d = np.asarray(w) @ j
  ref = np.mean([projection_reference(j, np.eye(5)[i]) for i in range(5)],
                axis=0)
  np.testing.assert_allclose(d, ref, rtol=1e-8, atol=1e-10 * np.abs(j).max())
  # The defining property: no task conflicts with the update.
  assert np.all(j @ d >= -1e-10 * np.linalg.norm(j, axis=1) * np.linalg.norm(d))


@pytest.mark.parametrize('dtype', ['float32', 'float64'])
def test_upgrad_and_dualproj_never_conflict(dtype):
  rng = np.random.default_rng(3)
  fns = (jax.jit(mgda_jax.upgrad_weights), jax.jit(mgda_jax.dualproj_weights))
  with jax.enable_x64(dtype == 'float64'):
    for _ in range(20):
      k = int(rng.choice([2, 5, 11]))  # three shapes: three compilations
      j = grads(int(rng.integers(1000)), k, int(rng.integers(2, 30)),
                'conflicting')
      for fn in fns:
        w, info = fn(gram_of(j, dtype))
        assert bool(info.converged)
        d = np.asarray(w, np.float64) @ j
        cos = j @ d / np.linalg.norm(j, axis=1) / max(np.linalg.norm(d),
                                                      1e-300)
        assert np.all(cos >= (-1e-9 if dtype == 'float64' else -1e-4))


def test_dualproj_is_the_projection_of_the_mean():
  j = grads(8, 4, 6, 'conflicting')
  with jax.enable_x64(True):
    w, _ = mgda_jax.dualproj_weights(gram_of(j, jnp.float64))
  np.testing.assert_allclose(np.asarray(w) @ j,
                             projection_reference(j, np.full(4, 0.25)),
                             rtol=1e-8, atol=1e-10)


def test_gradient_normalization_scales_each_task_to_unit_or_mean_norm():
  j = grads(2, 4, 7, 'scaled')
  n = np.linalg.norm(j, axis=1)
  for scale, target in (('unit', 1.0), ('mean', n.mean())):
    params = {'w': jnp.zeros(7)}
    tx = mgda_jax.gradient_normalization(4, scale=scale)
    update, state = tx.update({'w': jnp.asarray(j, jnp.float32)},
                              tx.init(params), params)
    w = np.asarray(state.weights, np.float64)
    np.testing.assert_allclose(w * n, target, rtol=1e-5)
    np.testing.assert_allclose(update['w'], (j / n[:, None]).sum(0) * target,
                               rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match='scale'):
    mgda_jax.gradient_normalization(4, scale='max')


def test_upgrad_without_conflict_is_the_mean():
  j = np.abs(grads(9, 4, 6))
  w, _ = mgda_jax.upgrad_weights(gram_of(j))
  np.testing.assert_allclose(w, np.full(4, 0.25), rtol=1e-6)


# ----------------------------------------------------------------------------
# GradDrop


def test_graddrop_keeps_one_sign_per_element():
  rng = np.random.default_rng(0)
  g = jnp.asarray(rng.normal(size=(4, 2000)), jnp.float32)
  out = np.asarray(mgda_jax.graddrop_combine(g, jax.random.PRNGKey(1)))
  gn = np.asarray(g)
  pos = np.where(gn > 0, gn, 0).sum(0)
  neg = np.where(gn < 0, gn, 0).sum(0)
  is_pos = np.isclose(out, pos, rtol=1e-5, atol=1e-6)
  is_neg = np.isclose(out, neg, rtol=1e-5, atol=1e-6)
  assert np.all(is_pos | is_neg)
  # Positive gradients are kept with probability P = (1 + sum/sum|.|) / 2.
  purity = 0.5 * (1 + gn.sum(0) / np.abs(gn).sum(0))
  keys = jax.random.split(jax.random.PRNGKey(2), 400)
  col = g[:, :8]
  picks = np.stack([np.asarray(mgda_jax.graddrop_combine(col, kk))
                    for kk in keys])
  freq = np.isclose(picks, pos[:8], rtol=1e-5, atol=1e-6).mean(0)
  sd = np.sqrt(purity[:8] * (1 - purity[:8]) / 400)
  assert np.all(np.abs(freq - purity[:8]) <= 4.5 * sd + 1e-3)


def test_graddrop_agreeing_signs_are_kept_and_leak_one_is_the_sum():
  g = jnp.array([[1.0, -2.0, 0.5], [3.0, -1.0, -0.5]])
  out = mgda_jax.graddrop_combine(g, jax.random.PRNGKey(0))
  np.testing.assert_allclose(out[:2], [4.0, -3.0])
  np.testing.assert_allclose(
      mgda_jax.graddrop_combine(g, jax.random.PRNGKey(0), leak=1.0),
      g.sum(0))


def test_graddrop_is_reproducible_from_its_key():
  params, (x, y) = make_problem(2)
  _, g = mgda_jax.representation_grads(encode, heads, params, x, y)
  tx = mgda_jax.graddrop(K, key=5)
  step = jax.jit(tx.update)
  s = tx.init(params)
  u1, s1 = step(g, s, params)
  u1b, _ = step(g, tx.init(params), params)
  u2, _ = step(g, s1, params)
  chex.assert_trees_all_equal(u1, u1b)
  assert not np.allclose(u1['encoder']['w1'], u2['encoder']['w1'])


# ----------------------------------------------------------------------------
# Degenerate input (the properties every method shares are in
# test_every_method.py)


GRADIENT_METHODS = {
    'pcgrad': lambda: mgda_jax.pcgrad(K, key=1),
    'gradvac': lambda: mgda_jax.gradvac(K, key=1),
    'cagrad': lambda: mgda_jax.cagrad(K, c=0.4),
    'imtl_g': lambda: mgda_jax.imtl_g(K),
    'nash_mtl': lambda: mgda_jax.nash_mtl(K),
    'aligned_mtl': lambda: mgda_jax.aligned_mtl(K),
    'upgrad': lambda: mgda_jax.upgrad(K),
    'dualproj': lambda: mgda_jax.dualproj(K),
    'gradient_normalization': lambda: mgda_jax.gradient_normalization(K),
    'graddrop': lambda: mgda_jax.graddrop(K, key=1),
}

DEGENERATE = {
    'zero_gradient': np.array([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0],
                               [-1.0, 0.5, 1.0]]),
    'identical': np.tile(np.array([[0.5, -1.0, 2.0]]), (3, 1)),
    'all_zero': np.zeros((3, 3)),
    'opposite': np.array([[1.0, 1.0, 0.0], [-1.0, -1.0, 0.0],
                          [0.0, 1.0, 1.0]]),
}


@pytest.mark.parametrize('dtype', ['float32', 'float64'])
@pytest.mark.parametrize('case', sorted(DEGENERATE))
@pytest.mark.parametrize('name', sorted(GRADIENT_METHODS))
def test_methods_on_degenerate_input_are_finite(name, case, dtype):
  with jax.enable_x64(dtype == 'float64'):
    g = {'w': jnp.asarray(DEGENERATE[case], dtype)}
    params = {'w': jnp.zeros(3, dtype)}
    tx = GRADIENT_METHODS[name]()
    step = jax.jit(tx.update)
    state = tx.init(params)
    for _ in range(2):
      update, state = step(g, state, params)
    assert update['w'].dtype == jnp.dtype(dtype)
    assert np.all(np.isfinite(update['w'])), (name, case, update)
    if name != 'graddrop':  # GradDrop has no weights (NaN by contract)
      assert np.all(np.isfinite(state.weights)), (name, state)
    if case == 'identical' and name != 'graddrop':
      # Every method moves along the common gradient, not against it.
      assert float(update['w'] @ g['w'][0]) > 0, (name, update)
    if case == 'all_zero':
      np.testing.assert_allclose(update['w'], 0.0)


@pytest.mark.parametrize('dtype', ['float32', 'float64'])
@pytest.mark.parametrize('name', sorted(GRADIENT_METHODS))
def test_methods_on_two_opposite_gradients_are_finite(name, dtype):
  """Two exactly opposite gradients: no direction helps both tasks."""
  with jax.enable_x64(dtype == 'float64'):
    g = {'w': jnp.asarray([[1.0, -2.0, 0.5], [-1.0, 2.0, -0.5]], dtype)}
    params = {'w': jnp.zeros(3, dtype)}
    factory = mgda_jax.__dict__[name]
    tx = (factory(2, key=1) if name in ('pcgrad', 'gradvac', 'graddrop')
          else factory(2))
    update, state = jax.jit(tx.update)(g, tx.init(params), params)
    assert np.all(np.isfinite(update['w'])), (name, update)
    if name != 'graddrop':  # GradDrop has no weights (NaN by contract)
      assert np.all(np.isfinite(state.weights)), (name, state)
    # None of them may move along one task's gradient at the other's expense
    # by more than a whole gradient.
    assert float(jnp.linalg.norm(update['w'])) <= 2 * float(
        jnp.linalg.norm(g['w'][0])) + 1e-6


def test_nash_mtl_transform_solves_the_normalised_equation():
  params, (x, y) = make_problem(6)
  _, g = mgda_jax.per_task_grads(all_losses, params, x, y)
  jac = np.concatenate([np.asarray(l, np.float64).reshape(K, -1)
                        for l in jax.tree.leaves(g)], 1)
  gram = jac @ jac.T
  for normalize, scale in ((True, np.linalg.norm(gram)), (False, 1.0)):
    tx = mgda_jax.nash_mtl(K, normalize=normalize)
    _, s = tx.update(g, tx.init(params), params)
    a = np.asarray(s.weights, np.float64)
    np.testing.assert_allclose(gram / scale @ a, 1 / a, rtol=2e-3)


# ----------------------------------------------------------------------------
# Regressions of the Core 2.0 cross-check against LibMTL and TorchJD, each
# against an independent reference.


def test_cagrad_float32_gram_under_x64_keeps_its_dtype():
  with jax.enable_x64(True):
    w, info = mgda_jax.cagrad_weights(jnp.eye(3, dtype=jnp.float32), 0.4)
  assert w.dtype == jnp.float32 and bool(info.converged)
  # Orthogonal unit gradients: by symmetry the update is the mean, scaled.
  np.testing.assert_allclose(w, np.full(3, w[0]), rtol=1e-5)


@pytest.mark.parametrize('dtype,scale', [('float32', 1e-2), ('float32', 1e-3),
                                         ('float32', 1e3),
                                         ('float64', 1e-6)])
def test_upgrad_and_dualproj_on_small_or_large_gradients(dtype, scale):
  """Same answer at every gradient scale (the QP stopped on an absolute
  tolerance: 47% error and conflicting directions at 1e-3 in float32)."""
  rng = np.random.default_rng(2)
  with jax.enable_x64(dtype == 'float64'):
    for _ in range(5):
      j = grads(int(rng.integers(1000)), 5, 8, 'conflicting') * scale
      gram = gram_of(j, dtype)
      d_up = np.asarray(jax.jit(mgda_jax.upgrad_weights)(gram)[0],
                        np.float64) @ j
      d_dp = np.asarray(jax.jit(mgda_jax.dualproj_weights)(gram)[0],
                        np.float64) @ j
      ref_up = np.mean([projection_reference(j, np.eye(5)[i])
                        for i in range(5)], axis=0)
      ref_dp = projection_reference(j, np.full(5, 0.2))
      tol = 1e-3 if dtype == 'float32' else 1e-8
      for d, ref in ((d_up, ref_up), (d_dp, ref_dp)):
        np.testing.assert_allclose(d, ref, atol=tol * np.linalg.norm(ref))
        # Non-conflicting, up to the rounding of the solve dtype.
        norms = np.linalg.norm(j, axis=1) * np.linalg.norm(d)
        assert np.all(j @ d >= -50 * np.finfo(dtype).eps * norms)


@pytest.mark.parametrize('long', [1e2, 1e3, 1e4])
def test_mgda_float32_with_one_long_gradient_matches_the_exact_qp(long):
  """The min-norm direction never conflicts: <g_t, d> >= ||d||^2 (up to the
  certificate), against the exact QP on the same Gram matrix."""
  from qp_reference import enumerate_qp  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(int(long))
  for _ in range(10):
    j = rng.normal(size=(4, 6))
    j[0] *= long
    gram = j @ j.T
    sol = jax.jit(mgda_jax.min_norm_element)(jnp.asarray(gram, jnp.float32))
    a = np.asarray(sol.weights, np.float64)
    a_star, f_star = enumerate_qp(gram)
    d, d_star = a @ j, a_star @ j
    if bool(sol.converged):
      assert a @ gram @ a - f_star <= 1e-4 * f_star + 4 * np.finfo(
          np.float32).eps * (a @ np.sqrt(np.diag(gram))) ** 2
    np.testing.assert_allclose(d, d_star, atol=2e-2 * np.linalg.norm(d_star))
    assert np.all(j @ d >= (1 - 2e-2) * (d @ d))


@pytest.mark.parametrize('long', [1e2, 1e4])
def test_cagrad_float32_wide_norms_reach_the_ball_and_the_optimum(long):
  """d on the ball's boundary and primal = dual (certified in float64).

  The reference code's smoothing (1e-8 of the largest squared norm) left d
  11% inside the ball with norms spread over 1e4.
  """
  rng = np.random.default_rng(4)
  c = 0.5
  for _ in range(5):
    j = grads(int(rng.integers(1000)), 4, 6, 'conflicting')
    j[1] *= long
    g0 = j.mean(0)
    r = c * np.linalg.norm(g0)
    w, info = mgda_jax.cagrad_weights(gram_of(j), c, rescale=False)
    assert bool(info.converged)
    d = np.asarray(w, np.float64) @ j
    np.testing.assert_allclose(np.linalg.norm(d - g0), r, rtol=2e-3)
    x = np.asarray(info.dual_weights, np.float64)
    g_w = x @ j
    dual = g_w @ g0 + r * np.linalg.norm(g_w)
    primal = np.min(j @ d)
    np.testing.assert_allclose(primal, dual, rtol=2e-3,
                               atol=1e-5 * np.linalg.norm(j[1]) * r)


def test_nash_mtl_default_solves_the_authors_equation_on_the_raw_gram():
  """For G = 100 I the authors' code (and TorchJD's port) gives alpha = 0.1:
  alpha * (G alpha) = 1 on the raw Gram matrix."""
  alpha, info = mgda_jax.nash_mtl_weights(100.0 * jnp.eye(3))
  assert bool(info.converged)
  np.testing.assert_allclose(alpha, 0.1, rtol=1e-5)
  tx = mgda_jax.nash_mtl(3)
  g = {'w': 10.0 * jnp.eye(3)}   # Gram 100 I
  _, state = tx.update(g, tx.init(g), None)
  np.testing.assert_allclose(state.weights, 0.1, rtol=1e-5)


def test_imtl_g_on_rank_deficient_gradients_is_the_documented_formula():
  """J = [[1, 0], [0, 1], [1, 1]]: alpha = G^+ n / 1^T G^+ n gives d =
  (3/4, 3/4), as TorchJD does (the old code gave (2/3, 2/3))."""
  j = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  gram = j @ j.T
  n = np.sqrt(np.diag(gram))
  v = np.linalg.pinv(gram) @ n
  ref = (v / v.sum()) @ j
  np.testing.assert_allclose(ref, [0.75, 0.75], atol=1e-12)
  for dtype in ('float32', 'float64'):
    with jax.enable_x64(dtype == 'float64'):
      w = mgda_jax.imtl_g_weights(gram_of(j, dtype))
    np.testing.assert_allclose(np.asarray(w, np.float64) @ j, ref,
                               atol=1e-5 if dtype == 'float32' else 1e-12)


def test_imtl_g_with_wide_norms_matches_the_formula():
  rng = np.random.default_rng(6)
  j = rng.normal(size=(4, 9)) * np.array([[1.0], [1e2], [1e-1], [1e3]])
  gram = j @ j.T
  v = np.linalg.solve(gram, np.sqrt(np.diag(gram)))
  ref = (v / v.sum()) @ j
  w = mgda_jax.imtl_g_weights(gram_of(j))
  np.testing.assert_allclose(np.asarray(w, np.float64) @ j, ref,
                             atol=1e-4 * np.linalg.norm(ref))
