"""TAG's protocol (Fifty et al. 2021, Sec. 4) on any experiment.

1. Train all tasks in one network, recording the lookahead affinity every
   ``config.affinity.every`` steps (TAG), again with its first-order
   linearisation (``TAG-linearized``, no lookahead forward pass; with
   ``config.tag.linearized``), from the gradients at Z alone
   (``TAG-representation``, :func:`mgda_jax.tag.representation_affinity`;
   with ``config.tag.representation``), and with the gradients' cosine (CS);
   a run without any gives the plain training cost.
2. Train every task alone, and every pair (HOA's inputs, Standley et al.
   2020).
3. For each budget ``b``: select groups from TAG's, CS's and HOA's affinity
   (:func:`mgda_jax.tag.select_groups`), and draw random groupings (random
   partitions into ``b`` groups).
4. Train each selected group (each group's network once, whatever selected
   it) and report each task's test metric from its serving group.

Every network is one :func:`experiments.common.trainer.train_and_evaluate`
run in ``<workdir>/runs/<tasks>``, so an interrupted protocol resumes, and
its cost is the sum of the training seconds of the runs a method needs
(the evaluation passes are not counted).
"""

import itertools
import json
import os
from typing import Callable

import numpy as np

from experiments.common import trainer
from mgda_jax import tag

METHODS = ('TAG', 'TAG-linearized', 'TAG-representation', 'CS', 'HOA',
           'random')


def network_config(config, tasks, **affinity):
  """The config of one network: ``tasks``, the protocol section dropped."""
  sub = config.copy_and_resolve_references()
  with sub.unlocked():
    if 'tag' in sub:
      del sub['tag']
  sub.tasks = tuple(int(t) for t in sorted(tasks))
  sub.affinity.every = affinity.get('every', 0)
  sub.affinity.kind = affinity.get('kind', 'lookahead')
  return sub


def train_seconds(workdir: str) -> float:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return float(sum(json.loads(l)['seconds'] for l in f if l.strip()))


def random_partition(tasks, budget: int, rng) -> list[tuple[int, ...]]:
  """A uniformly shuffled split of ``tasks`` into ``budget`` non-empty
  groups of near-equal size."""
  order = list(rng.permutation(tasks))
  return [tuple(sorted(int(t) for t in order[i::budget]))
          for i in range(budget)]


def run_protocol(experiment: trainer.Experiment, config, workdir: str, *,
                 data=None, log: Callable[[str], None] = print) -> dict:
  """Runs (or resumes) the protocol; returns and writes ``tag.json``.

  Args:
    experiment: the dataset (its spec's ``table_metric`` is reported).
    config: the experiment's config with a ``tag`` section (``budgets``,
      ``random_draws``, ``pairs``); ``config.tasks`` the tasks studied.
    workdir: where every network's run and ``tag.json`` go.
    data: the splits (default: loaded once here).
    log: progress messages.

  Returns:
    ``{'tasks', 'affinity': {method: KxK}, 'networks': {name: {'test',
    'seconds'}}, 'results': [{'method', 'budget', 'draw', 'groups',
    'serving', 'score', 'exact', 'test' (per task), 'mean', 'seconds'}],
    'baselines': {...}, 'cost': {...}}``.
  """
  spec = experiment.tasks
  metric = spec.metric(spec.table_metric)
  tasks = tuple(config.tasks) or tuple(range(len(spec.names)))
  names = [spec.names[t] for t in tasks]
  k = len(tasks)
  if data is None:
    data = experiment.load_data(config, log)
  networks = {}

  def train(group, **affinity):
    suffix = f"-{affinity['kind']}" if affinity.get('every') else ''
    name = '-'.join(spec.names[t] for t in sorted(group)) + suffix
    if name in networks:
      return networks[name]
    wd = os.path.join(workdir, 'runs', name)
    log(f'[tag] network {name}')
    r = trainer.train_and_evaluate(
        experiment, network_config(config, group, **affinity), wd, data=data,
        log=lambda _: None)
    out = {split: {spec.names[t]: r[f'{split}_{metric.name}_{spec.names[t]}']
                   for t in group} for split in ('val', 'test')}
    out['seconds'] = train_seconds(wd)
    out['affinity'] = r.get('affinity')
    networks[name] = out
    return out

  every = config.affinity.every or 1
  plain = train(tasks)
  with_tag = train(tasks, every=every, kind='lookahead')
  with_cs = train(tasks, every=every, kind='cosine')
  singles = {t: train((t,)) for t in tasks}
  affinity = {'TAG': np.asarray(with_tag['affinity']),
              'CS': np.asarray(with_cs['affinity'])}
  stage_cost = {'TAG': with_tag['seconds'], 'CS': with_cs['seconds']}
  if config.tag.get('linearized', False):
    with_lin = train(tasks, every=every, kind='linearized')
    affinity['TAG-linearized'] = np.asarray(with_lin['affinity'])
    stage_cost['TAG-linearized'] = with_lin['seconds']
  if config.tag.get('representation', False):
    with_rep = train(tasks, every=every, kind='representation')
    affinity['TAG-representation'] = np.asarray(with_rep['affinity'])
    stage_cost['TAG-representation'] = with_rep['seconds']
  if config.tag.pairs:
    # HOA reads validation figures (the test split only reports).
    pair = np.zeros((k, k))
    pair_cost = 0.0
    for a, b in itertools.combinations(range(k), 2):
      r = train((tasks[a], tasks[b]))
      pair[a, b] = r['val'][names[b]]  # [i, j]: task j trained with i
      pair[b, a] = r['val'][names[a]]
      pair_cost += r['seconds']
    single_values = np.array([singles[t]['val'][names[i]]
                              for i, t in enumerate(tasks)])
    affinity['HOA'] = tag.hoa_affinity(pair, single_values,
                                       metric.higher_is_better)
    stage_cost['HOA'] = pair_cost + sum(s['seconds'] for s in singles.values())
  stage_cost['random'] = 0.0

  results = []

  def evaluate(method, budget, draw, groups, selection=None):
    trained = [train(tuple(tasks[i] for i in g)) for g in groups]
    # Each task from its serving group: the selection's; a random
    # partition's groups are disjoint, so its own.
    serving = (selection.serving if selection is not None else
               tuple(next(n for n, g in enumerate(groups) if i in g)
                     for i in range(k)))
    test = [trained[serving[i]]['test'][names[i]] for i in range(k)]
    results.append({
        'method': method, 'budget': budget, 'draw': draw,
        'groups': [[names[i] for i in g] for g in groups],
        'serving': list(serving),
        'score': None if selection is None else selection.score,
        'exact': None if selection is None else selection.exact,
        'test': dict(zip(names, test)), 'mean': float(np.mean(test)),
        'seconds': stage_cost[method] + sum(t['seconds'] for t in trained)})

  rng = np.random.default_rng(config.seed)
  for budget in config.tag.budgets:
    for method in METHODS[:-1]:
      if method not in affinity:
        continue
      sel = tag.select_groups(affinity[method], budget)
      evaluate(method, budget, 0, sel.groups, sel)
    for draw in range(config.tag.random_draws):
      evaluate('random', budget, draw,
               random_partition(range(k), min(budget, k), rng))

  per_network = np.mean([n['seconds'] for n in networks.values()])
  report = {
      'tasks': names, 'metric': metric.name,
      'affinity': {m: a.tolist() for m, a in affinity.items()},
      'networks': networks,
      'results': results,
      'baselines': {
          'all_in_one': {'test': plain['test'],
                         'mean': float(np.mean(list(plain['test'].values()))),
                         'seconds': plain['seconds']},
          'single_task': {
              'test': {names[i]: singles[t]['test'][names[i]]
                       for i, t in enumerate(tasks)},
              'mean': float(np.mean([singles[t]['test'][names[i]]
                                     for i, t in enumerate(tasks)])),
              'seconds': sum(s['seconds'] for s in singles.values())}},
      'cost': {
          'plain_all_in_one': plain['seconds'],
          'affinity_stage': stage_cost,
          'tag_overhead': with_tag['seconds'] / plain['seconds'],
          'cs_overhead': with_cs['seconds'] / plain['seconds'],
          'hoa_over_tag': (stage_cost['HOA'] / stage_cost['TAG']
                           if 'HOA' in stage_cost else None),
          # Estimated, not run: every one of the 2^K - 1 groups trained once
          # at the mean cost of the networks trained here.
          'exhaustive_estimate': (2 ** k - 1) * float(per_network),
      },
  }
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'tag.json'), 'w') as f:
    json.dump(report, f, indent=1)
  return report


