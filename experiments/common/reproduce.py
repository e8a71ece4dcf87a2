"""The reproduction driver: methods x seeds, resumable; a table and plots.

Each (method, seed) run is an ordinary training run with its own workdir
under ``runs_dir``, so an interrupted reproduction resumes where it stopped
(finished runs are read back, unfinished ones resume from their checkpoint).
Generic over tasks and metrics: the table reports the task spec's
``table_metric`` per task (mean ± std over seeds) beside a paper's figures,
and Δm against single-task training where it was run.

**Archive.** A long reproduction (MultiMNIST's 100-epoch table is about 13
CPU-hours on a 2-core machine) may outlive the machine it started on. With
``archive=DIR``, every finished run's records (``final.json``,
``config.json``, ``metrics.jsonl``, and those of each single-task
sub-run; no checkpoints) are copied to ``DIR/<method>-seed<seed>/``, and a
run found finished there is restored into ``runs_dir`` instead of being
trained again. The records are small text files that can be kept under
version control, so the table can be grown over several sittings on
different machines and rebuilt from them (``--table-only``-style: a run
that is in the archive is never retrained).
"""

import json
import os
import platform
import shutil
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from experiments.common import config as config_lib
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


RECORDS = ('final.json', 'config.json', 'metrics.jsonl')


def run_records(workdir: str) -> list[str]:
  """A run's records, as paths relative to ``workdir`` (no checkpoints or
  TensorBoard files; single-task runs keep theirs per task)."""
  out = []
  for root, dirs, files in os.walk(workdir):
    dirs[:] = sorted(d for d in dirs if d not in ('checkpoints',
                                                  'tensorboard'))
    out += [os.path.relpath(os.path.join(root, f), workdir)
            for f in sorted(files) if f in RECORDS]
  return out


def _copy_records(src: str, dst: str) -> None:
  """Copies a run's records, ``final.json`` last: an interrupted copy never
  looks finished."""
  rels = sorted(run_records(src), key=lambda r: r == 'final.json')
  for rel in rels:
    os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
    shutil.copyfile(os.path.join(src, rel), os.path.join(dst, rel))


def _restore(src: str, dst: str, log) -> None:
  """The archived run ``src`` into ``dst``; an unfinished run there (its
  checkpoints would be resumed by a later, longer run) is moved aside."""
  if os.path.exists(dst):
    n = 1
    while os.path.exists(f'{dst}.replaced-{n}'):
      n += 1
    os.replace(dst, f'{dst}.replaced-{n}')
    log(f'   (the unfinished run in {dst} is kept as {dst}.replaced-{n})')
  _copy_records(src, dst)


def _archived_config(path: str) -> dict | None:
  """The flattened config of an archived run (a single-task run: its first
  task's, without ``tasks``), or None."""
  for rel in ('config.json', *sorted(
      r for r in run_records(path) if r.endswith('/config.json'))):
    if os.path.exists(os.path.join(path, rel)):
      with open(os.path.join(path, rel)) as f:
        return json.load(f)
  return None


def _same_config(archived: dict | None, config) -> bool:
  """Whether an archived run was trained with ``config`` (up to the fields
  a resume may change: epochs, data locations; and ``tasks``, which a
  single-task run sets per task)."""
  if archived is None:
    return False
  ignore = set(config_lib.RESUMABLE_CHANGES) | {'tasks'}
  new = config_lib.flatten(config)
  for k, default in config_lib.ADDED_FIELDS.items():
    archived.setdefault(k, default)
  return all(archived.get(k, '<absent>') == new.get(k, '<absent>')
             for k in set(archived) | set(new) if k not in ignore)


def _finished(workdir: str, epochs: int) -> dict | None:
  """The run's ``final.json`` if it finished ``epochs`` epochs, else None."""
  final = os.path.join(workdir, 'final.json')
  if not os.path.exists(final):
    return None
  with open(final) as f:
    r = json.load(f)
  return r if r.get('epochs') == epochs else None


