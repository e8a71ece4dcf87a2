"""The Cityscapes network of Sener & Koltun (2018), in Flax NNX.

**Encoder** (``encoder='resnet50'``): a dilated ResNet-50 (He et al. 2016;
dilation as in Yu & Koltun 2016 and PSPNet), output stride 8. A 7x7/2
convolution to 64 channels, BatchNorm, ReLU, 3x3/2 max-pool; four stages of
bottleneck blocks ``[3, 4, 6, 3]`` (widths 64, 128, 256, 512, expansion 4);
stage 2 has stride 2, stages 3 and 4 stride 1 with dilations 2 and 4 (their
first block at the previous dilation, as torchvision's
``replace_stride_with_dilation``). For a 256x512 input the representation
``Z`` is ``(B, 32, 64, 2048)``: the paper's 2048 x 32 x 64. It is trained
from scratch here: the paper's code starts from ImageNet weights, which
these machines cannot download (a deviation, stated wherever results are).

``encoder='small'`` (for CPU runs and tests, e.g. the dense MultiMNIST
scenes): two 3x3/2 convolutions (``width``, ``2 width``) and two residual
blocks of dilated 3x3 convolutions (dilation 2), output stride 4.

**Decoders**: one pyramid-pooling decoder per task (PSPNet, Zhao et al.
2017). ``Z`` is average-pooled to ``b x b`` for each bin ``b`` of ``(1, 2,
3, 6)`` (adaptive pooling, PyTorch's bin edges ``floor(i h / b)`` to
``ceil((i + 1) h / b)``), each reduced by a 1x1 convolution to ``C / 4``
channels, normalised, ReLU, upsampled bilinearly to ``Z``'s size and
concatenated with ``Z``; then a 3x3 convolution to ``decoder_width`` (512
in the paper's setting), normalisation, ReLU, and a 1x1 convolution to the
task's channels (19 classes, 2 offsets or 1 disparity), upsampled
bilinearly to the input's size. The decoders normalise with GroupNorm
rather than PSPNet's BatchNorm: the framework carries model state for the
shared encoder only (its statistics are updated once per step, MGDA-UB's
single forward pass), so task-specific statistics would have no place; the
decoder's dropout is left out.

Inputs are ``uint8`` NHWC images, normalised by ImageNet's channel mean and
standard deviation (RGB) or to ``[-1, 1]`` (one channel).
"""

from typing import Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from experiments.cityscapes import dense

MEAN_RGB = (0.485, 0.456, 0.406)
STD_RGB = (0.229, 0.224, 0.225)


def batch_norm(c, rngs):
  # PyTorch's defaults: momentum 0.1 of the new statistics, epsilon 1e-5.
  return nnx.BatchNorm(c, momentum=0.9, epsilon=1e-5, rngs=rngs)


def group_norm(c, rngs):
  groups = max(g for g in (32, 16, 8, 4, 2, 1) if c % g == 0)
  return nnx.GroupNorm(c, num_groups=groups, rngs=rngs)


def normalise(x):
  x = x.astype(jnp.float32) / 255.0
  if x.shape[-1] == 3:
    return (x - jnp.asarray(MEAN_RGB)) / jnp.asarray(STD_RGB)
  return 2.0 * x - 1.0


class Bottleneck(nnx.Module):
  """1x1, 3x3 (stride, dilation), 1x1 (x4 channels); a projection shortcut
  where the shape changes."""

  def __init__(self, cin, width, stride, dilation, *, rngs):
    cout = 4 * width
    self.conv1 = nnx.Conv(cin, width, (1, 1), use_bias=False, rngs=rngs)
    self.bn1 = batch_norm(width, rngs)
    self.conv2 = nnx.Conv(width, width, (3, 3), strides=stride,
                          padding=dilation, kernel_dilation=dilation,
                          use_bias=False, rngs=rngs)
    self.bn2 = batch_norm(width, rngs)
    self.conv3 = nnx.Conv(width, cout, (1, 1), use_bias=False, rngs=rngs)
    self.bn3 = batch_norm(cout, rngs)
    if stride != 1 or cin != cout:
      self.proj = nnx.Conv(cin, cout, (1, 1), strides=stride, use_bias=False,
                           rngs=rngs)
      self.proj_bn = batch_norm(cout, rngs)
    else:
      self.proj = None

  def __call__(self, x, train):
    ura = not train
    out = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ura))
    out = jax.nn.relu(self.bn2(self.conv2(out), use_running_average=ura))
    out = self.bn3(self.conv3(out), use_running_average=ura)
    short = x if self.proj is None else self.proj_bn(
        self.proj(x), use_running_average=ura)
    return jax.nn.relu(out + short)


