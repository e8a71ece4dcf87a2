"""Tests of the MultiMNIST network (Flax NNX) used by experiments/benchmarks."""

import functools

from flax import nnx
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.multimnist import models


def test_multilenet_matches_the_paper_architecture():
  model = models.MultiLeNet(('left', 'right'), 10, rngs=nnx.Rngs(0))
  _, params = nnx.split(model)
  sizes = jax.tree.map(lambda p: p.size, params)
  enc = sizes['encoder']
  # conv 1->10 5x5, conv 10->20 5x5, dense 320->50 (weights + biases).
  assert enc['conv1']['kernel'] + enc['conv1']['bias'] == 5 * 5 * 10 + 10
  assert enc['conv2']['kernel'] + enc['conv2']['bias'] == 5 * 5 * 10 * 20 + 20
  assert enc['fc']['kernel'] + enc['fc']['bias'] == 320 * 50 + 50
  # Two heads: dense 50->50, dense 50->10.
  assert sum(jax.tree.leaves(sizes['heads'])) == 2 * (50 * 50 + 50 + 50 * 10
                                                       + 10)
  logits = model(jnp.zeros((3, 28, 28, 1)))
  assert logits.shape == (2, 3, 10)


def test_reshape_pooling_equals_reduce_window_with_gradients():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  np.testing.assert_array_equal(models.max_pool_2x2(x),
                                models.max_pool_2x2_reduce_window(x))
  g1 = jax.grad(lambda x: jnp.sum(models.max_pool_2x2(x) ** 2))(x)
  g2 = jax.grad(lambda x: jnp.sum(models.max_pool_2x2_reduce_window(x) ** 2))(
      x)
  np.testing.assert_allclose(g1, g2, rtol=1e-6)


def _has_conv(fn, *args):
  return 'conv_general_dilated' in str(jax.make_jaxpr(fn)(*args))


