"""Dense tasks of Sener & Koltun (2018), Cityscapes: losses, metrics, specs.

Three kinds of per-pixel task, each named after its label in the data:

* ``'semantic'``: ``C``-class segmentation, labels ``uint8 (B, H, W)`` with
  ``255`` ignored. Loss: the mean cross-entropy over labelled pixels.
  Metrics: ``mIoU = (1/|C'|) sum_{c in C'} |P_c ∩ T_c| / |P_c ∪ T_c|``,
  accumulated over the whole split, ``C'`` the classes with a non-empty
  union; pixel accuracy over labelled pixels.
* ``'instance'``: the per-pixel offset ``(dy, dx)`` from each pixel to its
  instance's centroid (Kendall et al. 2018, as in the paper), labels
  ``{'offset': (B, H, W, 2), 'valid': (B, H, W)}``. Loss and metric: the
  mean absolute error over the valid pixels' coordinates, in pixels (the
  official code's ``l1_loss_instance``: the L1 mean over unmasked entries).
* ``'disparity'`` / ``'depth'``: labels ``(B, H, W)``, ``0`` invalid. Loss
  and metric: the mean absolute error over valid pixels (in the label's
  units: pixels of disparity for Cityscapes' official files); also the mean
  relative error ``|p - t| / t``, LibMTL's second depth metric.

The official code casts predictions and targets to ``int32`` before taking
differences in its metrics and masks ``target > 0`` only after normalising
the disparity; both are quirks of that code (a truncation, and a mask that
depends on the normalisation), not the definitions, which are the ones above.

Every metric is a ``(K,)`` vector over the trained tasks: ``'score'`` is
each task's headline figure (mIoU, higher is better; the L1 errors, lower),
as in the paper's Table 4; ``'pixacc'`` and ``'relerr'`` apply to one kind
and are NaN (null in the records) for the others; ``'loss'`` applies to all.
Epochs are selected by the mean validation loss (``'score'`` mixes
directions).
"""

from typing import Sequence

import jax
import jax.numpy as jnp

from experiments.common import tasks as tasks_lib

IGNORE = 255
KINDS = {'semantic': 'semantic', 'instance': 'instance',
         'disparity': 'depth', 'depth': 'depth'}


def kind(name: str) -> str:
  try:
    return KINDS[name]
  except KeyError:
    raise ValueError(f'unknown dense task {name!r}; the tasks are '
                     f'{sorted(KINDS)}') from None


def out_channels(name: str, num_classes: int) -> int:
  """The decoder's output channels for a task."""
  return {'semantic': num_classes, 'instance': 2, 'depth': 1}[kind(name)]


def task_spec(names: Sequence[str]) -> tasks_lib.TaskSpec:
  """The spec of these dense tasks (score directions per task)."""
  kinds = [kind(n) for n in names]
  return tasks_lib.TaskSpec(
      names=tuple(names),
      metrics=(
          tasks_lib.Metric('score', tuple(k == 'semantic' for k in kinds),
                           'mIoU (semantic), L1 error (others)'),
          tasks_lib.Metric('loss', False, 'loss'),
          tasks_lib.Metric('pixacc', True, 'pixel accuracy (semantic)'),
          tasks_lib.Metric('relerr', False, 'relative error (depth)'),
      ),
      table_metric='score')


# Losses: each task's output at the label's resolution.


def resize_to(pred: jax.Array, hw) -> jax.Array:
  """Bilinear resize of ``(B, h, w, C)`` to ``(B, *hw, C)``."""
  if pred.shape[1:3] == tuple(hw):
    return pred
  return jax.image.resize(pred, (pred.shape[0], *hw, pred.shape[-1]),
                          'bilinear')


def _masked_mean(values, mask):
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def semantic_loss(logits, labels):
  """Mean cross-entropy over labelled pixels: ``(B, H, W, C), (B, H, W)``."""
  labels = labels.astype(jnp.int32)
  mask = (labels != IGNORE).astype(jnp.float32)
  safe = jnp.where(labels == IGNORE, 0, labels)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  return _masked_mean(nll, mask)


def instance_loss(pred, label):
  """Mean absolute error over valid pixels' two offset coordinates."""
  mask = jnp.broadcast_to(label['valid'][..., None], pred.shape)
  err = jnp.abs(pred.astype(jnp.float32) - label['offset'])
  return _masked_mean(err, mask)


