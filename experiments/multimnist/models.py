"""MultiLeNet, the MultiMNIST network of Sener & Koltun (2018), in Flax NNX.

Encoder: conv 1->10 (5x5), max-pool 2, ReLU; conv 10->20 (5x5), channel
dropout 0.5, max-pool 2, ReLU; flatten to 320; dense 320->50, ReLU.
Each head: dense 50->50, ReLU, dropout 0.5, dense 50->C; log-softmax, NLL.

The K heads are one module with stacked parameters, applied with one einsum
(no Python loop over tasks in the traced step, and independent dropout masks
per head). Inputs are NHWC, ``(B, 28, 28, 1)``.
"""

import functools
from typing import Callable, Sequence

from flax import nnx
import jax
import jax.numpy as jnp


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max-pool, stride 2, by reshape and max (NHWC, even H and W).

  On XLA:CPU the gradient of ``lax.reduce_window`` max-pooling is a slow
  select-and-scatter; this form differentiates into cheap elementwise ops
  (see ``benchmarks/bench_step.py --pool``).
  """
  b, h, w, c = x.shape
  return jnp.max(x.reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))


def max_pool_2x2_reduce_window(x: jax.Array) -> jax.Array:
  """The same pooling with ``lax.reduce_window`` (for comparison)."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1),
                               (1, 2, 2, 1), 'VALID')


_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _plain_nhwc_valid(lhs, rhs, window_strides, padding, lhs_dilation,
                      rhs_dilation, dimension_numbers, feature_group_count,
                      kwargs) -> bool:
  """Whether a call is a plain 2-D NHWC/HWIO 'VALID' convolution.

  Unit strides and dilations (two of each), one group, no option but
  ``precision``; anything else (including malformed arguments, which
  ``lax`` then rejects) is not.
  """
  ones = lambda t: t is None or (len(t) == 2 and all(d == 1 for d in t))
  plain = ones(window_strides) and ones(lhs_dilation) and ones(rhs_dilation)
  valid = (padding == 'VALID' if isinstance(padding, str) else
           len(padding) == 2 and all(tuple(p) == (0, 0) for p in padding))
  nhwc = lhs.ndim == 4 and dimension_numbers is not None and (
      jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
  extra = {k: v for k, v in kwargs.items() if v is not None}
  return (plain and valid and nhwc and feature_group_count == 1
          and set(extra) <= {'precision'})


def _lax_conv(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
              dimension_numbers, feature_group_count, kwargs):
  """``lax.conv_general_dilated`` with the wrappers' arguments unchanged."""
  return jax.lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, **kwargs)


def conv_as_matmul(lhs, rhs, window_strides, padding, lhs_dilation=None,
                   rhs_dilation=None, dimension_numbers=None,
                   feature_group_count=1, **kwargs):
  """``lax.conv_general_dilated`` for a plain NHWC/HWIO 'VALID' convolution,
  as one matrix product of the input's shifted windows (im2col).

  ``y[b, i, j, :] = Σ_{u,v,c} x[b, i+u, j+v, c] W[u, v, c, :]`` is
  ``P @ W.reshape(kh·kw·cin, cout)`` with ``P`` the ``kh·kw`` shifted slices
  of ``x`` side by side. For the MultiLeNet's first layer (one input
  channel) XLA:CPU's convolution is slow, most of all its kernel gradient
  (a 25 × 147456 by 147456 × 10 contraction that it runs as a convolution,
  3.3x slower than the product in a one-off timing). On a 2-core CPU the
  whole training step is 1.3-1.6x faster (``benchmarks/bench_step.py
  --conv``; BENCHMARKS.md); on one core it is not faster, and on GPUs it is
  not measured yet (``benchmarks/gpu.sh`` runs that comparison). The same
  values as the convolution up to float32 summation order (tested).
  Anything else (strides, dilation, padding, groups, other layouts or
  options) goes to ``lax.conv_general_dilated``. For ``nnx.Conv(...,
  conv_general_dilated=conv_as_matmul)``.
  """
  args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
          dimension_numbers, feature_group_count, kwargs)
  if not _plain_nhwc_valid(*args):
    return _lax_conv(*args)
  kh, kw, cin, cout = rhs.shape
  b, h, w, _ = lhs.shape
  oh, ow = h - kh + 1, w - kw + 1
  windows = jnp.concatenate([lhs[:, u:u + oh, v:v + ow, :]
                             for u in range(kh) for v in range(kw)], axis=-1)
  precision = kwargs.get('precision')
  y = jnp.matmul(windows.reshape(b * oh * ow, kh * kw * cin),
                 rhs.reshape(kh * kw * cin, cout), precision=precision)
  return y.reshape(b, oh, ow, cout)


