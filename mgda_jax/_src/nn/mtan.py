"""Multi-Task Attention Network (Liu et al. 2019): task attention over a
shared backbone."""

from typing import Mapping, Sequence

from flax import nnx
import jax
import jax.numpy as jnp

from mgda_jax._src.nn import base


class Identity(nnx.Module):
  """``x -> x`` (the tail of a stage given as one module)."""

  def __call__(self, x):
    return x


def _norm(kind, features, rngs):
  if kind == 'batch':
    return nnx.BatchNorm(features, rngs=rngs)
  if kind == 'layer':
    return nnx.LayerNorm(features, rngs=rngs)
  if kind is None:
    return Identity()
  raise ValueError(f"norm must be 'batch', 'layer' or None; got {kind!r}.")


class Attention(nnx.Module):
  """``g``: 1x1 conv, norm, ReLU, 1x1 conv, norm, sigmoid."""

  def __init__(self, in_features, hidden, out_features, *, norm, spatial_dims,
               rngs):
    one = (1,) * spatial_dims
    self.conv1 = nnx.Conv(in_features, hidden, one, rngs=rngs)
    self.norm1 = _norm(norm, hidden, rngs)
    self.conv2 = nnx.Conv(hidden, out_features, one, rngs=rngs)
    self.norm2 = _norm(norm, out_features, rngs)

  def __call__(self, x):
    x = jax.nn.relu(self.norm1(self.conv1(x)))
    return jax.nn.sigmoid(self.norm2(self.conv2(x)))


class Extractor(nnx.Module):
  """``f``: 3x3 conv, norm, ReLU (then pooled to the next stage's size)."""

  def __init__(self, in_features, out_features, *, norm, spatial_dims, rngs):
    self.conv = nnx.Conv(in_features, out_features, (3,) * spatial_dims,
                         rngs=rngs)
    self.norm = _norm(norm, out_features, rngs)

  def __call__(self, x):
    return jax.nn.relu(self.norm(self.conv(x)))


def pool_to(x, like):
  """Max-pool ``x`` (``(B, *spatial, C)``) to the spatial shape of ``like``
  by an integer factor per axis."""
  src, dst = x.shape[1:-1], like.shape[1:-1]
  if src == dst:
    return x
  if any(s % d for s, d in zip(src, dst)):
    raise ValueError(f'MTAN: cannot pool attention features of spatial shape '
                     f'{src} to the next stage\'s {dst} (no integer factor).')
  window = (1,) + tuple(s // d for s, d in zip(src, dst)) + (1,)
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, window,
                               'VALID')