class DilatedResNet50(nnx.Module):
  """``(B, H, W, C)`` uint8 -> ``(B, H/8, W/8, 2048)``."""

  def __init__(self, in_channels: int = 3, *, rngs: nnx.Rngs,
               blocks: Sequence[int] = (3, 4, 6, 3)):
    self.stem = nnx.Conv(in_channels, 64, (7, 7), strides=2, padding=3,
                         use_bias=False, rngs=rngs)
    self.stem_bn = batch_norm(64, rngs)
    layers, cin, dilation = [], 64, 1
    for width, n, stride, dil in zip((64, 128, 256, 512), blocks,
                                     (1, 2, 1, 1), (1, 1, 2, 4)):
      for b in range(n):
        layers.append(Bottleneck(cin, width, stride if b == 0 else 1,
                                 dilation if b == 0 else dil, rngs=rngs))
        cin = 4 * width
      dilation = dil
    self.layers = nnx.List(layers)
    self.features = cin

  def __call__(self, x, *, train=False):
    x = jax.nn.relu(self.stem_bn(self.stem(normalise(x)),
                                 use_running_average=not train))
    x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1),
                              (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))
    for layer in self.layers:
      x = layer(x, train)
    return x


class DilatedBlock(nnx.Module):
  """Two dilated 3x3 convolutions with BatchNorm and a residual."""

  def __init__(self, c, dilation, *, rngs):
    self.conv1 = nnx.Conv(c, c, (3, 3), padding=dilation,
                          kernel_dilation=dilation, use_bias=False, rngs=rngs)
    self.bn1 = batch_norm(c, rngs)
    self.conv2 = nnx.Conv(c, c, (3, 3), padding=dilation,
                          kernel_dilation=dilation, use_bias=False, rngs=rngs)
    self.bn2 = batch_norm(c, rngs)

  def __call__(self, x, train):
    ura = not train
    out = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ura))
    return jax.nn.relu(x + self.bn2(self.conv2(out), use_running_average=ura))