def _conv_valid(x, w, precision=None):
  return jax.lax.conv_general_dilated(x, w, (1, 1), 'VALID',
                                      dimension_numbers=_NHWC,
                                      precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_nhwc_grads(x, w, precision):
  return _conv_valid(x, w, precision)


def _conv_nhwc_grads_fwd(x, w, precision):
  return _conv_valid(x, w, precision), (x, w)


def _conv_nhwc_grads_bwd(precision, res, dy):
  x, w = res
  kh, kw, _, _ = w.shape
  # Kernel gradient: channels as the batch, the batch as the features,
  # the output gradient as the window: (Cin, H, W, B) * (OH, OW, B, Cout).
  dw = _conv_valid(jnp.transpose(x, (3, 1, 2, 0)),
                   jnp.transpose(dy, (1, 2, 0, 3)), precision)
  # Input gradient: the full convolution of dy with the flipped kernel,
  # its input and output channels swapped.
  dx = jax.lax.conv_general_dilated(
      dy, jnp.transpose(w[::-1, ::-1], (0, 1, 3, 2)), (1, 1),
      [(kh - 1, kh - 1), (kw - 1, kw - 1)], dimension_numbers=_NHWC,
      precision=precision)
  return dx, jnp.transpose(dw, (1, 2, 0, 3))


_conv_nhwc_grads.defvjp(_conv_nhwc_grads_fwd, _conv_nhwc_grads_bwd)


def conv_nhwc_grads(lhs, rhs, window_strides, padding, lhs_dilation=None,
                    rhs_dilation=None, dimension_numbers=None,
                    feature_group_count=1, **kwargs):
  """``lax.conv_general_dilated`` whose gradients are NHWC/HWIO convolutions.

  For a plain NHWC/HWIO 'VALID' convolution ``y = x * W``, the kernel
  gradient ``dW[u, v, c, o] = Σ_{b,i,j} x[b, i+u, j+v, c] dy[b, i, j, o]``
  is computed as the 'VALID' convolution of ``x`` with channels and batch
  swapped, ``(C, H, W, B)``, by ``dy`` as the kernel, ``(OH, OW, B, O)``;
  the input gradient as the fully padded convolution of ``dy`` with the
  spatially flipped kernel, its channel axes swapped. These are the same
  sums as JAX's transpose rules, written in the canonical layout.

  Why: JAX's transposed convolutions carry permuted dimension labels
  (``f01b_i01o->01bf`` for the kernel gradient). XLA:CPU brings them into
  its fast (Eigen) form in a top-level program but, on this CPU and jax
  0.10.2, not inside a ``lax.scan``/``while`` body, where they run in its
  generic loop emitter: a scanned MultiMNIST step took 131 ms against 42 ms
  per call. In this form the scanned step takes 33 ms (BENCHMARKS.md,
  "Epoch structure on XLA:CPU"). Values and gradients are tested against
  ``lax.conv_general_dilated``; anything but a plain NHWC/HWIO 'VALID'
  convolution goes to it unchanged. For ``nnx.Conv(...,
  conv_general_dilated=conv_nhwc_grads)``.

  Reverse mode only (a custom VJP): ``jax.grad``, ``jax.jacrev``, ``vmap``
  and gradients of gradients work; ``jax.jvp``, ``jax.linearize`` and
  ``jax.jacfwd`` raise. Nothing in this project uses forward mode.

  References:
    The two sums are those of JAX's transpose rules of
    ``conv_general_dilated`` (``jax/_src/lax/convolution.py``).
  """
  args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
          dimension_numbers, feature_group_count, kwargs)
  if not _plain_nhwc_valid(*args):
    return _lax_conv(*args)
  return _conv_nhwc_grads(lhs, rhs, kwargs.get('precision'))


