"""The reproduction driver: methods x seeds, resumable; a table and plots.

Each (method, seed) run is an ordinary training run with its own workdir
under ``runs_dir``, so an interrupted reproduction resumes where it stopped
(finished runs are read back, unfinished ones resume from their checkpoint).
Generic over tasks and metrics: the table reports the task spec's
``table_metric`` per task (mean ± std over seeds) beside a paper's figures,
and Δm against single-task training where it was run.
"""

import json
import os
import platform
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from experiments.common import tasks as tasks_lib
from experiments.common import trainer

import mgda_jax


def family(method: str) -> str:
  if method == 'single_task':
    return 'baseline'
  return mgda_jax.method_spec(method).family


def set_field(config, dotted: str, value: Any) -> None:
  """``config.a.b = value`` for ``dotted='a.b'``."""
  *path, last = dotted.split('.')
  node = config
  for p in path:
    node = node[p]
  node[last] = value


def run_all(experiment: trainer.Experiment, methods: Sequence[str],
            seeds: Sequence[int], epochs: int, runs_dir: str,
            overrides: Mapping[str, Any] = (), log=print,
            choose=None) -> dict:
  """Trains (or reads back) every (method, seed); returns their results.

  ``choose``: ``config -> Experiment``, called on each run's config after
  the overrides (e.g. MultiMNIST's ``experiment_for``: the architecture is a
  config field); ``experiment`` then only gives the default config.
  """
  results = {}
  for method in methods:
    for seed in seeds:
      workdir = os.path.join(runs_dir, f'{method}-seed{seed}')
      final = os.path.join(workdir, 'final.json')
      if os.path.exists(final):
        with open(final) as f:
          r = json.load(f)
        if r.get('epochs') == epochs:
          results[(method, seed)] = r
          continue
      config = experiment.default_config()
      config.method, config.seed, config.epochs = method, seed, epochs
      for k, v in dict(overrides).items():
        set_field(config, k, v)
      log(f'== {method}, seed {seed}, {epochs} epochs')
      results[(method, seed)] = trainer.train_and_evaluate(
          experiment if choose is None else choose(config), config, workdir,
          log=log)
  return results


def _curves(runs_dir, spec, method, seed, metric):
  """Validation ``metric`` per epoch and task (per-task runs for
  single_task)."""
  base = os.path.join(runs_dir, f'{method}-seed{seed}')
  if method == 'single_task':
    cols = []
    for name in spec.names:
      with open(os.path.join(base, name, 'metrics.jsonl')) as f:
        cols.append([json.loads(l)[f'val_{metric}'][0] for l in f])
    return np.array(cols).T
  with open(os.path.join(base, 'metrics.jsonl')) as f:
    return np.array([json.loads(l)[f'val_{metric}'] for l in f])


def write_plots(spec: tasks_lib.TaskSpec, results, runs_dir, methods, seeds,
                out_dir, labels, prefix) -> list[str]:
  """Validation curves per task; for two tasks, the trade-off scatter."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  metric = spec.metric(spec.table_metric)
  scale = np.where(metric.directions(len(spec.names)), 100, 1)
  palette = (list(plt.get_cmap('tab20').colors) +
             list(plt.get_cmap('tab20b').colors))
  k = len(spec.names)
  fig, axes = plt.subplots(1, k, figsize=(6 * k, 5), squeeze=False)
  for j, method in enumerate(methods):
    curves = [_curves(runs_dir, spec, method, s, metric.name) for s in seeds]
    n = min(len(c) for c in curves)
    mean = scale * np.mean([c[:n] for c in curves], 0)
    for i, ax in enumerate(axes[0]):
      ax.plot(np.arange(1, n + 1), mean[:, i], label=labels.get(method, method),
              color=palette[j % len(palette)])
  for i, ax in enumerate(axes[0]):
    ax.set_title(f'{spec.names[i]}: validation {metric.label or metric.name} '
                 f'(mean of {len(seeds)} seeds)')
    ax.set_xlabel('epoch')
    ax.grid(alpha=0.3)
  axes[0][-1].legend(fontsize=6, ncol=2)
  fig.tight_layout()
  written = [f'{prefix}_curves.png']
  fig.savefig(os.path.join(out_dir, written[0]), dpi=120)
  plt.close(fig)
  if k != 2:
    return written
  fig, ax = plt.subplots(figsize=(9, 7))
  markers = {'baseline': '*', 'loss': 'o', 'gradient': 's'}
  for i, method in enumerate(methods):
    pts = scale * np.array(
        [[results[(method, s)][f'test_{metric.name}_{n}'] for n in spec.names]
         for s in seeds])
    color, marker = palette[i % len(palette)], markers[family(method)]
    ax.scatter(pts[:, 0], pts[:, 1], color=color, alpha=0.35, s=12,
               marker=marker)
    mean = pts.mean(0)
    ax.scatter(*mean, color=color, s=60, edgecolor='k', marker=marker,
               label=labels.get(method, method))
    ax.annotate(labels.get(method, method), mean, fontsize=6, xytext=(3, 3),
                textcoords='offset points')
  ax.set_xlabel(f'{spec.names[0]} test {metric.label or metric.name}')
  ax.set_ylabel(f'{spec.names[1]} test {metric.label or metric.name}')
  ax.set_title('trade-off: mean (large) and each seed (small); circles: loss '
               'weightings, squares: gradient methods', fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  written.append(f'{prefix}_tradeoff.png')
  fig.savefig(os.path.join(out_dir, written[-1]), dpi=120)
  plt.close(fig)
  return written


def table(spec: tasks_lib.TaskSpec, results, methods, seeds,
          paper: Mapping[str, Sequence[float]], labels) -> list[str]:
  """Markdown rows: the table metric per task (mean ± std), Δm, the paper's
  figures and seconds per epoch."""
  metric = spec.metric(spec.table_metric)
  directions = metric.directions(len(spec.names))
  # Percentages for higher-is-better metrics (accuracy, mIoU), as papers
  # report them; errors in their own units.
  scale = np.where(directions, 100, 1)
  cols = ' | '.join(f'{n} (ours)' for n in spec.names)
  pcols = ' | '.join(f'{n} (paper)' for n in spec.names)
  lines = [f'| method | family | {cols} | Δm (%) ↓ | {pcols} | s / epoch |',
           '| --- ' * (4 + 2 * len(spec.names)) + '|']

  def values(method):
    rs = [results[(method, s)] for s in seeds]
    return scale * np.array([[r[f'test_{metric.name}_{n}'] for n in spec.names]
                             for r in rs])

  base = values('single_task').mean(0) if 'single_task' in methods else None
  for method in methods:
    v = values(method)
    dm = ('–' if base is None else
          f'{tasks_lib.delta_m(v.mean(0), base, directions):+.2f}')
    p = paper.get(method)
    pvals = (' | '.join(f'{x:.2f}' for x in p) if p else
             ' | '.join('–' for _ in spec.names))
    sec = np.median([results[(method, s)]['seconds_per_epoch'] for s in seeds])
    # Two decimals for percentages, three for errors in their own units.
    ours = ' | '.join(f'{m:.2f} ± {s:.2f}' if pct else f'{m:.3f} ± {s:.3f}'
                      for m, s, pct in zip(v.mean(0), v.std(0), directions))
    lines.append(f'| {labels.get(method, method)} | {family(method)} | {ours} '
                 f'| {dm} | {pvals} | {sec:.1f} |')
  return lines


def machine() -> str:
  return (f'{platform.machine()}, {os.cpu_count()} CPUs, '
          f'{jax.devices()[0].platform}; jax {jax.__version__}')
