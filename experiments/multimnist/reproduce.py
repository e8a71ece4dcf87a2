"""Reproduce Table 2 of Sener & Koltun (2018): all methods, several seeds.

    python -m experiments.multimnist.reproduce --epochs 100 --seeds 0 1 2 \\
        --mnist-dir ../shared/data/mnist

Each (method, seed) run is an ordinary training run with its own workdir
under ``--runs``, so an interrupted reproduction resumes where it stopped
(finished runs are read back, unfinished ones resume from their checkpoint).
Then it writes

* ``docs/RESULTS.md``: left and right test accuracy (mean +- std over
  seeds, best-validation epoch) beside the paper's Table 2, with the number
  of epochs actually run and the seconds per epoch;
* ``docs/multimnist_curves.png``: validation accuracy per epoch, per method;
* ``docs/multimnist_tradeoff.png``: left against right test accuracy per
  method and seed.
"""

import argparse
import json
import os
import platform

import jax
import numpy as np

from experiments.multimnist import train
from experiments.multimnist.configs import default

# Sener & Koltun (2018), Table 2: MultiMNIST left / right accuracy (%).
PAPER = {
    'single_task': (97.23, 95.90),
    'uniform': (96.46, 94.99),
    'kendall': (96.47, 95.29),
    'gradnorm': (96.27, 94.84),
    'mgda_ub': (97.26, 95.90),
}
LABELS = {
    'single_task': 'Single task',
    'uniform': 'Uniform scaling',
    'kendall': 'Kendall et al. 2018',
    'gradnorm': 'GradNorm',
    'mgda_ub': 'MGDA-UB (ours)',
    'mgda': 'MGDA (full)',
    'initial_loss': 'Initial loss',
    'prior_loss': 'Prior loss',
    'realtime_loss': 'Real-time loss (GLS)',
    'dwa': 'DWA',
    'dtp': 'DTP',
    'lbtw': 'LBTW',
    'rlw': 'RLW',
    'famo': 'FAMO',
    'gradient_normalization': 'Grad-norm normalisation',
    'pcgrad': 'PCGrad',
    'graddrop': 'GradDrop',
    'gradvac': 'GradVac',
    'cagrad': 'CAGrad',
    'imtl_g': 'IMTL-G',
    'nash_mtl': 'Nash-MTL',
    'aligned_mtl': 'Aligned-MTL',
    'upgrad': 'UPGrad',
    'dualproj': 'DualProj',
}
FAMILY = {m: 'loss' for m in (
    'uniform', 'kendall', 'initial_loss', 'prior_loss', 'realtime_loss',
    'dwa', 'dtp', 'lbtw', 'rlw', 'famo')}
FAMILY.update({m: 'gradient' for m in (
    'mgda_ub', 'mgda', 'gradnorm', 'gradient_normalization', 'pcgrad',
    'graddrop', 'gradvac', 'cagrad', 'imtl_g', 'nash_mtl', 'aligned_mtl',
    'upgrad', 'dualproj')})
FAMILY['single_task'] = 'baseline'


def delta_m(left, right, base_left, base_right):
  """Delta_m (%) of Navon et al. (2022): the mean relative drop.

  (LibMTL's Delta_p is the same quantity with the opposite sign.)

  ``(1/K) sum_k (-1)^{d_k} (M_k - M_base,k) / M_base,k`` with ``d_k = 1`` for
  higher-is-better metrics (accuracy): lower is better, negative beats the
  single-task baseline.
  """
  return 100 * np.mean([-(left - base_left) / base_left,
                        -(right - base_right) / base_right])


def run_all(methods, seeds, epochs, runs_dir, overrides):
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
      config = default.get_config(method=method, seed=seed, epochs=epochs,
                                  **overrides)
      print(f'== {method}, seed {seed}, {epochs} epochs', flush=True)
      results[(method, seed)] = train.train_and_evaluate(config, workdir)
  return results


def _curves(runs_dir, method, seed):
  """Validation accuracy per epoch (mean over tasks' runs for single_task)."""
  base = os.path.join(runs_dir, f'{method}-seed{seed}')
  paths = ([os.path.join(base, t, 'metrics.jsonl') for t in ('left', 'right')]
           if method == 'single_task' else
           [os.path.join(base, 'metrics.jsonl')])
  per_file = []
  for p in paths:
    with open(p) as f:
      per_file.append([json.loads(l)['val_acc'] for l in f])
  if method == 'single_task':
    return np.array([[l[0], r[0]] for l, r in zip(*per_file)])
  return np.array(per_file[0])