def depth_loss(pred, target):
  """Mean absolute error over pixels with a valid (positive) target."""
  target = target.astype(jnp.float32)
  mask = (target > 0).astype(jnp.float32)
  return _masked_mean(jnp.abs(pred[..., 0].astype(jnp.float32) - target), mask)


def loss(name: str, pred, label):
  return {'semantic': semantic_loss, 'instance': instance_loss,
          'depth': depth_loss}[kind(name)](pred, label)


# Metrics: accumulators summed over a split, then reduced.


def accumulators(name: str, pred, label, num_classes: int) -> dict:
  """One batch's sums for task ``name`` (keys prefixed by the name)."""
  k = kind(name)
  n = pred.shape[0]
  out = {f'{name}/loss': loss(name, pred, label) * n}
  if k == 'semantic':
    y = label.astype(jnp.int32)
    valid = y != IGNORE
    p = jnp.argmax(pred, -1)
    cls = jnp.arange(num_classes)
    pc = (p[..., None] == cls) & valid[..., None]
    tc = (y[..., None] == cls) & valid[..., None]
    axes = tuple(range(pc.ndim - 1))
    out[f'{name}/inter'] = jnp.sum(pc & tc, axes).astype(jnp.float32)
    out[f'{name}/union'] = jnp.sum(pc | tc, axes).astype(jnp.float32)
    out[f'{name}/correct'] = jnp.sum((p == y) & valid).astype(jnp.float32)
    out[f'{name}/count'] = jnp.sum(valid).astype(jnp.float32)
  elif k == 'instance':
    mask = jnp.broadcast_to(label['valid'][..., None], pred.shape)
    out[f'{name}/abs'] = jnp.sum(jnp.abs(pred - label['offset']) * mask)
    out[f'{name}/count'] = jnp.sum(mask)
  else:
    t = label.astype(jnp.float32)
    mask = (t > 0).astype(jnp.float32)
    err = jnp.abs(pred[..., 0] - t) * mask
    out[f'{name}/abs'] = jnp.sum(err)
    out[f'{name}/rel'] = jnp.sum(err / jnp.where(t > 0, t, 1.0))
    out[f'{name}/count'] = jnp.sum(mask)
  return out


def reduce(sums: dict, n: int, names: Sequence[str]) -> dict:
  """``{'score', 'loss', 'pixacc', 'relerr'}``, each ``(K,)`` over
  ``names``; NaN where a metric does not apply (or nothing was labelled)."""
  nan = jnp.float32(jnp.nan)
  cols = {m: [] for m in ('score', 'loss', 'pixacc', 'relerr')}
  for name in names:
    k = kind(name)
    cols['loss'].append(sums[f'{name}/loss'] / n)
    count = sums[f'{name}/count']
    if k == 'semantic':
      inter, union = sums[f'{name}/inter'], sums[f'{name}/union']
      present = union > 0
      iou = jnp.where(present, inter / jnp.where(present, union, 1.0), 0.0)
      cols['score'].append(jnp.where(
          jnp.any(present), jnp.sum(iou) / jnp.maximum(jnp.sum(present), 1),
          nan))
      cols['pixacc'].append(jnp.where(count > 0, sums[f'{name}/correct'] /
                                      jnp.maximum(count, 1.0), nan))
      cols['relerr'].append(nan)
    else:
      cols['score'].append(jnp.where(
          count > 0, sums[f'{name}/abs'] / jnp.maximum(count, 1.0), nan))
      cols['pixacc'].append(nan)
      cols['relerr'].append(
          jnp.where(count > 0, sums[f'{name}/rel'] / jnp.maximum(count, 1.0),
                    nan) if k == 'depth' else nan)
  return {m: jnp.stack(v).astype(jnp.float32) for m, v in cols.items()}


def kpi(name: str, pred, label) -> jax.Array:
  """A batch KPI in ``[0, 1]`` (DTP's): pixel accuracy for segmentation,
  ``exp(-L1)`` for the regressions (1 at zero error)."""
  if kind(name) == 'semantic':
    y = label.astype(jnp.int32)
    valid = (y != IGNORE).astype(jnp.float32)
    return _masked_mean((jnp.argmax(pred, -1) == y).astype(jnp.float32),
                        valid)
  return jnp.exp(-loss(name, pred, label))
