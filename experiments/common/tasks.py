"""Task specs: names, metrics and their directions; Δm over K tasks."""

from typing import NamedTuple, Sequence

import numpy as np


class Metric(NamedTuple):
  """An evaluation metric, computed per task.

  Attributes:
    name: the key in the records (``val_<name>``, ``test_<name>``).
    higher_is_better: its direction (accuracy: True; a loss or error:
      False), or one per task of the spec where tasks differ (a dense
      experiment's 'score': mIoU, higher, for segmentation; an L1 error,
      lower, for depth).
    label: a display name for tables.
  """

  name: str
  higher_is_better: bool | tuple[bool, ...]
  label: str = ''

  def directions(self, num_tasks: int) -> tuple[bool, ...]:
    """``higher_is_better`` per task (of the spec's ``num_tasks``)."""
    h = self.higher_is_better
    if isinstance(h, bool):
      return (h,) * num_tasks
    if len(h) != num_tasks:
      raise ValueError(f'metric {self.name!r} has {len(h)} directions for '
                       f'{num_tasks} tasks')
    return tuple(h)

  @property
  def uniform(self) -> bool:
    """Whether every task has the same direction."""
    h = self.higher_is_better
    return isinstance(h, bool) or len(set(h)) <= 1


class TaskSpec(NamedTuple):
  """What an experiment's tasks are.

  Attributes:
    names: the K task names (the heads' labels, the columns of tables).
    metrics: the evaluation metrics, each computed for every task.
    table_metric: the metric that results tables and Δm report.
  """

  names: tuple[str, ...]
  metrics: tuple[Metric, ...]
  table_metric: str

  def metric(self, name: str) -> Metric:
    for m in self.metrics:
      if m.name == name:
        return m
    raise ValueError(f'unknown metric {name!r}; the metrics are '
                     f'{[m.name for m in self.metrics]}')


def classification_priors(train_labels, tasks, num_classes: int) -> dict:
  """``method_args`` for ``prior_loss_weighting``: each classification
  task's prior loss, the entropy of its training-label frequencies."""
  import mgda_jax  # pylint: disable=import-outside-toplevel
  labels = np.asarray(train_labels)[:, list(tasks)]
  counts = np.stack([np.bincount(labels[:, i], minlength=num_classes)
                     for i in range(labels.shape[1])])
  return {'prior_loss_weighting': {
      'priors': mgda_jax.classification_prior(counts)}}


def delta_m(values: Sequence[float], baseline: Sequence[float],
            higher_is_better: Sequence[bool]) -> float:
  """Δm (%) of Navon et al. (2022): the mean relative drop against a baseline.

  .. math::

    \\Delta_m = \\frac{100}{K} \\sum_k (-1)^{d_k}
      \\frac{M_k - M_{b,k}}{M_{b,k}},

  with ``d_k = 1`` where higher is better. Lower is better; negative beats
  the baseline (single-task training). LibMTL's Δp is the same quantity with
  the opposite sign.

  Args:
    values: ``M_k``, one per task (and metric).
    baseline: ``M_{b,k}``, the same length.
    higher_is_better: ``d_k``, the same length.

  Returns:
    Δm in per cent.

  Example:
    >>> round(delta_m([0.9, 0.8], [0.9, 1.0], [True, True]), 6)
    10.0
  """
  v, b = np.asarray(values, float), np.asarray(baseline, float)
  if v.shape != b.shape or v.shape != (len(higher_is_better),):
    raise ValueError(f'delta_m needs equal lengths; got {v.shape}, {b.shape} '
                     f'and {len(higher_is_better)}')
  sign = np.where(np.asarray(higher_is_better), -1.0, 1.0)
  return float(100 * np.mean(sign * (v - b) / b))


def select_best(records: list[dict], metric: Metric) -> dict:
  """The record whose mean validation ``metric`` over tasks is best.

  Tasks where the metric does not apply (null) are left out of the mean.
  Ties go to the earliest epoch.
  """
  if not records:
    raise ValueError('no finished epoch to select from')
  if not metric.uniform:
    raise ValueError(f'metric {metric.name!r} has different directions per '
                     'task, so its mean over tasks cannot select an epoch; '
                     'select by a metric with one direction (e.g. loss)')
  h = metric.higher_is_better
  sign = 1.0 if (h if isinstance(h, bool) else h[0]) else -1.0
  return max(records, key=lambda r: (
      sign * np.nanmean(np.asarray(r[f'val_{metric.name}'], float)),
      -r['epoch']))