class MTAN(base.MTLArchitecture):
  """Task-specific soft-attention modules over a shared backbone.

  The backbone is a sequence of stages. Stage ``j`` gives intermediate
  features ``u^j`` and its output ``p^j`` (pass a stage as a pair ``(body,
  tail)`` with ``u^j = body(p^{j-1})``, ``p^j = tail(u^j)``, e.g. a ResNet
  layer without and with its last block, as the official ResNet MTAN does;
  or as one module, then ``u^j = p^j``). Task ``t``'s attention at stage
  ``j`` (Liu et al. 2019, Sec. 3.2) is

  .. math::

    a^j_t = g^j_t\\big([u^j ; f^j(\\hat a^{j-1}_t)]\\big), \\qquad
    \\hat a^j_t = a^j_t \\odot p^j,

  (``a^1_t = g^1_t(u^1)``), where ``g`` is 1x1 conv, norm, ReLU, 1x1 conv,
  norm, sigmoid, and ``f`` a 3x3 conv, norm, ReLU followed by max-pooling to
  the resolution of ``u^j``. **Where the decoder goes**: ``decoders[t]``
  maps the last attended features ``a^_t`` to task ``t``'s prediction.
  **Wrapping another backbone** (lorenmt/mtan#65): split it into stages,
  list each stage's channel widths, and keep its task heads as the decoders
  (the example below).

  ``f`` is per task here by default (``share_extractor=False``). The
  official code shares one ``f`` per stage across tasks
  (``encoder_block_att`` in lorenmt/mtan): pass ``share_extractor=True``
  for that. A shared ``f`` is a shared parameter acting *after* the
  task-specific masks, so no representation separates shared from
  task-specific parameters: ``supports_representation`` is then False and
  only the parameter-gradient path is exact (:func:`mgda_jax.nn.task_gradients`
  refuses the representation path).

  **Shared parameters and representation** (``share_extractor=False``): the
  backbone (``stage_u``, ``stage_p``) is shared; attention, extractors and
  decoders are task-specific. ``Z`` is the backbone's features at every
  stage, ``({'u': u^1, 'p': p^1}, ...)`` (only ``'p'`` for a one-module
  stage). The MGDA-UB bound holds for this concatenated ``Z = (Z_1, ...,
  Z_m)``: task ``t``'s gradient of the shared parameters is ``J^T r_t`` with
  ``J`` the Jacobian of the concatenated ``Z`` w.r.t. them and ``r_t =
  dL_t/dZ``, so ``||sum_t alpha_t J^T r_t|| <= ||J|| ||sum_t alpha_t r_t||``.

  **Normalisation**: ``norm='batch'`` (the paper's BatchNorm) makes the
  attention and extractor modules stateful (``nnx.BatchStat``): train with
  :func:`mgda_jax.nn.functional`, which carries the statistics in its
  ``state`` and returns them updated once per step, and call
  ``model.eval()`` before evaluating (running averages). ``norm='layer'`` or
  ``None`` (convolution biases only) are stateless.

  Args:
    stages: the backbone stages, each a module or a ``(body, tail)`` pair.
    channels: per stage, the channel width (last axis) ``c`` of ``u^j`` and
      ``p^j``, or a pair ``(c_u, c_p)``.
    decoders: one module per task (list, or dict task name -> module).
    rngs: for the attention modules.
    attention_hidden: the width of ``g``'s hidden layer per stage (default
      ``c_p``, as the SegNet MTAN; the ResNet one uses ``c_p / 4``).
    share_extractor: one ``f`` per stage for all tasks (official code).
    norm: ``'batch'``, ``'layer'`` or None.
    spatial_dims: the number of spatial axes (features are ``(B, *spatial,
      C)``).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import mgda_jax.nn
    >>> rngs = nnx.Rngs(0)
    >>> conv = lambda i, o, s=1: nnx.Conv(i, o, (3, 3), strides=s, rngs=rngs)
    >>> model = mgda_jax.nn.MTAN(
    ...     stages=[(conv(3, 4), conv(4, 4)),          # u^1, p^1: 8x8x4
    ...             (conv(4, 8, 2), conv(8, 8))],      # u^2, p^2: 4x4x8
    ...     channels=[4, 8],
    ...     decoders=[nnx.Conv(8, 1, (1, 1), rngs=rngs),     # depth
    ...               nnx.Conv(8, 5, (1, 1), rngs=rngs)],    # 5 classes
    ...     rngs=rngs)
    >>> [o.shape for o in model(jnp.ones((2, 8, 8, 3)))]
    [(2, 4, 4, 1), (2, 4, 4, 5)]

  References:
    Liu, Johns, Davison, End-to-End Multi-Task Learning with Attention, CVPR
    2019, arXiv:1803.10704.
  """

  def __init__(self, stages: Sequence, channels: Sequence,
               decoders: Sequence[nnx.Module] | Mapping[str, nnx.Module], *,
               rngs: nnx.Rngs, attention_hidden: Sequence[int] | None = None,
               share_extractor: bool = False, norm: str | None = 'batch',
               spatial_dims: int = 2):
    self.decoders, self.task_names, self.as_dict = base.task_container(
        decoders, 'MTAN decoders')
    stages, channels = list(stages), list(channels)
    if not stages or len(channels) != len(stages):
      raise ValueError(f'MTAN needs stages and one channels entry per stage; '
                       f'got {len(stages)} stages, {len(channels)} channels.')
    bodies, tails, split = [], [], []
    for s in stages:
      if isinstance(s, (tuple, list)):
        if len(s) != 2:
          raise ValueError('MTAN: a stage is a module or a (body, tail) pair.')
        bodies.append(s[0])
        tails.append(s[1])
        split.append(True)
      else:
        bodies.append(s)
        tails.append(Identity())
        split.append(False)
    widths = [c if isinstance(c, (tuple, list)) else (c, c) for c in channels]
    hidden = (list(attention_hidden) if attention_hidden is not None
              else [cp for _, cp in widths])
    k, n = len(self.task_names), len(stages)
    self.split = tuple(split)
    self.share_extractor = share_extractor
    self.supports_representation = not share_extractor
    self.stage_u = nnx.List(bodies)
    self.stage_p = nnx.List(tails)
    kw = dict(norm=norm, spatial_dims=spatial_dims, rngs=rngs)

    def attention(j):
      cu, cp = widths[j]
      return Attention(cu if j == 0 else 2 * cu, hidden[j], cp, **kw)

    def extractors():
      return nnx.List([Extractor(widths[j - 1][1], widths[j][0], **kw)
                       for j in range(1, n)])

    self.attention = nnx.List([nnx.List([attention(j) for j in range(n)])
                               for _ in range(k)])
    self.extractors = (extractors() if share_extractor
                       else nnx.List([extractors() for _ in range(k)]))

  def represent(self, x):
    z, p = [], x
    for body, tail, split in zip(self.stage_u, self.stage_p, self.split):
      u = body(p)
      p = tail(u)
      z.append({'u': u, 'p': p} if split else {'p': p})
    return tuple(z)

  def _extractor(self, task, j):
    return (self.extractors[j - 1] if self.share_extractor
            else self.extractors[task][j - 1])

  def decode_task(self, task, z, x):
    del x
    a = None
    for j, zj in enumerate(z):
      u, p = zj.get('u', zj['p']), zj['p']
      if j == 0:
        inp = u
      else:
        f = pool_to(self._extractor(task, j)(a), u)
        inp = jnp.concatenate([u, f], axis=-1)
      a = self.attention[task][j](inp) * p
    return base.task_part(self.decoders, self.task_names, self.as_dict,
                          task)(a)

  def is_shared(self, path):
    head = path[:1]
    if head in (('stage_u',), ('stage_p',)):
      return True
    return head == ('extractors',) and self.share_extractor
