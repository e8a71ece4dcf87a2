"""Tests of the mgda and mgda_ub optax transforms on a small MLP.

References are built independently: per-task gradients with ``jax.jacrev``,
the Gram matrix in numpy float64, and the weights from the brute-force QP.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from qp_reference import enumerate_qp

import mgda_jax
from mgda_jax import SolverResult

K, B = 3, 7


def make_problem(seed=0):
  rng = np.random.default_rng(seed)
  f32 = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  params = {
      'encoder': {'w1': f32(6, 8), 'b1': f32(8), 'w2': f32(8, 5)},
      'heads': {'w': f32(K, 5, 3), 'b': f32(K, 3)},
  }
  batch = (f32(B, 6), f32(K, B, 3))
  return params, batch


def encode(params, x, y):
  del y
  p = params['encoder']
  return jnp.tanh(jnp.tanh(x @ p['w1'] + p['b1']) @ p['w2'])  # Z: (B, 5)


def heads(params, z, x, y):
  del x
  p = params['heads']
  pred = jnp.einsum('bd,kdo->kbo', z, p['w']) + p['b'][:, None]
  return jnp.mean(jnp.sum((pred - y) ** 2, -1), -1)  # (K,)


def all_losses(params, x, y):
  return heads(params, encode(params, x, y), x, y)


def shared_mask(params):
  return {'encoder': jax.tree.map(lambda _: True, params['encoder']),
          'heads': jax.tree.map(lambda _: False, params['heads'])}


def reference_alpha(task_vectors, losses=None, normalizer='none'):
  g = np.asarray(task_vectors, np.float64).reshape(K, -1)
  n = np.ones(K)
  if normalizer == 'loss+':
    n = np.asarray(losses, np.float64) * np.linalg.norm(g, axis=1)
  g = g / n[:, None]
  alpha, _ = enumerate_qp(g @ g.T)
  return alpha


def combine(alpha, tree):
  return jax.tree.map(lambda g: np.tensordot(alpha, np.asarray(g), 1), tree)


# ----------------------------------------------------------------------------
# MGDA-UB


@pytest.mark.parametrize('normalizer', ['none', 'loss+'])
def test_mgda_ub_matches_jacrev_reference(normalizer):
  params, (x, y) = make_problem()
  tx = mgda_jax.mgda_ub(K, normalizer=normalizer)
  losses, grads = mgda_jax.representation_grads(encode, heads, params, x, y)
  update, state = jax.jit(lambda g, s, p, l: tx.update(g, s, p, losses=l))(
      grads, tx.init(params), params, losses)

  # Independent reference: jacrev w.r.t. Z (the full (B, 5) tensor per task)
  # and w.r.t. the parameters.
  z = encode(params, x, y)
  dz = jax.jacrev(lambda z: heads(params, z, x, y))(z)  # (K, B, 5)
  jac = jax.jacrev(all_losses)(params, x, y)  # leaves (K, ...)
  np.testing.assert_allclose(losses, all_losses(params, x, y), rtol=1e-6)
  np.testing.assert_allclose(grads.rep_grads, dz, rtol=1e-5, atol=1e-6)
  alpha_ref = reference_alpha(dz, losses, normalizer)
  # Judged by the objective (the solver certifies it, not alpha, which
  # float32 pins only to about sqrt(eps)): within 1e-4 of the reference's.
  jz = np.asarray(dz, np.float64).reshape(K, -1)
  n = {'none': np.ones(K), 'loss+': np.asarray(losses, np.float64)
       * np.linalg.norm(jz, axis=1)}[normalizer]
  gram = (jz / n[:, None]) @ (jz / n[:, None]).T
  alpha = np.asarray(state.weights, np.float64)
  assert alpha @ gram @ alpha <= (1 + 1e-4) * (alpha_ref @ gram @ alpha_ref)
  expected = {'encoder': combine(alpha, jac['encoder']),
              'heads': jax.tree.map(lambda g: np.sum(g, 0), jac['heads'])}
  chex.assert_trees_all_close(update, expected, rtol=1e-4, atol=1e-5)
  # Each head got its own task's gradient, unscaled.
  for t in range(K):
    np.testing.assert_allclose(update['heads']['w'][t],
                               jac['heads']['w'][t, t], rtol=1e-5, atol=1e-6)
  assert int(state.count) == 1
  assert int(state.info.result) == SolverResult.CONVERGED


def test_mgda_ub_direction_descends_every_task_at_z():
  # <d, dL_t/dZ> >= ||d||^2 for the combined cotangent d (KKT).
  params, (x, y) = make_problem(1)
  losses, grads = mgda_jax.representation_grads(encode, heads, params, x, y)
  tx = mgda_jax.mgda_ub(K)
  _, state = tx.update(grads, tx.init(params), params)
  dz = np.asarray(grads.rep_grads, np.float64).reshape(K, -1)
  d = np.asarray(state.weights, np.float64) @ dz
  assert np.all(dz @ d >= (d @ d) * (1 - 1e-4) - 1e-9)
  del losses


def test_representation_grads_has_aux():
  params, (x, y) = make_problem()

  def heads_aux(p, z, x, y):
    return heads(p, z, x, y), {'z_mean': jnp.mean(z)}

  (losses, aux), grads = mgda_jax.representation_grads(
      encode, heads_aux, params, x, y, has_aux=True)
  np.testing.assert_allclose(aux['z_mean'], jnp.mean(encode(params, x, y)))
  assert losses.shape == (K,) and isinstance(grads,
                                             mgda_jax.RepresentationGrads)


def test_training_step_is_one_program_traced_once_without_callbacks():
  params, (x, y) = make_problem()
  tx = optax.chain(mgda_jax.mgda_ub(K), optax.sgd(0.05, momentum=0.9))
  opt_state = tx.init(params)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def train_step(params, opt_state, x, y):
    losses, grads = mgda_jax.representation_grads(encode, heads, params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, losses=losses)
    return optax.apply_updates(params, updates), opt_state, losses

  first = all_losses(params, x, y)
  for _ in range(5):
    params, opt_state, _ = train_step(params, opt_state, x, y)
  assert int(opt_state[0].count) == 5
  # MGDA-UB steps descend on this problem: every task loss went down.
  assert np.all(np.asarray(all_losses(params, x, y)) < np.asarray(first))
  hlo = train_step.lower(params, opt_state, x, y).as_text().lower()
  assert 'callback' not in hlo and 'python' not in hlo


def test_mgda_ub_under_inject_hyperparams():
  params, (x, y) = make_problem()
  tx = optax.inject_hyperparams(mgda_jax.mgda_ub, static_args=('num_tasks',))(
      num_tasks=K, tol=1e-6, max_steps=100)
  state = tx.init(params)
  assert set(state.hyperparams) == {'tol', 'max_steps'}
  _, grads = mgda_jax.representation_grads(encode, heads, params, x, y)
  step = jax.jit(tx.update)
  _, new_state = step(grads, state, params)
  assert bool(new_state.inner_state.info.converged)
  # The hyperparameter is live: capping the solver at 0 steps is visible.
  state.hyperparams['max_steps'] = jnp.asarray(0)
  _, capped = step(grads, state, params)
  assert int(capped.inner_state.info.num_steps) == 0


def test_num_tasks_must_be_static_under_inject_hyperparams():
  params, (x, y) = make_problem()
  tx = optax.inject_hyperparams(mgda_jax.mgda_ub)(num_tasks=K)
  _, grads = mgda_jax.representation_grads(encode, heads, params, x, y)
  with pytest.raises(ValueError, match='static_args'):
    jax.jit(tx.update)(grads, tx.init(params), params)


def test_mgda_ub_rejects_wrong_input_and_task_count():
  params, (x, y) = make_problem()
  _, grads = mgda_jax.representation_grads(encode, heads, params, x, y)
  with pytest.raises(ValueError, match='num_tasks=4'):
    mgda_jax.mgda_ub(4).update(grads, mgda_jax.mgda_ub(4).init(params))
  with pytest.raises(ValueError, match='RepresentationGrads'):
    mgda_jax.mgda_ub(K).update(params, mgda_jax.mgda_ub(K).init(params))
  with pytest.raises(ValueError, match='K >= 1'):
    mgda_jax.representation_grads(encode, lambda p, z, x, y: jnp.zeros(0),
                                  params, x, y)
  with pytest.raises(ValueError, match='num_tasks must be >= 1'):
    mgda_jax.mgda_ub(0)


def test_nonfinite_gradients_are_flagged_and_skippable():
  params, (x, y) = make_problem()
  x = x.at[0, 0].set(jnp.nan)
  losses, grads = mgda_jax.representation_grads(encode, heads, params, x, y)
  tx = mgda_jax.mgda_ub(K)
  update, state = tx.update(grads, tx.init(params), params)
  assert int(state.info.result) == SolverResult.NONFINITE
  assert not bool(state.info.converged)
  assert np.all(np.isnan(state.weights))
  assert np.isnan(update['encoder']['w1']).any()
  # With optax.apply_if_finite after it, the step is skipped and params are
  # unchanged, while the MGDA state still reports why.
  safe = optax.chain(tx, optax.apply_if_finite(optax.sgd(0.1), 3))
  upd, safe_state = jax.jit(safe.update)(grads, safe.init(params), params,
                                         losses=losses)
  new_params = optax.apply_updates(params, upd)
  chex.assert_trees_all_equal(new_params, params)
  assert not bool(safe_state[1].last_finite)
  assert int(safe_state[0].info.result) == SolverResult.NONFINITE


# ----------------------------------------------------------------------------
# Full MGDA


def test_per_task_grads_equals_jacrev():
  params, (x, y) = make_problem()
  losses, grads = mgda_jax.per_task_grads(all_losses, params, x, y)
  chex.assert_trees_all_close(grads, jax.jacrev(all_losses)(params, x, y),
                              rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(losses, all_losses(params, x, y), rtol=1e-6)


@pytest.mark.parametrize('mask_kind', ['tree', 'callable'])
def test_mgda_shared_and_task_specific(mask_kind):
  params, (x, y) = make_problem(2)
  shared = shared_mask(params) if mask_kind == 'tree' else shared_mask
  tx = optax.chain(mgda_jax.mgda(K, shared=shared), optax.identity())
  grads = jax.jacrev(all_losses)(params, x, y)
  update, state = jax.jit(tx.update)(grads, tx.init(params), params)
  # Only the shared (encoder) gradients enter the Gram matrix.
  enc = np.concatenate([np.asarray(g).reshape(K, -1)
                        for g in jax.tree.leaves(grads['encoder'])], 1)
  alpha = reference_alpha(enc)
  np.testing.assert_allclose(state[0].weights, alpha, atol=1e-5)
  chex.assert_trees_all_close(update['encoder'],
                              combine(alpha, grads['encoder']), rtol=1e-4,
                              atol=1e-5)
  chex.assert_trees_all_close(
      update['heads'], jax.tree.map(lambda g: np.sum(g, 0), grads['heads']),
      rtol=1e-5, atol=1e-6)


def test_mgda_all_shared_by_default_and_aggregator_api():
  from optax.experimental import aggregating  # pylint: disable=g-import-not-at-top
  params, (x, y) = make_problem(3)
  grads = jax.jacrev(all_losses)(params, x, y)
  agg = mgda_jax.mgda(K)
  tx = aggregating.process(optax.identity(), agg, optax.identity())
  update, _ = tx.update(grads, tx.init(params), params)
  flat = np.concatenate([np.asarray(g).reshape(K, -1)
                         for g in jax.tree.leaves(grads)], 1)
  alpha = reference_alpha(flat)
  chex.assert_trees_all_close(update, combine(alpha, grads), rtol=1e-4,
                              atol=1e-5)


def test_mgda_under_inject_hyperparams_with_callable_mask():
  params, (x, y) = make_problem()
  tx = optax.inject_hyperparams(
      mgda_jax.mgda, static_args=('num_tasks', 'shared'))(
          num_tasks=K, shared=shared_mask, tol=1e-6)
  grads = jax.jacrev(all_losses)(params, x, y)
  _, state = jax.jit(tx.update)(grads, tx.init(params), params)
  assert bool(state.inner_state.info.converged)


def test_mgda_bad_input():
  params, (x, y) = make_problem()
  grads = jax.jacrev(all_losses)(params, x, y)
  nothing_shared = jax.tree.map(lambda _: False, params)
  tx = mgda_jax.mgda(K, shared=nothing_shared)
  with pytest.raises(ValueError, match='no parameter is marked shared'):
    tx.update(grads, tx.init(params), params)
  tx = mgda_jax.mgda(K, normalizer='loss')
  with pytest.raises(ValueError, match='needs the task losses'):
    tx.update(grads, tx.init(params), params)
  grads['heads']['b'] = grads['heads']['b'][:2]
  with pytest.raises(ValueError, match='disagree'):
    mgda_jax.mgda(K).update(grads, mgda_jax.mgda(K).init(params), params)
  with pytest.raises(ValueError, match='Unknown normalizer'):
    mgda_jax.mgda(K, normalizer='max')
  with pytest.raises(ValueError, match='structure'):
    mgda_jax.mgda(K, shared={'encoder': True}).update(
        jax.jacrev(all_losses)(params, x, y), mgda_jax.mgda(K).init(params),
        params)


def assert_one_pass_is_jacrev(params, x, y, heads_fn, **kwargs):
  """``per_task_z=K``: the losses, the per-task gradients at Z against
  ``jax.jacrev`` and the heads' gradients against the default path."""
  losses, ref = mgda_jax.representation_grads(encode, heads, params, x, y)
  losses2, fast = mgda_jax.representation_grads(
      encode, heads_fn, params, x, y, per_task_z=K, **kwargs)
  np.testing.assert_allclose(losses2, losses, rtol=1e-6)
  z = encode(params, x, y)
  dz = jax.jacrev(lambda z: heads(params, z, x, y))(z)
  np.testing.assert_allclose(fast.rep_grads, dz, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(fast.head_grads, ref.head_grads, rtol=1e-5,
                              atol=1e-6)
  return fast


def test_per_task_z_gives_the_same_gradients_in_one_backward_pass():
  params, (x, y) = make_problem(4)

  def heads_per_task(params, zs, x, y):  # zs: (K, B, 5); head t reads zs[t]
    del x
    p = params['heads']
    pred = jnp.einsum('kbd,kdo->kbo', zs, p['w']) + p['b'][:, None]
    return jnp.mean(jnp.sum((pred - y) ** 2, -1), -1)

  assert_one_pass_is_jacrev(params, x, y, heads_per_task)
  # (rep_grads and head_grads are all mgda_ub reads besides the pullback,
  # which both paths share, so the updates agree up to the solver's
  # tolerance.)
  with pytest.raises(ValueError, match='per_task_z=3 but heads_fn returned 2'):
    mgda_jax.representation_grads(
        encode, lambda p, zs, x, y: heads_per_task(p, zs, x, y)[:2], params,
        x, y, per_task_z=K)


def test_z_copies_tuple_gives_the_gradients_of_jacrev():
  """z_copies='tuple': head t reads copy t of a tuple; the per-task
  gradients at Z, the heads' gradients and any weighted combination are
  jax.jacrev's, and a stray z_copies is an error."""
  params, (x, y) = make_problem(4)

  def heads_loop(params, zs, x, y):  # zs: a tuple of K copies of Z
    del x
    p = params['heads']
    assert isinstance(zs, tuple) and len(zs) == K
    return jnp.stack([jnp.mean(jnp.sum(
        (zs[t] @ p['w'][t] + p['b'][t] - y[t]) ** 2, -1)) for t in range(K)])

  fast = assert_one_pass_is_jacrev(params, x, y, heads_loop,
                                   z_copies='tuple')
  w = jnp.array([0.2, 1.5, -0.7])
  want = jax.grad(lambda p: jnp.dot(w, all_losses(p, x, y)))(params)
  chex.assert_trees_all_close(fast.weighted_grads(w), want, rtol=1e-5,
                              atol=1e-6)
  with pytest.raises(ValueError, match="z_copies must be one of"):
    mgda_jax.representation_grads(encode, heads_loop, params, x, y,
                                  per_task_z=K, z_copies='list')
  with pytest.raises(ValueError, match='pass per_task_z=K too'):
    mgda_jax.representation_grads(encode, heads_loop, params, x, y,
                                  z_copies='tuple')