class Encoder(nnx.Module):
  """The shared LeNet trunk: ``(B, 28, 28, 1) -> (B, 50)``."""

  def __init__(self, *, rngs: nnx.Rngs,
               pool: Callable[[jax.Array], jax.Array] = max_pool_2x2,
               rep_dim: int = 50):
    # One input channel: as a matrix product (see conv_as_matmul).
    self.conv1 = nnx.Conv(1, 10, (5, 5), padding='VALID', rngs=rngs,
                          conv_general_dilated=conv_as_matmul)
    # Gradients in the canonical layout (see conv_nhwc_grads).
    self.conv2 = nnx.Conv(10, 20, (5, 5), padding='VALID', rngs=rngs,
                          conv_general_dilated=conv_nhwc_grads)
    # Channel dropout (PyTorch's Dropout2d): one mask per (example, channel).
    self.dropout = nnx.Dropout(0.5, broadcast_dims=(1, 2))
    self.fc = nnx.Linear(320, rep_dim, rngs=rngs)
    self.pool = pool

  def __call__(self, x, *, key=None, train: bool = False):
    x = jax.nn.relu(self.pool(self.conv1(x)))
    x = self.conv2(x)
    x = self.dropout(x, deterministic=not train, rngs=key)
    x = jax.nn.relu(self.pool(x))
    x = x.reshape(x.shape[0], -1)
    return jax.nn.relu(self.fc(x))


@jax.custom_vjp
def dense_on_copies(zs: jax.Array, w: jax.Array) -> jax.Array:
  """``h[t] = zs[t] @ w[t]`` for ``K`` copies of one ``Z``, in one product.

  ``zs`` is ``(K, B, D)`` with ``K`` identical copies of ``Z`` (as
  ``mgda_jax.representation_grads(..., per_task_z=K)`` passes them), ``w``
  is ``(K, D, H)``. The forward pass and the kernel's gradient read the first
  copy only and run as single matrix products, ``(B, D) @ (D, K H)`` and
  ``Zᵀ (B, K H)``; the gradient w.r.t. copy ``t`` is task ``t``'s own,
  ``dh[t] @ w[t]ᵀ``. At ``K = 256`` (batch 256, ``D = H = 50``) MGDA-UB's
  step took 103.2 ms against 116.8 ms with the batched per-copy products,
  in one rotation on XLA:CPU (BENCHMARKS.md, "Where MGDA-UB's time goes at
  K = 256").

  Only valid for identical copies: with distinct ``zs[t]`` the forward value
  is ``zs[0] @ w[t]``, while the VJP is the per-copy function's (so a
  finite-difference check w.r.t. one copy alone fails by design). Hence
  opt-in (``StackedHeads(..., fuse_copies=True)``). Reverse mode only (a
  custom VJP).
  """
  k, d, h = w.shape
  z = zs[0]
  return (z @ w.transpose(1, 0, 2).reshape(d, k * h)).reshape(
      z.shape[0], k, h).transpose(1, 0, 2)


def _dense_on_copies_fwd(zs, w):
  return dense_on_copies(zs, w), (zs[0], w)


def _dense_on_copies_bwd(res, dh):
  z, w = res
  k, d, h = w.shape
  dzs = jnp.einsum('kbh,kdh->kbd', dh, w)
  dw = (z.T @ dh.transpose(1, 0, 2).reshape(z.shape[0], k * h)).reshape(
      d, k, h).transpose(1, 0, 2)
  return dzs.astype(z.dtype), dw.astype(w.dtype)


dense_on_copies.defvjp(_dense_on_copies_fwd, _dense_on_copies_bwd)


