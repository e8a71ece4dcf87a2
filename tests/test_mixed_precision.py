"""Mixed precision: bfloat16 forward and backward, float32 Gram and solve.

The policy (README, "Mixed precision"): activations and their gradients may
be bfloat16; ``gram_matrix`` accumulates them in float32 at the highest
matmul precision, the min-norm solve runs in float32, and the weights are
applied in a float32 accumulation. The reference is the same step computed
entirely in float32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from qp_reference import enumerate_qp

import mgda_jax

K, B, D_IN, D_Z = 3, 64, 16, 32


def problem(seed):
  rng = np.random.default_rng(seed)
  params = {'enc': jnp.asarray(rng.normal(size=(D_IN, D_Z)) / 4, jnp.float32),
            'heads': jnp.asarray(rng.normal(size=(K, D_Z, 4)) / 6,
                                 jnp.float32)}
  x = jnp.asarray(rng.normal(size=(B, D_IN)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(K, B, 4)), jnp.float32)
  return params, x, y


def make_fns(dtype):
  """Encoder and heads computing in ``dtype`` (parameters stay float32)."""

  def encode(params, x, y):
    del y
    return jnp.tanh(x.astype(dtype) @ params['enc'].astype(dtype))

  def heads(params, z, x, y):
    del x
    pred = jnp.einsum('bd,kdo->kbo', z, params['heads'].astype(dtype))
    err = (pred - y.astype(dtype)).astype(jnp.float32)  # losses in float32
    return jnp.mean(jnp.sum(err ** 2, -1), -1)

  return encode, heads


def alpha_and_update(params, x, y, dtype):
  encode, heads = make_fns(dtype)
  losses, g = mgda_jax.representation_grads(encode, heads, params, x, y)
  tx = mgda_jax.mgda_ub(K)
  update, state = jax.jit(tx.update)(g, tx.init(params), params,
                                     losses=losses)
  return g, state, update


@pytest.mark.parametrize('seed', range(8))
def test_bf16_activations_give_float32_quality_alpha(seed):
  params, x, y = problem(seed)
  g16, info16, upd16 = alpha_and_update(params, x, y, jnp.bfloat16)
  g32, info32, upd32 = alpha_and_update(params, x, y, jnp.float32)
  assert g16.rep_grads.dtype == jnp.bfloat16
  assert info16.weights.dtype == jnp.float32 and bool(info16.info.converged)
  # Stated tolerance: alpha within 0.03 (absolute) of the float32 alpha ...
  np.testing.assert_allclose(info16.weights, info32.weights, atol=0.03)
  # ... and, judged on the exact float32 problem, within 1% of its optimum.
  j = np.asarray(g32.rep_grads, np.float64).reshape(K, -1)
  gram = j @ j.T
  _, best = enumerate_qp(gram)
  a16 = np.asarray(info16.weights, np.float64)
  assert a16 @ gram @ a16 <= best * 1.01 + 1e-12 * np.max(np.diag(gram))
  # The update is bfloat16-accurate (the encoder's pullback runs in bf16).
  for a, b in zip(jax.tree.leaves(upd16), jax.tree.leaves(upd32)):
    assert a.dtype == jnp.float32
    np.testing.assert_allclose(a, b, rtol=0.1,
                               atol=0.05 * float(np.max(np.abs(b))))


def test_gram_of_bf16_gradients_accumulates_in_float32():
  rng = np.random.default_rng(0)
  g = rng.normal(size=(K, 4096)).astype(np.float32)
  g16 = jnp.asarray(g, jnp.bfloat16)
  exact = np.asarray(g16, np.float64) @ np.asarray(g16, np.float64).T
  gram = mgda_jax.gram_matrix(g16)
  assert gram.dtype == jnp.float32
  # Exact products of the bf16 inputs, summed in float32: ~1e-6 relative
  # (a bf16 accumulation would be off by ~1e-2).
  np.testing.assert_allclose(gram, exact, rtol=1e-5,
                             atol=1e-5 * np.max(np.abs(exact)))