def table(report: dict) -> str:
  """The results as a Markdown table: mean test metric over tasks, per
  method and budget (random: mean and range over the draws), and cost."""
  m = report['metric']
  lines = [f'| method | budget | groups | mean test {m} | CPU-s |',
           '| --- | ---: | --- | ---: | ---: |']
  base = report['baselines']
  lines.append(f"| all tasks in one network | 1 | all | "
               f"{100 * base['all_in_one']['mean']:.2f} | "
               f"{base['all_in_one']['seconds']:.0f} |")
  lines.append(f"| every task alone | {len(report['tasks'])} | singletons | "
               f"{100 * base['single_task']['mean']:.2f} | "
               f"{base['single_task']['seconds']:.0f} |")
  budgets = sorted({r['budget'] for r in report['results']})
  for b in budgets:
    for method in METHODS:
      rows = [r for r in report['results']
              if r['method'] == method and r['budget'] == b]
      if not rows:
        continue
      if method == 'random':
        means = [100 * r['mean'] for r in rows]
        lines.append(f"| random ({len(rows)} draws) | {b} | - | "
                     f"{np.mean(means):.2f} ({min(means):.2f}-"
                     f"{max(means):.2f}) | "
                     f"{np.mean([r['seconds'] for r in rows]):.0f} |")
      else:
        r = rows[0]
        groups = ' / '.join('{' + ', '.join(g) + '}' for g in r['groups'])
        lines.append(f"| {method} | {b} | {groups} | {100 * r['mean']:.2f} | "
                     f"{r['seconds']:.0f} |")
  return '\n'.join(lines)


def heatmap(report: dict, path: str, method: str = 'TAG') -> None:
  """A PNG of an affinity matrix (source rows, target columns)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  a = np.array(report['affinity'][method], dtype=float)
  np.fill_diagonal(a, np.nan)
  names = report['tasks']
  fig, ax = plt.subplots(figsize=(6.4, 5.4))
  lim = np.nanmax(np.abs(a))
  im = ax.imshow(a, cmap='RdBu', vmin=-lim, vmax=lim)
  ax.set_xticks(range(len(names)), names, rotation=45, ha='right')
  ax.set_yticks(range(len(names)), names)
  ax.set_xlabel('target task j (loss read)')
  ax.set_ylabel('source task i (step taken)')
  scale = ' (cells x1e3)' if method == 'TAG' else ''
  ax.set_title(f'{method} inter-task affinity Z(i -> j){scale}, '
               'diagonal omitted', fontsize=10)
  for i in range(len(names)):
    for j in range(len(names)):
      if i != j:
        ax.text(j, i, f'{a[i, j] * (1e3 if method == "TAG" else 1):.1f}',
                ha='center', va='center', fontsize=6)
  fig.colorbar(im, ax=ax)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
