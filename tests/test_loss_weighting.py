"""Tests of the loss-weighting transforms against jax.grad references."""

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

import mgda_jax


def grad_of_weighted_loss(params, x, y, w):
  """Independent reference: jax.grad of sum_t w_t L_t."""
  return jax.grad(lambda p: jnp.sum(w * all_losses(p, x, y)))(params)


@pytest.mark.parametrize('kind', ['representation', 'per_task'])
def test_fixed_weighting_is_the_gradient_of_the_weighted_loss(kind):
  params, (x, y) = make_problem(5)
  w = jnp.array([0.5, 2.0, 1.0])
  tx = mgda_jax.fixed_weighting(w)
  if kind == 'representation':
    _, grads = mgda_jax.representation_grads(encode, heads, params, x, y)
  else:
    _, grads = mgda_jax.per_task_grads(all_losses, params, x, y)
  update, state = jax.jit(tx.update)(grads, tx.init(params), params)
  chex.assert_trees_all_close(update, grad_of_weighted_loss(params, x, y, w),
                              rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.weights, w)


def test_uniform_weighting_with_per_task_z():
  params, (x, y) = make_problem(6)

  def heads_per_task(params, zs, x, y):
    p = params['heads']
    pred = jnp.einsum('kbd,kdo->kbo', zs, p['w']) + p['b'][:, None]
    return jnp.mean(jnp.sum((pred - y) ** 2, -1), -1)

  _, grads = mgda_jax.representation_grads(encode, heads_per_task, params, x,
                                           y, per_task_z=K)
  tx = mgda_jax.uniform_weighting(K)
  update, _ = tx.update(grads, tx.init(params), params)
  chex.assert_trees_all_close(
      update, grad_of_weighted_loss(params, x, y, jnp.ones(K)), rtol=1e-5,
      atol=1e-6)


def test_uncertainty_weighting_matches_its_objective():
  params, (x, y) = make_problem(7)
  lr, mom = 0.1, 0.9
  tx = mgda_jax.uncertainty_weighting(K, learning_rate=lr, momentum=mom,
                                      init_log_var=0.3)
  state = tx.init(params)
  s = np.full(K, 0.3)
  buf = np.zeros(K)

  def objective(s, losses):  # Kendall et al.: sum exp(-s) L + s / 2
    return jnp.sum(jnp.exp(-s) * losses + 0.5 * s)

  for step in range(3):
    losses, grads = mgda_jax.representation_grads(encode, heads, params, x, y)
    update, state = tx.update(grads, state, params, losses=losses)
    w = np.exp(-s)
    chex.assert_trees_all_close(update,
                                grad_of_weighted_loss(params, x, y, w),
                                rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.weights, w, rtol=1e-6)
    # s takes one SGD-momentum step on its own objective.
    g = np.asarray(jax.grad(objective)(jnp.asarray(s, jnp.float32), losses))
    buf = mom * buf + g
    s = s - lr * buf
    np.testing.assert_allclose(state.inner.log_vars, s, rtol=1e-5, atol=1e-6)
    params = optax.apply_updates(params, jax.tree.map(lambda u: -0.01 * u,
                                                      update))
    del step


def test_gradnorm_weight_update_matches_its_objective():
  params, (x, y) = make_problem(8)
  alpha, lr = 1.5, 0.05
  tx = mgda_jax.gradnorm(K, alpha=alpha, learning_rate=lr)
  state = tx.init(params)
  l0 = None
  w = np.ones(K)
  for _ in range(3):
    losses, grads = mgda_jax.representation_grads(encode, heads, params, x, y)
    update, state = tx.update(grads, state, params, losses=losses)
    chex.assert_trees_all_close(update,
                                grad_of_weighted_loss(params, x, y, w),
                                rtol=1e-5, atol=1e-6)
    # Reference: gradient of L_grad w.r.t. w, target held constant.
    z = encode(params, x, y)
    dz = jax.jacrev(lambda z: heads(params, z, x, y))(z).reshape(K, -1)
    norms = jnp.linalg.norm(dz, axis=1)
    l0 = np.asarray(losses) if l0 is None else l0
    ratio = np.asarray(losses) / l0
    r = ratio / ratio.mean()

    def l_grad(w, target):
      return jnp.sum(jnp.abs(w * norms - target))

    target = jnp.mean(w * norms) * r ** alpha
    w = np.asarray(w - lr * jax.grad(l_grad)(jnp.asarray(w, jnp.float32),
                                             target))
    w = np.maximum(w, 1e-3)
    w = K * w / w.sum()
    np.testing.assert_allclose(state.inner.weights, w, rtol=1e-5)
    np.testing.assert_allclose(state.inner.initial_losses, l0, rtol=1e-6)
    params = optax.apply_updates(params, jax.tree.map(lambda u: -0.05 * u,
                                                      update))


def test_gradnorm_keeps_weights_when_tasks_are_balanced():
  # Identical tasks: equal norms and equal training rates, so L_grad's
  # subgradient is 0 at w = 1 and the weights stay uniform.
  g = jnp.ones((3, 4))
  tx = mgda_jax.gradnorm(3)
  state = tx.init(None)
  for _ in range(2):
    _, state = tx.update(g, state, losses=jnp.array([2.0, 2.0, 2.0]))
  np.testing.assert_allclose(state.inner.weights, np.ones(3))


def test_loss_weightings_under_inject_hyperparams_and_jit():
  params, (x, y) = make_problem()
  losses, grads = mgda_jax.representation_grads(encode, heads, params, x, y)
  for factory, kw in ((mgda_jax.uncertainty_weighting, dict(learning_rate=0.1)),
                      (mgda_jax.gradnorm, dict(alpha=0.5))):
    tx = optax.inject_hyperparams(factory, static_args=('num_tasks',))(
        num_tasks=K, **kw)
    state = tx.init(params)
    _, state = jax.jit(tx.update)(grads, state, params, losses=losses)
    assert int(state.inner_state.count) == 1


def test_loss_weightings_bad_input():
  params, (x, y) = make_problem()
  _, grads = mgda_jax.representation_grads(encode, heads, params, x, y)
  for tx in (mgda_jax.uncertainty_weighting(K), mgda_jax.gradnorm(K)):
    with pytest.raises(ValueError, match='needs the task losses'):
      tx.update(grads, tx.init(params), params)
    with pytest.raises(ValueError, match=r'shape \(3,\)'):
      tx.update(grads, tx.init(params), params, losses=jnp.ones(2))
  with pytest.raises(ValueError, match='num_tasks=4'):
    tx = mgda_jax.uniform_weighting(4)
    tx.update(grads, tx.init(params), params)
