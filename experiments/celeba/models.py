"""The CelebA network of Sener & Koltun (2018), in Flax NNX.

Encoder: ResNet-18 for 64x64 inputs (the official ``multi_faces_resnet``):
a 3x3 stride-1 convolution to 64 channels, BatchNorm, ReLU; four stages of
two BasicBlocks (64, 128, 256, 512 channels, strides 1, 2, 2, 2; a 1x1
projection shortcut where the shape changes); 4x4 average pooling of the
8x8x512 map to 2x2x512, flattened to a 2048-d representation ``Z``.
Heads: one ``Linear(2048, 2)`` per attribute, log-softmax and NLL, stacked
into one einsum.

BatchNorm follows PyTorch's defaults (momentum 0.1 of the new statistics,
i.e. Flax ``momentum=0.9``; epsilon 1e-5). Inputs are ``uint8`` NHWC
images, normalised in the encoder by the official per-channel mean (RGB
72.39, 82.91, 73.16) and 255.

A smaller trunk for TAG's CelebA configuration (``stages``) follows the TAG
code's network: the stem, a 3x3/2 max-pool, one BasicBlock of 64 channels,
2x2 average pooling.
"""

from typing import Sequence

from flax import nnx
import jax
import jax.numpy as jnp

MEAN_RGB = (72.39239876, 82.90891754, 73.15835921)


def batch_norm(c, rngs):
  return nnx.BatchNorm(c, momentum=0.9, epsilon=1e-5, rngs=rngs)


class BasicBlock(nnx.Module):
  """Two 3x3 convolutions with BatchNorm and a residual connection."""

  def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=stride, padding=1,
                          use_bias=False, rngs=rngs)
    self.bn1 = batch_norm(cout, rngs)
    self.conv2 = nnx.Conv(cout, cout, (3, 3), padding=1, use_bias=False,
                          rngs=rngs)
    self.bn2 = batch_norm(cout, rngs)
    if stride != 1 or cin != cout:
      self.proj = nnx.Conv(cin, cout, (1, 1), strides=stride, use_bias=False,
                           rngs=rngs)
      self.proj_bn = batch_norm(cout, rngs)
    else:
      self.proj = None

  def __call__(self, x, train: bool):
    ura = not train
    out = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ura))
    out = self.bn2(self.conv2(out), use_running_average=ura)
    short = x if self.proj is None else self.proj_bn(
        self.proj(x), use_running_average=ura)
    return jax.nn.relu(out + short)


class ResNetEncoder(nnx.Module):
  """``(B, 64, 64, 3)`` uint8 -> ``(B, 2048)`` (ResNet-18), or the TAG
  trunk with ``small=True`` (``(B, 64 * 15 * 15)``)."""

  def __init__(self, *, rngs: nnx.Rngs, small: bool = False,
               blocks: Sequence[int] = (2, 2, 2, 2)):
    self.small = small
    self.stem = nnx.Conv(3, 64, (3, 3), padding=1, use_bias=False, rngs=rngs)
    self.stem_bn = batch_norm(64, rngs)
    layers = []
    if small:
      layers.append(BasicBlock(64, 64, 1, rngs=rngs))
    else:
      cin = 64
      for width, n, stride in zip((64, 128, 256, 512), blocks, (1, 2, 2, 2)):
        for b in range(n):
          layers.append(BasicBlock(cin, width, stride if b == 0 else 1,
                                   rngs=rngs))
          cin = width
    self.layers = nnx.List(layers)

  def __call__(self, x, *, train: bool = False):
    x = (x.astype(jnp.float32) - jnp.asarray(MEAN_RGB)) / 255.0
    x = jax.nn.relu(self.stem_bn(self.stem(x), use_running_average=not train))
    if self.small:
      x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1),
                                (1, 2, 2, 1), 'VALID')
    for layer in self.layers:
      x = layer(x, train)
    window = 2 if self.small else 4
    x = nnx.avg_pool(x, (window, window), strides=(window, window))
    return x.reshape(x.shape[0], -1)


class StackedLinearHeads(nnx.Module):
  """K heads ``Linear(D, C)``, stacked: ``(B, D)`` or per-task ``(K, B,
  D)`` -> ``(K, B, C)`` logits (head ``t`` reads only ``z[t]``)."""

  def __init__(self, num_tasks: int, width: int, num_classes: int = 2, *,
               rngs: nnx.Rngs):
    # PyTorch's Linear default: U(-1/sqrt(D), 1/sqrt(D)) for both.
    bound = 1.0 / width ** 0.5
    init = nnx.initializers.uniform(2 * bound)
    self.w = nnx.Param(init(rngs.params(), (num_tasks, width, num_classes))
                       - bound)
    self.b = nnx.Param(init(rngs.params(), (num_tasks, num_classes)) - bound)

  def __call__(self, z):
    eq = 'kbd,kdc->kbc' if z.ndim == 3 else 'bd,kdc->kbc'
    return jnp.einsum(eq, z, self.w[...]) + self.b[...][:, None]


class FaceNet(nnx.Module):
  """ResNet encoder and one binary head per attribute."""

  def __init__(self, task_names: Sequence[str], *, rngs: nnx.Rngs,
               small: bool = False):
    self.task_names = tuple(task_names)
    self.encoder = ResNetEncoder(rngs=rngs, small=small)
    width = 64 * 15 * 15 if small else 2048
    self.heads = StackedLinearHeads(len(self.task_names), width, rngs=rngs)

  def __call__(self, x, *, train: bool = False):
    return self.heads(self.encoder(x, train=train))


def nll_per_task(logits, labels):
  """Mean NLL per task: ``(K, B, 2), (B, K) -> (K,)``."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(logp, labels.T[..., None], axis=-1)[..., 0]
  return -jnp.mean(picked, axis=1)


def functional(model: FaceNet):
  """``(graphdef, params, batch_stats, encode, task_losses)`` (stateful:
  ``encode(params, batch_stats, x, labels, key) -> (Z, new_batch_stats)``,
  BatchNorm on the batch's statistics)."""
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

  def encode(params, stats, x, labels, key):
    del labels, key
    # copy: fresh Variables at this trace level, which BatchNorm mutates.
    m = nnx.merge(graphdef, params, stats, copy=True)
    z = m.encoder(x, train=True)
    return z, nnx.state(m, nnx.BatchStat)

  def task_losses(params, z, x, labels, key):
    del x, key
    m = nnx.merge(graphdef, params, stats)
    logits = m.heads(z)
    return nll_per_task(logits, labels), logits

  return graphdef, params, stats, encode, task_losses
