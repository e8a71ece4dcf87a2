"""Tests of gram_matrix and the gradient normalisers against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from qp_reference import enumerate_qp

import mgda_jax


def _tree(rng, k):
  return {'w': rng.normal(size=(k, 3, 4)), 'b': rng.normal(size=(k, 4)),
          'nested': [rng.normal(size=(k,))]}


def _flat(tree, k):
  return np.concatenate([np.reshape(x, (k, -1))
                         for x in jax.tree.leaves(tree)], axis=1)


def test_gram_matrix_of_a_pytree():
  rng = np.random.default_rng(0)
  tree = _tree(rng, 5)
  flat = _flat(tree, 5)
  gram = mgda_jax.gram_matrix(jax.tree.map(jnp.asarray, tree))
  assert gram.shape == (5, 5) and gram.dtype == jnp.float32
  np.testing.assert_allclose(gram, flat @ flat.T, rtol=1e-5)


def test_gram_matrix_of_transposed_and_high_rank_leaves_under_jit():
  # Leaves are flattened to (K, n) before the product: a transposed leaf (a
  # non-trivial layout inside jit) and a rank-5 leaf must give numpy's Gram.
  rng = np.random.default_rng(1)
  a = rng.normal(size=(6, 4, 3, 5))
  b = rng.normal(size=(6, 2, 3, 2, 2))

  def grads(a, b):
    return {'a': jnp.transpose(a, (0, 3, 1, 2)), 'b': b}

  gram = jax.jit(lambda a, b: mgda_jax.gram_matrix(grads(a, b)))(
      jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
  flat = np.concatenate([np.transpose(a, (0, 3, 1, 2)).reshape(6, -1),
                         b.reshape(6, -1)], axis=1)
  np.testing.assert_allclose(gram, flat @ flat.T, rtol=1e-5)


def test_gram_matrix_accumulates_bfloat16_in_float32():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 4096))
  xb = jnp.asarray(x, jnp.bfloat16)
  gram = mgda_jax.gram_matrix(xb)
  assert gram.dtype == jnp.float32
  exact = np.asarray(xb, np.float64) @ np.asarray(xb, np.float64).T
  # float32 accumulation of bf16 products: far better than bf16 precision.
  np.testing.assert_allclose(gram, exact, rtol=1e-5)


def test_gram_matrix_float64_under_x64():
  with jax.enable_x64(True):
    x = np.random.default_rng(2).normal(size=(3, 7))
    gram = mgda_jax.gram_matrix(jnp.asarray(x))
    assert gram.dtype == jnp.float64
    np.testing.assert_allclose(gram, x @ x.T, rtol=1e-13)


@pytest.mark.parametrize('tree,match', [
    ({}, 'no array leaves'),
    ({'a': jnp.zeros((2, 3)), 'b': jnp.zeros((3, 3))}, 'disagree'),
    ({'a': jnp.zeros((0, 3))}, 'zero tasks'),
    ({'a': jnp.zeros(())}, 'scalar'),
    ({'a': jnp.zeros((2, 3), jnp.int32)}, 'floating'),
])
def test_gram_matrix_bad_input(tree, match):
  with pytest.raises(ValueError, match=match):
    jax.jit(mgda_jax.gram_matrix)(tree)


# ----------------------------------------------------------------------------
# Normalisers: compare with normalising the gradients themselves in numpy.


def _paper_normalizers(grads, losses, kind):
  norms = np.sqrt(np.sum(grads * grads, axis=1))
  return {'none': np.ones(len(grads)), 'l2': norms, 'loss': losses,
          'loss+': losses * norms}[kind]


@pytest.mark.parametrize('kind', ['none', 'l2', 'loss', 'loss+'])
def test_normalised_gram_equals_gram_of_normalised_gradients(kind):
  rng = np.random.default_rng(3)
  grads = rng.normal(size=(4, 9)) * rng.uniform(0.1, 10, size=(4, 1))
  losses = rng.uniform(0.5, 3.0, size=4)
  n_ref = _paper_normalizers(grads, losses, kind)
  g_ref = grads / n_ref[:, None]
  gram = mgda_jax.gram_matrix(jnp.asarray(grads, jnp.float32))
  n = mgda_jax.gradient_normalizers(gram, kind, jnp.asarray(losses))
  np.testing.assert_allclose(n, n_ref, rtol=1e-5)
  np.testing.assert_allclose(mgda_jax.normalize_gram(gram, n), g_ref @ g_ref.T,
                             rtol=1e-4)


def test_weights_from_normalised_problem_multiply_raw_gradients():
  # alpha solves the *normalised* problem (checked against brute force) and
  # the mgda update applies it to the raw gradients, as the paper's code does.
  rng = np.random.default_rng(4)
  grads = rng.normal(size=(3, 6)) * np.array([[0.1], [1.0], [10.0]])
  tx = mgda_jax.mgda(3, normalizer='l2')
  update, state = tx.update(jnp.asarray(grads, jnp.float32),
                            tx.init(jnp.zeros(6)))
  unit = grads / np.linalg.norm(grads, axis=1, keepdims=True)
  alpha_ref, _ = enumerate_qp(unit @ unit.T)
  np.testing.assert_allclose(state.weights, alpha_ref, atol=1e-5)
  np.testing.assert_allclose(update, alpha_ref @ grads, rtol=1e-4, atol=1e-6)


def test_zero_normalizer_is_replaced_by_one():
  grads = jnp.array([[0.0, 0.0], [3.0, 4.0]])
  gram = mgda_jax.gram_matrix(grads)
  np.testing.assert_allclose(mgda_jax.gradient_normalizers(gram, 'l2'),
                             [1.0, 5.0])
  np.testing.assert_allclose(
      mgda_jax.gradient_normalizers(gram, 'loss', jnp.array([0.0, -2.0])),
      [1.0, 1.0])


def test_loss_normalizer_needs_losses():
  gram = jnp.eye(2)
  with pytest.raises(ValueError, match='losses'):
    mgda_jax.gradient_normalizers(gram, 'loss')
  with pytest.raises(ValueError, match=r'shape \(2,\)'):
    mgda_jax.gradient_normalizers(gram, 'loss+', jnp.ones(3))
  with pytest.raises(ValueError, match='Unknown normalizer'):
    mgda_jax.gradient_normalizers(gram, 'l1')