class StackedHeads(nnx.Module):
  """K task heads, dense 50->50, ReLU, dropout 0.5, dense 50->C, stacked.

  ``fuse_copies``: read a per-task input ``(K, B, width)`` as ``K``
  identical copies of ``Z`` (what ``representation_grads(..., per_task_z=K)``
  passes) and run the first layer through :func:`dense_on_copies`. Off by
  default: it trusts the copies to be identical, and it changes the
  rounding of the first layer (one product instead of ``K``).
  """

  def __init__(self, num_tasks: int, num_classes: int, *, rngs: nnx.Rngs,
               width: int = 50, hidden: int = 50, fuse_copies: bool = False):
    init = nnx.initializers.lecun_normal()
    self.w1 = nnx.Param(init(rngs.params(), (num_tasks, width, hidden)))
    self.b1 = nnx.Param(jnp.zeros((num_tasks, hidden)))
    self.w2 = nnx.Param(init(rngs.params(), (num_tasks, hidden, num_classes)))
    self.b2 = nnx.Param(jnp.zeros((num_tasks, num_classes)))
    self.dropout = nnx.Dropout(0.5)
    self.fuse_copies = fuse_copies

  def __call__(self, z, *, key=None, train: bool = False):
    """``(B, width)`` or per-task ``(K, B, width)`` -> ``(K, B, C)`` logits.

    With a per-task input, head ``t`` reads only ``z[t]`` (for
    ``mgda_jax.representation_grads(..., per_task_z=K)``).
    """
    w1 = self.w1[...]
    k, width, hidden = w1.shape
    if z.ndim == 3 and self.fuse_copies:
      h = dense_on_copies(z, w1)
    elif z.ndim == 3:
      h = jnp.einsum('kbd,kdh->kbh', z, w1)
    else:
      # One GEMM for all heads: (B, width) @ (width, K * hidden).
      h = (z @ w1.transpose(1, 0, 2).reshape(width, k * hidden)).reshape(
          z.shape[0], k, hidden).transpose(1, 0, 2)
    h = jax.nn.relu(h + self.b1[...][:, None])
    h = self.dropout(h, deterministic=not train, rngs=key)
    return jnp.einsum('kbh,khc->kbc', h, self.w2[...]) + self.b2[...][:, None]


class MultiLeNet(nnx.Module):
  """Shared encoder and K heads; ``task_names`` label the heads.

  ``rep_dim`` (50 in the paper) is the width of the representation Z;
  ``fuse_copies``: see :class:`StackedHeads`.
  """

  def __init__(self, task_names: Sequence[str] = ('left', 'right'),
               num_classes: int = 10, *, rngs: nnx.Rngs,
               pool: Callable[[jax.Array], jax.Array] = max_pool_2x2,
               rep_dim: int = 50, fuse_copies: bool = False):
    self.task_names = tuple(task_names)
    self.encoder = Encoder(rngs=rngs, pool=pool, rep_dim=rep_dim)
    self.heads = StackedHeads(len(self.task_names), num_classes, rngs=rngs,
                              width=rep_dim, fuse_copies=fuse_copies)

  def __call__(self, x, *, key=None, train: bool = False):
    k_enc, k_heads = (None, None) if key is None else jax.random.split(key)
    z = self.encoder(x, key=k_enc, train=train)
    return self.heads(z, key=k_heads, train=train)


def nll_per_task(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean negative log-likelihood per task: ``(K, B, C), (B, K) -> (K,)``."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(logp, labels.T[..., None], axis=-1)[..., 0]
  return -jnp.mean(picked, axis=1)


def metric_sums(logits: jax.Array, labels: jax.Array) -> dict:
  """NLL and accuracy sums per task over a batch: ``(K, B, C), (B, K)``."""
  return {'loss': nll_per_task(logits, labels) * labels.shape[0],
          'acc': jnp.sum(jnp.argmax(logits, -1) == labels.T, axis=1)}


def functional(model: MultiLeNet):
  """Pure functions of ``params`` for the library's helpers.

  Returns:
    ``(graphdef, params, encode, task_losses)`` with
    ``encode(params, x, labels, key) -> Z`` and
    ``task_losses(params, z, x, labels, key) -> (losses (K,), logits)``.
    The same ``key`` gives the encoder and the heads independent streams.
  """
  graphdef, params = nnx.split(model)

  def encode(params, x, labels, key):
    del labels
    m = nnx.merge(graphdef, params)
    return m.encoder(x, key=jax.random.fold_in(key, 0), train=True)

  def task_losses(params, z, x, labels, key):
    del x
    m = nnx.merge(graphdef, params)
    logits = m.heads(z, key=jax.random.fold_in(key, 1), train=True)
    return nll_per_task(logits, labels), logits

  return graphdef, params, encode, task_losses