def write_plots(results, runs_dir, methods, seeds, out_dir):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  palette = (list(plt.get_cmap('tab20').colors) +
             list(plt.get_cmap('tab20b').colors))
  fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
  for j, method in enumerate(methods):
    curves = np.stack([_curves(runs_dir, method, s) for s in seeds])
    mean = 100 * curves.mean(0)
    epochs = np.arange(1, mean.shape[0] + 1)
    for i, ax in enumerate(axes):
      ax.plot(epochs, mean[:, i], label=LABELS[method],
              color=palette[j % len(palette)])
  for i, ax in enumerate(axes):
    ax.set_title(f"{('Left', 'Right')[i]} digit: validation accuracy "
                 f'(mean of {len(seeds)} seeds)')
    ax.set_xlabel('epoch')
    ax.grid(alpha=0.3)
  axes[0].set_ylabel('accuracy (%)')
  axes[1].legend(loc='lower right', fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, 'multimnist_curves.png'), dpi=120)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(9, 7))
  markers = {'baseline': '*', 'loss': 'o', 'gradient': 's'}
  for i, method in enumerate(methods):
    pts = 100 * np.array([[results[(method, s)]['test_acc_left'],
                           results[(method, s)]['test_acc_right']]
                          for s in seeds])
    color = palette[i % len(palette)]
    ax.scatter(pts[:, 0], pts[:, 1], color=color, alpha=0.35, s=12,
               marker=markers[FAMILY.get(method, 'loss')])
    mean = pts.mean(0)
    ax.scatter(*mean, color=color, s=60, edgecolor='k',
               marker=markers[FAMILY.get(method, 'loss')],
               label=LABELS[method])
    ax.annotate(LABELS[method], mean, fontsize=6, xytext=(3, 3),
                textcoords='offset points')
  ax.set_xlabel('left digit test accuracy (%)')
  ax.set_ylabel('right digit test accuracy (%)')
  ax.set_title(f'MultiMNIST trade-off: mean (large) and each seed (small); '
               f'circles: loss weightings, squares: gradient methods',
               fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2, loc='lower right')
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, 'multimnist_tradeoff.png'), dpi=120)
  plt.close(fig)


def write_table(results, methods, seeds, epochs, path, note):
  lines = [
      '# MultiMNIST results',
      '',
      'Generated by `make reproduce-multimnist` '
      '(`python -m experiments.multimnist.reproduce`). Test accuracy (%) of '
      'the epoch with the best mean validation accuracy, mean ± std over '
      f'seeds {list(seeds)}, beside Sener & Koltun (2018), Table 2.',
      '',
      f'**Epochs: {epochs}** per run (the paper trained 100).'
      + (f' {note}' if note else ''),
      '',
      f'Machine: {platform.machine()}, {os.cpu_count()} CPUs, '
      f'{jax.devices()[0].platform}; jax {jax.__version__}.',
      '',
      'Δm (%) is the mean relative accuracy drop against single-task '
      'training over the two digits (Navon et al. 2022; LibMTL reports the '
      'same quantity with the opposite sign): lower is better, negative '
      'beats single task. Seconds per epoch are '
      'the median over seeds, all on this machine.',
      '',
      '| method | family | left (ours) | right (ours) | Δm (%) ↓ '
      '| left (paper) | right (paper) | s / epoch |',
      '| --- | --- | --- | --- | --- | --- | --- | --- |',
  ]
  base = None
  if 'single_task' in methods:
    rs = [results[('single_task', s)] for s in seeds]
    base = (np.mean([r['test_acc_left'] for r in rs]),
            np.mean([r['test_acc_right'] for r in rs]))
  for method in methods:
    rs = [results[(method, s)] for s in seeds]
    left = 100 * np.array([r['test_acc_left'] for r in rs])
    right = 100 * np.array([r['test_acc_right'] for r in rs])
    paper = [f'{p:.2f}' for p in PAPER[method]] if method in PAPER else [
        '–', '–']
    sec = np.median([r['seconds_per_epoch'] for r in rs])
    dm = ('–' if base is None else
          f'{delta_m(left.mean() / 100, right.mean() / 100, *base):+.2f}')
    lines.append(
        f'| {LABELS[method]} | {FAMILY.get(method, "")} | '
        f'{left.mean():.2f} ± {left.std():.2f} | '
        f'{right.mean():.2f} ± {right.std():.2f} | {dm} | '
        f'{paper[0]} | {paper[1]} | '
        f'{sec:.1f} |')
  lines += [
      '',
      'Single task trains one network per digit; its seconds per epoch are '
      'the sum of both. Data: seeded pairing, a 50k/10k train/validation '
      'split (the paper selected on the test set), 10k test.',
      '',
      '![validation curves](multimnist_curves.png)',
      '',
      '![trade-off](multimnist_tradeoff.png)',
      '',
  ]
  with open(path, 'w') as f:
    f.write('\n'.join(lines))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--methods', nargs='+',
                 default=['single_task'] + [m for m in default.METHODS
                                            if m != 'single_task'])
  p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
  p.add_argument('--epochs', type=int, default=100)
  p.add_argument('--runs', default='runs/reproduce-multimnist')
  p.add_argument('--out', default='docs')
  p.add_argument('--mnist-dir', default=None)
  p.add_argument('--tfds-data-dir', default=None)
  p.add_argument('--note', default='')
  args = p.parse_args(argv)
  overrides = dict(mnist_dir=args.mnist_dir, tfds_data_dir=args.tfds_data_dir)
  results = run_all(args.methods, args.seeds, args.epochs, args.runs,
                    overrides)
  os.makedirs(args.out, exist_ok=True)
  write_table(results, args.methods, args.seeds, args.epochs,
              os.path.join(args.out, 'RESULTS.md'), args.note)
  write_plots(results, args.runs, args.methods, args.seeds, args.out)
  print(f'wrote {args.out}/RESULTS.md and plots')


if __name__ == '__main__':
  main()