def run_all(experiment: trainer.Experiment, methods: Sequence[str],
            seeds: Sequence[int], epochs: int, runs_dir: str,
            overrides: Mapping[str, Any] = (), log=print,
            choose=None, archive: str | None = None,
            train: bool = True) -> dict:
  """Trains (or reads back) every (method, seed); returns their results.

  ``choose``: ``config -> Experiment``, called on each run's config after
  the overrides (e.g. MultiMNIST's ``experiment_for``: the architecture is a
  config field); ``experiment`` then only gives the default config.
  ``archive``: a folder of finished runs' records (module docstring): runs
  found there are restored, not trained; runs finished here are added.
  ``train=False``: nothing is trained; only finished runs are returned
  (:func:`missing_runs` names the others), for a table of what exists.
  """
  results = {}
  for method in methods:
    for seed in seeds:
      name = f'{method}-seed{seed}'
      workdir = os.path.join(runs_dir, name)
      config = make_config(experiment, method, seed, epochs, overrides)
      kept = os.path.join(archive, name) if archive else None
      if kept and _finished(kept, epochs):
        if not _same_config(_archived_config(kept), config):
          log(f'== {method}, seed {seed}: the run in {kept} has another '
              'config; not used, not replaced')
          kept = None
        elif not _finished(workdir, epochs):
          log(f'== {method}, seed {seed}: restored from {archive}')
          _restore(kept, workdir, log)
      if train:
        results[(method, seed)] = _run_one(experiment, config, workdir, log,
                                           choose)
      elif _finished(workdir, epochs) is not None:
        results[(method, seed)] = _finished(workdir, epochs)
      else:
        continue
      if (kept and not _finished(kept, epochs) and
          _same_config(_archived_config(workdir), config)):
        _copy_records(workdir, kept)
  return results


def missing_runs(results, methods, seeds) -> list[str]:
  """``method-seed<s>`` of every run not in ``results``."""
  return [f'{m}-seed{s}' for m in methods for s in seeds
          if (m, s) not in results]


def make_config(experiment, method, seed, epochs, overrides):
  """The default config with ``method``, ``seed``, ``epochs`` and the
  ``overrides`` (``{'a.b': value}``) set."""
  config = experiment.default_config()
  config.method, config.seed, config.epochs = method, seed, epochs
  for k, v in dict(overrides).items():
    set_field(config, k, v)
  return config


def _run_one(experiment, config, workdir, log, choose):
  """One run: read back if finished, else trained (resumed)."""
  done = _finished(workdir, config.epochs)
  if done is not None:
    return done
  log(f'== {config.method}, seed {config.seed}, {config.epochs} epochs')
  return trainer.train_and_evaluate(
      experiment if choose is None else choose(config), config, workdir,
      log=log)


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


def _seeds_of(results, method, seeds) -> list[int]:
  """The seeds of ``method`` that have a result."""
  return [s for s in seeds if (method, s) in results]


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
  methods = [m for m in methods if _seeds_of(results, m, seeds)]
  fig, axes = plt.subplots(1, k, figsize=(6 * k, 5), squeeze=False)
  for j, method in enumerate(methods):
    curves = [_curves(runs_dir, spec, method, s, metric.name)
              for s in _seeds_of(results, method, seeds)]
    n = min(len(c) for c in curves)
    mean = scale * np.mean([c[:n] for c in curves], 0)
    for i, ax in enumerate(axes[0]):
      ax.plot(np.arange(1, n + 1), mean[:, i], label=labels.get(method, method),
              color=palette[j % len(palette)])
  for i, ax in enumerate(axes[0]):
    ax.set_title(f'{spec.names[i]}: validation {metric.label or metric.name} '
                 f'(mean over seeds)')
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
         for s in _seeds_of(results, method, seeds)])
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
  figures and seconds per epoch.

  A method with results for fewer than ``len(seeds)`` seeds (a partial
  reproduction) shows its count, ``(n = 2)``; with one seed, no std.
  Methods without any result are left out.
  """
  metric = spec.metric(spec.table_metric)
  directions = metric.directions(len(spec.names))
  # Percentages for higher-is-better metrics (accuracy, mIoU), as papers
  # report them; errors in their own units.
  scale = np.where(directions, 100, 1)
  cols = ' | '.join(f'{n} (ours)' for n in spec.names)
  pcols = ' | '.join(f'{n} (paper)' for n in spec.names)
  lines = [f'| method | family | {cols} | Δm (%) ↓ | {pcols} | s / epoch |',
           '| --- ' * (4 + 2 * len(spec.names)) + '|']

  methods = [m for m in methods if _seeds_of(results, m, seeds)]

  def values(method):
    rs = [results[(method, s)] for s in _seeds_of(results, method, seeds)]
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
    sec = np.median([results[(method, s)]['seconds_per_epoch']
                     for s in _seeds_of(results, method, seeds)])
    n = len(v)
    # Two decimals for percentages, three for errors in their own units.
    digits = [2 if pct else 3 for pct in directions]
    ours = ' | '.join(
        (f'{m:.{d}f} ± {s:.{d}f}' if n > 1 else f'{m:.{d}f}') +
        (f' (n = {n})' if n < len(seeds) else '')
        for m, s, d in zip(v.mean(0), v.std(0), digits))
    lines.append(f'| {labels.get(method, method)} | {family(method)} | {ours} '
                 f'| {dm} | {pvals} | {sec:.1f} |')
  return lines


def machine() -> str:
  return (f'{platform.machine()}, {os.cpu_count()} CPUs, '
          f'{jax.devices()[0].platform}; jax {jax.__version__}')