class SmallEncoder(nnx.Module):
  """``(B, H, W, C)`` uint8 -> ``(B, H/4, W/4, 2 width)``."""

  def __init__(self, in_channels: int = 3, width: int = 16, *,
               rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(in_channels, width, (3, 3), strides=2, padding=1,
                          use_bias=False, rngs=rngs)
    self.bn1 = batch_norm(width, rngs)
    self.conv2 = nnx.Conv(width, 2 * width, (3, 3), strides=2, padding=1,
                          use_bias=False, rngs=rngs)
    self.bn2 = batch_norm(2 * width, rngs)
    self.blocks = nnx.List([DilatedBlock(2 * width, 2, rngs=rngs)
                            for _ in range(2)])
    self.features = 2 * width

  def __call__(self, x, *, train=False):
    ura = not train
    x = jax.nn.relu(self.bn1(self.conv1(normalise(x)),
                             use_running_average=ura))
    x = jax.nn.relu(self.bn2(self.conv2(x), use_running_average=ura))
    for block in self.blocks:
      x = block(x, train)
    return x


def adaptive_pool_matrix(n: int, bins: int) -> np.ndarray:
  """``(bins, n)`` averaging weights of PyTorch's adaptive average pooling:
  bin ``i`` averages ``[floor(i n / bins), ceil((i + 1) n / bins))``."""
  m = np.zeros((bins, n), np.float32)
  for i in range(bins):
    lo, hi = (i * n) // bins, -(-((i + 1) * n) // bins)
    m[i, lo:hi] = 1.0 / (hi - lo)
  return m


def adaptive_avg_pool(x, bins: int):
  """``(B, h, w, C) -> (B, bins, bins, C)``."""
  ph = jnp.asarray(adaptive_pool_matrix(x.shape[1], bins))
  pw = jnp.asarray(adaptive_pool_matrix(x.shape[2], bins))
  return jnp.einsum('ih,bhwc,jw->bijc', ph, x, pw)


class PyramidDecoder(nnx.Module):
  """PSPNet's pyramid-pooling head: ``Z (B, h, w, C) -> (B, h, w, out)``
  (upsampled to the input by the caller)."""

  def __init__(self, cin: int, out: int, *, width: int = 512,
               bins: Sequence[int] = (1, 2, 3, 6), rngs: nnx.Rngs):
    self.bins = tuple(bins)
    red = max(cin // 4, 1)
    self.reduce = nnx.List([nnx.Conv(cin, red, (1, 1), use_bias=False,
                                     rngs=rngs) for _ in self.bins])
    self.reduce_norm = nnx.List([group_norm(red, rngs) for _ in self.bins])
    self.conv = nnx.Conv(cin + red * len(self.bins), width, (3, 3),
                         padding=1, use_bias=False, rngs=rngs)
    self.norm = group_norm(width, rngs)
    self.classify = nnx.Conv(width, out, (1, 1), rngs=rngs)

  def __call__(self, z):
    b, h, w, _ = z.shape
    branches = [z]
    for bins, conv, norm in zip(self.bins, self.reduce, self.reduce_norm):
      p = jax.nn.relu(norm(conv(adaptive_avg_pool(z, bins))))
      branches.append(jax.image.resize(p, (b, h, w, p.shape[-1]), 'bilinear'))
    x = jax.nn.relu(self.norm(self.conv(jnp.concatenate(branches, -1))))
    return self.classify(x)


class DenseNet(nnx.Module):
  """A shared encoder and one pyramid decoder per task (hard sharing)."""

  def __init__(self, task_names: Sequence[str], num_classes: int, *,
               in_channels: int = 3, encoder: str = 'resnet50',
               width: int = 16, decoder_width: int = 512,
               bins: Sequence[int] = (1, 2, 3, 6), rngs: nnx.Rngs):
    self.task_names = tuple(task_names)
    if encoder == 'resnet50':
      self.encoder = DilatedResNet50(in_channels, rngs=rngs)
    elif encoder == 'small':
      self.encoder = SmallEncoder(in_channels, width, rngs=rngs)
    else:
      raise ValueError(f"encoder must be 'resnet50' or 'small'; got "
                       f'{encoder!r}')
    self.decoders = nnx.List([
        PyramidDecoder(self.encoder.features,
                       dense.out_channels(n, num_classes),
                       width=decoder_width, bins=bins, rngs=rngs)
        for n in self.task_names])

  def decode(self, z, hw):
    """Per-task outputs at ``hw`` from ``Z`` (shared, or per-task ``(K,
    ...)``: decoder ``t`` reads ``Z[t]``)."""
    per_task = z.ndim == 5
    return tuple(dense.resize_to(dec(z[t] if per_task else z), hw)
                 for t, dec in enumerate(self.decoders))

  def __call__(self, x, *, train: bool = False):
    return self.decode(self.encoder(x, train=train), x.shape[1:3])


def functional(model: DenseNet):
  """``(graphdef, params, batch_stats, encode, task_losses)`` (stateful, as
  :func:`experiments.common.trainer.split_model` expects). ``task_losses``'
  outputs are the batch KPIs, ``(K,)``."""
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  names = model.task_names

  def encode(params, stats, x, labels, key):
    del labels, key
    m = nnx.merge(graphdef, params, stats, copy=True)
    z = m.encoder(x, train=True)
    return z, nnx.state(m, nnx.BatchStat)

  def task_losses(params, z, x, labels, key):
    del key
    m = nnx.merge(graphdef, params, stats)
    preds = m.decode(z, x.shape[1:3])
    losses = jnp.stack([dense.loss(n, p, labels[n])
                        for n, p in zip(names, preds)])
    kpis = jnp.stack([dense.kpi(n, jax.lax.stop_gradient(p), labels[n])
                      for n, p in zip(names, preds)])
    return losses, kpis

  return graphdef, params, stats, encode, task_losses
