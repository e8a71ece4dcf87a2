"""Loss weightings (initial, prior, real-time, LBTW, DWA, DTP, RLW, FAMO).

References: ``jax.grad`` of the weighted objective each method defines, and
closed forms of its weights computed in numpy.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_loss_weighting import grad_of_weighted_loss
from test_transforms import all_losses
from test_transforms import encode
from test_transforms import heads
from test_transforms import K
from test_transforms import make_problem

import mgda_jax


def rep_grads(seed=0):
  params, (x, y) = make_problem(seed)
  losses, g = mgda_jax.representation_grads(encode, heads, params, x, y)
  return params, x, y, losses, g


def test_initial_loss_weighting_divides_by_the_first_losses():
  params, x, y, l0, g0 = rep_grads(1)
  tx = mgda_jax.initial_loss_weighting(K)
  step = jax.jit(lambda g, s, p, l: tx.update(g, s, p, losses=l))
  u, s = step(g0, tx.init(params), params, l0)
  chex.assert_trees_all_close(u, grad_of_weighted_loss(params, x, y, 1 / l0),
                              rtol=1e-5, atol=1e-6)
  # Later steps keep L(0), whatever the current losses.
  params2 = jax.tree.map(lambda p: p * 0.9, params)
  l1, g1 = mgda_jax.representation_grads(encode, heads, params2, x, y)
  u, s = step(g1, s, params2, l1)
  chex.assert_trees_all_close(u, grad_of_weighted_loss(params2, x, y, 1 / l0),
                              rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(s.inner.initial_losses, l0)


def test_realtime_loss_weighting_is_the_geometric_mean_gradient():
  params, x, y, losses, g = rep_grads(2)
  tx = mgda_jax.realtime_loss_weighting(K)
  u, _ = jax.jit(lambda g, s, p: tx.update(g, s, p, losses=losses))(
      g, tx.init(params), params)
  # K * grad of log of the geometric mean of the losses (GLS).
  ref = jax.grad(lambda p: K * jnp.mean(jnp.log(all_losses(p, x, y))))(params)
  chex.assert_trees_all_close(u, ref, rtol=1e-5, atol=1e-6)
  geo = jax.grad(lambda p: jnp.prod(all_losses(p, x, y)) ** (1 / K))(params)
  scale = K / jnp.prod(losses) ** (1 / K)
  chex.assert_trees_all_close(u, jax.tree.map(lambda a: a * scale, geo),
                              rtol=1e-4, atol=1e-5)


def test_priors_are_the_label_blind_losses():
  np.testing.assert_allclose(mgda_jax.classification_prior(jnp.ones(10)),
                             np.log(10), rtol=1e-6)
  freq = np.array([5.0, 3.0, 2.0, 0.0])
  p = freq / freq.sum()
  np.testing.assert_allclose(mgda_jax.classification_prior(freq),
                             -np.sum(p[:3] * np.log(p[:3])), rtol=1e-6)
  y = np.random.default_rng(0).normal(size=(100, 3)) * [1.0, 2.0, 3.0]
  np.testing.assert_allclose(mgda_jax.regression_prior(y),
                             np.var(y, axis=0).sum(), rtol=1e-5)
  params, x, yy, losses, g = rep_grads(3)
  priors = jnp.array([2.0, 0.5, 1.0])
  tx = mgda_jax.prior_loss_weighting(priors)
  u, _ = tx.update(g, tx.init(params), params)
  chex.assert_trees_all_close(u, grad_of_weighted_loss(params, x, yy,
                                                       1 / priors),
                              rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='prior'):
    mgda_jax.prior_loss_weighting(jnp.ones((2, 2)))


def test_lbtw_weights_are_loss_ratios_to_the_power_alpha():
  params, x, y, l0, g = rep_grads(4)
  tx = mgda_jax.lbtw(K, alpha=0.7)
  step = jax.jit(lambda g, s, l: tx.update(g, s, params, losses=l))
  _, s = step(g, tx.init(params), l0)
  np.testing.assert_allclose(s.weights, np.ones(K), rtol=1e-6)  # L = L(0)
  l1 = l0 * jnp.array([0.5, 0.9, 0.25])
  u, s = step(g, s, l1)
  np.testing.assert_allclose(s.weights, np.array([0.5, 0.9, 0.25]) ** 0.7,
                             rtol=1e-5)
  chex.assert_trees_all_close(
      u, grad_of_weighted_loss(params, x, y, s.weights), rtol=1e-5, atol=1e-6)


def test_dwa_with_equal_loss_ratios_gives_uniform_weights():
  params, _, _, l0, g = rep_grads(5)
  tx = mgda_jax.dwa(K, temperature=2.0)
  step = jax.jit(lambda s, l: tx.update(g, s, params, losses=l))
  s = tx.init(params)
  for scale in (1.0, 0.8, 0.64, 0.512):  # every task falls by 20% per epoch
    _, s = step(s, l0 * scale)
    np.testing.assert_allclose(s.weights, np.ones(K), rtol=1e-6)


def test_dwa_matches_its_formula_over_epochs():
  params, _, _, _, g = rep_grads(5)
  t, per = 2.0, 3
  tx = mgda_jax.dwa(K, temperature=t, steps_per_epoch=per)
  step = jax.jit(lambda s, l: tx.update(g, s, params, losses=l))
  rng = np.random.default_rng(0)
  s = tx.init(params)
  epochs = []
  for e in range(4):
    losses = rng.uniform(0.5, 2.0, size=(per, K))
    for i in range(per):
      _, s = step(s, jnp.asarray(losses[i], jnp.float32))
      if e < 2:
        np.testing.assert_allclose(s.weights, np.ones(K))
      else:
        r = epochs[-1] / epochs[-2]
        ref = K * np.exp(r / t) / np.exp(r / t).sum()
        np.testing.assert_allclose(s.weights, ref, rtol=1e-5)
    epochs.append(losses.mean(0))


def test_dtp_is_the_focal_weight_of_the_smoothed_kpi():
  params, x, y, losses, g = rep_grads(6)
  tx = mgda_jax.dtp(K, gamma=2.0, kpi_rate=0.3)
  step = jax.jit(lambda s, kp: tx.update(g, s, params, losses=losses,
                                         kpis=kp))
  s = tx.init(params)
  kbar = None
  for kp in ([0.2, 0.5, 0.9], [0.4, 0.5, 0.95], [0.5, 0.6, 0.99]):
    kp = np.asarray(kp)
    kbar = kp if kbar is None else 0.3 * kp + 0.7 * kbar
    u, s = step(s, jnp.asarray(kp, jnp.float32))
    np.testing.assert_allclose(s.weights,
                               -(1 - kbar) ** 2 * np.log(kbar), rtol=1e-5)
  w = np.asarray(s.weights)
  assert w[0] > w[1] > w[2]  # the hardest task gets the most weight
  chex.assert_trees_all_close(u, grad_of_weighted_loss(params, x, y, w),
                              rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='kpis'):
    tx.update(g, s, params, losses=losses)


def test_rlw_is_random_on_the_simplex_and_reproducible():
  params, _, _, _, g = rep_grads(7)
  tx = mgda_jax.rlw(K, key=3)
  step = jax.jit(lambda s: tx.update(g, s, params))
  s = tx.init(params)
  ws = []
  for _ in range(400):
    _, s = step(s)
    ws.append(np.asarray(s.weights))
  ws = np.array(ws)
  np.testing.assert_allclose(ws.sum(1), 1.0, rtol=1e-5)
  assert np.all(ws > 0) and np.std(ws[:, 0]) > 0.05
  np.testing.assert_allclose(ws.mean(0), np.full(K, 1 / K), atol=0.03)
  again = tx.init(params)
  _, again = step(again)
  np.testing.assert_array_equal(again.weights, ws[0])


def test_famo_update_and_logit_step_match_their_definitions():
  params, x, y, l0, g = rep_grads(8)
  lr, decay = 0.1, 0.01
  tx = mgda_jax.famo(K, learning_rate=lr, weight_decay=decay)
  step = jax.jit(lambda g, s, p, l: tx.update(g, s, p, losses=l))
  u, s = step(g, tx.init(params), params, l0)
  # Step 0: xi = 0, z uniform: the gradient of sum_t (z_t / c) log L_t.
  z = np.full(K, 1 / K)
  c = np.sum(z / np.asarray(l0, np.float64))
  ref = jax.grad(lambda p: jnp.sum(
      jnp.asarray(z / c, jnp.float32) * jnp.log(all_losses(p, x, y))))(params)
  chex.assert_trees_all_close(u, ref, rtol=1e-4, atol=1e-6)
  # Step 1: task 0's loss fell by half, the others not at all: xi takes one
  # Adam step on J_softmax^T delta (+ decay * xi, which is 0 here).
  l1 = l0 * jnp.array([0.5, 1.0, 1.0])
  _, s1 = step(g, s, params, l1)
  delta = np.log(np.asarray(l0, np.float64)) - np.log(np.asarray(l1,
                                                                 np.float64))
  grad_xi = (np.diag(z) - np.outer(z, z)) @ delta
  # Adam's first step is lr * sign(grad) (m_hat / sqrt(v_hat) = sign).
  np.testing.assert_allclose(s1.inner.logits, -lr * np.sign(grad_xi), rtol=1e-4)
  # FAMO moves weight away from the task that improved most.
  zs = jax.nn.softmax(s1.inner.logits)
  assert zs[0] < zs[1] and np.isclose(zs[1], zs[2])
  np.testing.assert_allclose(np.sum(s1.weights), 1.0, rtol=1e-6)
  # Step 2, with xi != 0: Adam on J^T delta + decay * xi, in numpy.
  l2 = l1 * jnp.array([1.0, 0.5, 0.9])
  _, s2 = step(g, s1, params, l2)
  lg = lambda l: np.log(np.asarray(l, np.float64) + 1e-8)
  g1 = grad_xi
  xi1 = -lr * g1 / (np.abs(g1) + 1e-8)
  z1 = np.exp(xi1) / np.exp(xi1).sum()
  g2 = (np.diag(z1) - np.outer(z1, z1)) @ (lg(l1) - lg(l2)) + decay * xi1
  m = 0.9 * (0.1 * g1) + 0.1 * g2
  v = 0.999 * (0.001 * g1 ** 2) + 0.001 * g2 ** 2
  xi2 = xi1 - lr * (m / (1 - 0.9 ** 2)) / (
      np.sqrt(v / (1 - 0.999 ** 2)) + 1e-8)
  np.testing.assert_allclose(s2.inner.logits, xi2, rtol=1e-4, atol=1e-6)
  z2 = np.exp(xi2) / np.exp(xi2).sum()
  w2 = (z2 / np.asarray(l2, np.float64)) / np.sum(z2 / np.asarray(l2,
                                                                  np.float64))
  np.testing.assert_allclose(s2.weights, w2, rtol=1e-4)


LOSS_METHODS = {
    'initial_loss_weighting': lambda: mgda_jax.initial_loss_weighting(K),
    'realtime_loss_weighting': lambda: mgda_jax.realtime_loss_weighting(K),
    'lbtw': lambda: mgda_jax.lbtw(K),
    'dwa': lambda: mgda_jax.dwa(K),
    'dtp': lambda: mgda_jax.dtp(K),
    'rlw': lambda: mgda_jax.rlw(K),
    'famo': lambda: mgda_jax.famo(K),
}


@pytest.mark.parametrize('dtype', ['float32', 'float64'])
@pytest.mark.parametrize('name', sorted(LOSS_METHODS))
def test_loss_methods_per_task_input_dtype_and_degenerate_losses(name, dtype):
  with jax.enable_x64(dtype == 'float64'):
    g = {'w': jnp.asarray([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0]], dtype)}
    params = {'w': jnp.zeros(2, dtype)}
    tx = LOSS_METHODS[name]()
    step = jax.jit(lambda g, s, l: tx.update(g, s, params, losses=l,
                                             kpis=jnp.array([0.0, 1.0, 0.5])))
    s = tx.init(params)
    # A zero loss and a zero gradient: weights stay finite, nothing is NaN.
    for losses in ([1.0, 0.0, 2.0], [0.5, 0.0, 2.0], [0.5, 0.0, 2.0]):
      u, s = step(g, s, jnp.asarray(losses, dtype))
      assert u['w'].dtype == jnp.dtype(dtype)
      assert np.all(np.isfinite(u['w'])), (name, u)
      assert np.all(np.isfinite(s.weights)), (name, s)


@pytest.mark.parametrize('name,hyper', [
    ('lbtw', {'alpha': 0.3}), ('dwa', {'temperature': 1.5}),
    ('dtp', {'gamma': 1.5}), ('famo', {'learning_rate': 0.05}),
])
def test_loss_methods_under_inject_hyperparams(name, hyper):
  params, _, _, losses, g = rep_grads(9)
  factory = mgda_jax.__dict__[name]
  tx = optax.inject_hyperparams(factory, static_args=('num_tasks',))(
      num_tasks=K, **hyper)
  plain = factory(K, **hyper)
  kp = jnp.array([0.3, 0.6, 0.9])
  run = jax.jit(lambda t, s, l: t.update(g, s, params, losses=l, kpis=kp),
                static_argnums=0)
  s, s_ref = tx.init(params), plain.init(params)
  for l in (losses, losses * 0.7, losses * jnp.array([0.5, 0.6, 0.7]),
            losses * 0.3):
    u, s = run(tx, s, l)
    u_ref, s_ref = run(plain, s_ref, l)
  chex.assert_trees_all_close(u, u_ref, rtol=1e-5, atol=1e-6)


def test_loss_methods_need_losses():
  params, _, _, _, g = rep_grads(0)
  for name in ('initial_loss_weighting', 'realtime_loss_weighting', 'lbtw',
               'dwa', 'famo'):
    tx = LOSS_METHODS[name]()
    with pytest.raises(ValueError, match='losses'):
      tx.update(g, tx.init(params), params)