def test_conv_as_matmul_equals_the_convolution_with_gradients():
  """Values and both gradients against lax.conv_general_dilated, to float32
  summation noise, for 1 and 3 input channels."""
  for cin, size in ((1, 28), (3, 9)):
    kx, kw = jax.random.split(jax.random.key(cin))
    x = jax.random.normal(kx, (4, size, size, cin))
    w = jax.random.normal(kw, (5, 5, cin, 6)) * 0.2
    ref = nnx.Conv(cin, 6, (5, 5), padding='VALID', rngs=nnx.Rngs(0))
    ours = nnx.Conv(cin, 6, (5, 5), padding='VALID', rngs=nnx.Rngs(0),
                    conv_general_dilated=models.conv_as_matmul)
    ref.kernel[...] = w
    ours.kernel[...] = w
    assert not _has_conv(lambda x: ours(x), x)  # the product, not a conv
    loss = lambda m, x: jnp.sum(jnp.sin(m(x)))
    np.testing.assert_allclose(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    g_ours = nnx.grad(loss, argnums=(0, 1))(ours, x)
    g_ref = nnx.grad(loss, argnums=(0, 1))(ref, x)
    np.testing.assert_allclose(g_ours[0].kernel[...], g_ref[0].kernel[...],
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(g_ours[1], g_ref[1], rtol=1e-4, atol=1e-5)


def _guard_case(case, cout):
  """A (2, 9, 9, 3) input, a 3x3 kernel and conv_general_dilated's arguments
  with one of them changed by ``case`` (``w_cin``: the kernel's input
  channels, for grouped convolutions; NCHW/OIHW cases get transposed
  arrays)."""
  case = dict(case)
  cin = case.pop('w_cin', 3)
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
  w = jax.random.normal(jax.random.key(1), (3, 3, cin, cout))
  kwargs = {'window_strides': (1, 1), 'padding': 'VALID',
            'dimension_numbers': jax.lax.conv_dimension_numbers(
                x.shape, w.shape, ('NHWC', 'HWIO', 'NHWC')), **case}
  if case.get('dimension_numbers') == ('NCHW', 'OIHW', 'NCHW'):
    x, w = x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1)
  return x, w, kwargs.pop('window_strides'), kwargs.pop('padding'), kwargs


@pytest.mark.parametrize('case, product', [
    ({}, True),
    ({'padding': ((0, 0), (0, 0))}, True),
    ({'dimension_numbers': ('NHWC', 'HWIO', 'NHWC')}, True),
    ({'window_strides': (2, 1)}, False),
    ({'padding': ((1, 0), (0, 1))}, False),
    ({'padding': 'SAME'}, False),
    ({'lhs_dilation': (2, 2), 'padding': ((0, 0), (0, 0))}, False),
    ({'rhs_dilation': (1, 2)}, False),
    ({'preferred_element_type': jnp.float32}, False),
    ({'dimension_numbers': ('NCHW', 'OIHW', 'NCHW')}, False),
])
def test_conv_as_matmul_takes_the_product_only_where_it_applies(case,
                                                                product):
  """One condition per case; either way the convolution's values."""
  x, w, strides, padding, kwargs = _guard_case(case, cout=4)
  ours = lambda x, w: models.conv_as_matmul(x, w, strides, padding, **kwargs)
  ref = jax.lax.conv_general_dilated(x, w, strides, padding, **kwargs)
  assert _has_conv(ours, x, w) != product
  np.testing.assert_allclose(ours(x, w), ref, rtol=1e-5, atol=1e-5)


def _conv_specs(jaxpr):
  """(lhs, rhs, out) specs of every convolution in a jaxpr, nested ones
  (custom VJPs, scans) included."""
  specs = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'conv_general_dilated':
      dn = eqn.params['dimension_numbers']
      specs.append((dn.lhs_spec, dn.rhs_spec, dn.out_spec))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      specs += _conv_specs(sub)
  return specs


@pytest.mark.parametrize('cin, kernel, size', [(10, (5, 5), (12, 12)),
                                                (3, (3, 5), (7, 9)),
                                                (4, (1, 1), (5, 5))])
def test_conv_nhwc_grads_equals_the_convolution_with_gradients(cin, kernel,
                                                               size):
  """Values, both gradients (against jax's own transposes of
  lax.conv_general_dilated), and every convolution of the gradient program
  in the NHWC/HWIO layout, also inside a lax.scan."""
  kx, kw = jax.random.split(jax.random.key(cin))
  x = jax.random.normal(kx, (4, *size, cin))
  w = jax.random.normal(kw, (*kernel, cin, 6)) * 0.2
  dn = jax.lax.conv_dimension_numbers(x.shape, w.shape,
                                      ('NHWC', 'HWIO', 'NHWC'))

  def loss(conv, x, w):
    return jnp.sum(jnp.sin(conv(x, w, (1, 1), 'VALID',
                                dimension_numbers=dn)))
  ours = functools.partial(loss, models.conv_nhwc_grads)
  ref = functools.partial(loss, jax.lax.conv_general_dilated)
  np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-5)
  g_ours = jax.grad(ours, argnums=(0, 1))(x, w)
  g_ref = jax.grad(ref, argnums=(0, 1))(x, w)
  for a, b in zip(g_ours, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  nhwc = (dn.lhs_spec, dn.rhs_spec, dn.out_spec)

  def scanned(x, w):
    def body(w, _):
      return w - 0.1 * jax.grad(ours, argnums=1)(x, w), None
    return jax.lax.scan(body, w, None, length=2)[0]
  specs = _conv_specs(jax.make_jaxpr(scanned)(x, w).jaxpr)
  assert len(specs) == 3 and all(s == nhwc for s in specs), specs


@pytest.mark.parametrize('case, custom', [
    ({}, True),
    ({'padding': ((0, 0), (0, 0))}, True),
    ({'dimension_numbers': ('NHWC', 'HWIO', 'NHWC')}, True),
    ({'precision': jax.lax.Precision.HIGHEST}, True),
    ({'lhs_dilation': (1, 1), 'padding': [[0, 0], [0, 0]]}, True),
    ({'window_strides': (2, 1)}, False),
    ({'padding': 'SAME'}, False),
    ({'padding': ((1, 0), (0, 1))}, False),
    ({'lhs_dilation': (2, 2), 'padding': ((0, 0), (0, 0))}, False),
    ({'rhs_dilation': (1, 2)}, False),
    ({'preferred_element_type': jnp.float32}, False),
    ({'feature_group_count': 3, 'w_cin': 1}, False),
    ({'dimension_numbers': ('NCHW', 'OIHW', 'NCHW')}, False),
])
def test_conv_nhwc_grads_applies_only_to_plain_valid_nhwc(case, custom):
  """One condition per case; either way the convolution's values and
  gradients."""
  x, w, strides, padding, kwargs = _guard_case(case, cout=6)
  ours = lambda x, w: jnp.sum(jnp.sin(models.conv_nhwc_grads(
      x, w, strides, padding, **kwargs)))
  ref = lambda x, w: jnp.sum(jnp.sin(jax.lax.conv_general_dilated(
      x, w, strides, padding, **kwargs)))
  assert ('custom_vjp' in str(jax.make_jaxpr(ours)(x, w))) == custom
  np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-5)
  for a, b in zip(jax.grad(ours, argnums=(0, 1))(x, w),
                  jax.grad(ref, argnums=(0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_multilenet_is_unchanged_by_its_conv_formulations():
  """The model's loss and gradients equal those with both layers as
  lax.conv_general_dilated (the formulation before conv_as_matmul and
  conv_nhwc_grads), at the same parameters."""
  model = models.MultiLeNet(('left', 'right'), 10, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  plain = nnx.merge(graphdef, params)
  assert model.encoder.conv1.conv_general_dilated is models.conv_as_matmul
  assert model.encoder.conv2.conv_general_dilated is models.conv_nhwc_grads
  plain.encoder.conv1.conv_general_dilated = jax.lax.conv_general_dilated
  plain.encoder.conv2.conv_general_dilated = jax.lax.conv_general_dilated
  x = jax.random.uniform(jax.random.key(1), (16, 28, 28, 1))
  labels = jax.random.randint(jax.random.key(2), (16, 2), 0, 10)

  def loss(m):
    return jnp.sum(models.nll_per_task(m(x), labels))
  assert _has_conv(lambda: plain(x))
  np.testing.assert_allclose(loss(model), loss(plain), rtol=1e-6)
  ga, gb = nnx.grad(loss)(model), nnx.grad(loss)(plain)
  for a, b in zip(jax.tree.leaves(nnx.state(ga)), jax.tree.leaves(
      nnx.state(gb))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_stacked_heads_per_task_input_equals_shared_input():
  heads = models.StackedHeads(4, 3, rngs=nnx.Rngs(1))
  z = jax.random.normal(jax.random.key(2), (5, 50))
  key = jax.random.key(3)
  shared = heads(z, key=key, train=True)
  per_task = heads(jnp.broadcast_to(z, (4, 5, 50)), key=key, train=True)
  np.testing.assert_allclose(per_task, shared, rtol=1e-5, atol=1e-6)
  # Head t is the dense net of its own parameters.
  h = jax.nn.relu(z @ heads.w1[...][2] + heads.b1[...][2])
  np.testing.assert_allclose(heads(z)[2], h @ heads.w2[...][2]
                             + heads.b2[...][2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('train, width, hidden', [(False, 50, 50),
                                                   (True, 50, 50),
                                                   (True, 6, 11)])
def test_fused_copies_equal_the_per_copy_heads(train, width, hidden):
  # dense_on_copies against the batched per-copy product: the values, the
  # gradient w.r.t. every copy (task t's own) and the heads' parameter
  # gradients, for identical copies of Z under the same dropout key.
  fused = models.StackedHeads(5, 3, rngs=nnx.Rngs(1), fuse_copies=True,
                              width=width, hidden=hidden)
  plain = models.StackedHeads(5, 3, rngs=nnx.Rngs(1), width=width,
                              hidden=hidden)
  z = jax.random.normal(jax.random.key(2), (7, width))
  zs = jnp.broadcast_to(z, (5, 7, width))
  key = jax.random.key(3)
  w = jax.random.normal(jax.random.key(4), (5, 7, 3))

  def out(m, zs):
    return jnp.sum(w * m(zs, key=key, train=train))
  for m in (fused, plain):
    assert m(zs, key=key, train=train).shape == (5, 7, 3)
  np.testing.assert_allclose(fused(zs, key=key, train=train),
                             plain(zs, key=key, train=train),
                             rtol=1e-5, atol=1e-6)
  gf = nnx.grad(out, argnums=(0, 1))(fused, zs)
  gp = nnx.grad(out, argnums=(0, 1))(plain, zs)
  np.testing.assert_allclose(gf[1], gp[1], rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(nnx.state(gf[0])),
                  jax.tree.leaves(nnx.state(gp[0]))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Copy t's gradient is task t's alone (finite check against jacrev of the
  # shared-input heads restricted to task t's output).
  t = 3
  ref = jax.grad(lambda z: jnp.sum(w[t] * plain(z, key=key,
                                                train=train)[t]))(z)
  np.testing.assert_allclose(gf[1][t], ref, rtol=1e-5, atol=1e-6)


def test_nll_per_task():
  logits = jax.random.normal(jax.random.key(4), (2, 6, 10))
  labels = jnp.array([[1, 2], [3, 4], [5, 6], [7, 8], [9, 0], [1, 1]])
  logp = np.asarray(jax.nn.log_softmax(logits, -1))
  expected = [-np.mean([logp[t, b, labels[b, t]] for b in range(6)])
              for t in range(2)]
  np.testing.assert_allclose(models.nll_per_task(logits, labels), expected,
                             rtol=1e-6)


def test_dropout_is_channelwise_in_the_encoder():
  enc = models.Encoder(rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(5), (2, 12, 12, 10))
  out = enc.dropout(x, deterministic=False, rngs=jax.random.key(6))
  zero = np.asarray(out == 0)
  # A dropped channel is zero at every spatial position.
  per_channel = zero.reshape(2, -1, 10)
  assert np.all(per_channel.all(1) == per_channel.any(1))
  assert 0 < per_channel.all(1).mean() < 1
