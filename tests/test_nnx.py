"""Flax NNX end to end: an encoder with BatchNorm and Dropout, MGDA-UB, and
``nnx.Optimizer`` (the README's NNX recipe, checked against references)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from qp_reference import enumerate_qp

import mgda_jax

nnx = pytest.importorskip('flax.nnx')

K = 2


class Encoder(nnx.Module):

  def __init__(self, rngs):
    self.lin = nnx.Linear(4, 8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.drop = nnx.Dropout(0.3, rngs=rngs)

  def __call__(self, x):
    return self.drop(jax.nn.relu(self.bn(self.lin(x))))


class Model(nnx.Module):

  def __init__(self, rngs):
    self.encoder = Encoder(rngs)
    self.heads = nnx.List([nnx.Linear(8, 1, rngs=rngs) for _ in range(K)])


def make(graphdef):
  """The README's two functions: the encoder returns (Z, updated state)."""

  def encoder_fn(params, rest, x, y):
    del y
    m = nnx.merge(graphdef, params, rest)
    z = m.encoder(x)
    return z, nnx.state(m, nnx.Not(nnx.Param))

  def heads_fn(params, z, rest, x, y):
    del x
    m = nnx.merge(graphdef, params, rest)
    return jnp.stack([jnp.mean((m.heads[t](z)[:, 0] - y[:, t]) ** 2)
                      for t in range(K)])

  return encoder_fn, heads_fn


def data(seed):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return jax.random.normal(k1, (32, 4)), jax.random.normal(k2, (32, K))


def test_nnx_batchnorm_dropout_mgda_ub_with_nnx_optimizer():
  model = Model(nnx.Rngs(0, dropout=1))
  method = mgda_jax.mgda_ub(K)
  lr = 0.1
  optimizer = nnx.Optimizer(model, optax.sgd(lr), wrt=nnx.Param)
  graphdef, params0, _ = nnx.split(model, nnx.Param, ...)
  encoder_fn, heads_fn = make(graphdef)
  mstate = method.init(params0)

  @nnx.jit
  def train_step(model, optimizer, mstate, x, y):
    _, params, rest = nnx.split(model, nnx.Param, ...)
    rest = nnx.as_pure(rest)  # plain arrays: BatchNorm updates them inside
    losses, grads, new_rest = mgda_jax.representation_grads(
        encoder_fn, heads_fn, params, rest, x, y, encoder_has_aux=True)
    direction, mstate = method.update(grads, mstate, params, losses=losses)
    nnx.update(model, new_rest)         # batch stats, RNG counts: once
    optimizer.update(model, direction)  # the method's direction, then SGD
    return mstate, losses, direction

  for step in range(3):
    x, y = data(step)
    before = nnx.clone(model)
    mstate, losses, direction = train_step(model, optimizer, mstate, x, y)
    # References, from the model as it was, with the same dropout mask.
    ref = nnx.clone(before)
    z_ref = ref.encoder(x)              # one forward: stats update once
    np.testing.assert_allclose(model.encoder.bn.mean[...],
                               ref.encoder.bn.mean[...], rtol=1e-6)
    np.testing.assert_allclose(model.encoder.bn.var[...],
                               ref.encoder.bn.var[...], rtol=1e-6)
    _, p_b, rest_b = nnx.split(before, nnx.Param, ...)
    rest_b = nnx.as_pure(rest_b)

    def z_of(p):
      return encoder_fn(p, rest_b, x, y)[0]

    np.testing.assert_allclose(z_of(p_b), z_ref, rtol=1e-5, atol=1e-6)
    dz = jax.jacrev(lambda z: heads_fn(p_b, z, rest_b, x, y))(z_ref)
    j = np.asarray(dz, np.float64).reshape(K, -1)
    alpha_ref, f_ref = enumerate_qp(j @ j.T)
    alpha = np.asarray(mstate.weights, np.float64)
    assert alpha @ (j @ j.T) @ alpha <= (1 + 1e-4) * f_ref + 1e-12
    _, enc_vjp = jax.vjp(z_of, p_b)
    enc = enc_vjp(jnp.tensordot(jnp.asarray(alpha, jnp.float32), dz, 1))[0]
    heads_grad = jax.grad(lambda p: jnp.sum(heads_fn(p, z_ref, rest_b, x,
                                                     y)))(p_b)
    expect = jax.tree.map(jnp.add, enc, heads_grad)
    for a, b in zip(jax.tree.leaves(direction), jax.tree.leaves(expect)):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
    # nnx.Optimizer applied SGD to the method's direction.
    _, p_after, _ = nnx.split(model, nnx.Param, ...)
    for a, b, d in zip(jax.tree.leaves(p_after), jax.tree.leaves(p_b),
                       jax.tree.leaves(direction)):
      np.testing.assert_allclose(a, b - lr * d, rtol=1e-5, atol=1e-6)
  # Dropout drew a new mask every step (its RNG count advanced once each).
  assert int(model.encoder.drop.rngs.count[...]) == 3
  assert int(mstate.count) == 3


def test_methods_init_on_a_whole_nnx_state():
  """PRNG keys and integer counters in the state are ignored by init."""
  model = Model(nnx.Rngs(0, dropout=1))
  state = nnx.state(model)
  for name in ('mgda_ub', 'upgrad', 'famo'):
    s = mgda_jax.make_method(name, K).init(state)
    assert s.weights.dtype == jnp.float32
