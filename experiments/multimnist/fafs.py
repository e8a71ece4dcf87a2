"""FAFS on MultiMNIST: grow a branched LeNet top-down (Lu et al. 2017).

    python -m experiments.multimnist.fafs --set data.mnist_dir=../shared/data/mnist

Starts from the thin network, every block of :mod:`.architectures` shared
(one head per digit), and runs :func:`mgda_jax.nn.fafs`: each round trains
the current network for ``--epochs-per-round`` epochs (summed losses, the
paper's objective; SGD 0.05, momentum 0.9, batch 256), measures the paper's
error-correlation affinity on ``--affinity-examples`` training images
(margin = 1 - the probability of the true digit), and widens the active
block where the grouping loss says so. Branching block ``l`` costs ``L_0
2^{p_l}`` with ``L_0 = 1/64`` and ``p_l`` the pooling layers above it
(2, 1, 0 for the two conv blocks and the dense block), the official code's
scale; ``--alpha`` is the separation weight (official default 1).

Prints, and writes to ``--out``, a JSON record: the groups as
``config.architecture.groups`` (for ``--config.architecture.name=branched``
and ``reproduce_architectures --groups``), and each round's affinity and
grouping losses. Departures from the paper, documented in
:mod:`mgda_jax.nn`'s FAFS module: no SOMP initialisation from a wide
pretrained network; the affinity from one pass over a training subset at
the end of each round (the official code keeps a running average over
training batches); the optimizer state restarts after each widening.
"""

import argparse
import json
import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.multimnist import architectures
from experiments.multimnist import reproduce as multimnist
from experiments.multimnist import train
import mgda_jax
import mgda_jax.nn as mnn

POOLS_ABOVE = (2, 1, 0)
UNIT_COST = 1 / 64


def groups_spec(groups) -> str:
  """``Branched.groups`` as ``config.architecture.groups``."""
  return '|'.join(','.join(''.join(str(t) for t in g) for g in layer)
                  for layer in groups)


def margins(model, x, y, batch=1000) -> np.ndarray:
  """``(N, K)``: 1 - the probability of the true class, per task."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def one(state, xb, yb):
    logits = architectures.stacked(nnx.merge(graphdef, state)(xb))  # K,B,C
    p = jax.nn.softmax(logits, -1)
    true = jnp.take_along_axis(p, yb.T[..., None], -1)[..., 0]      # K,B
    return 1.0 - true.T

  return np.concatenate([np.asarray(one(state, x[i:i + batch],
                                        y[i:i + batch]))
                         for i in range(0, len(x), batch)])


def trainer(x, y, config, epochs: int, affinity_examples: int, seed: int,
            difficult: list, log=print):
  """The ``train`` callback of :func:`mgda_jax.nn.fafs`; appends each
  round's fraction of difficult images per task to ``difficult``."""
  rng = np.random.default_rng(seed)
  k = y.shape[1]
  b = config.batch_size

  def train_round(model, rnd):
    fns = mnn.functional(model, architectures.loss_fn)
    tx = optax.chain(mgda_jax.uniform_weighting(k),
                     optax.sgd(config.optimizer.learning_rate,
                               momentum=config.optimizer.momentum))

    @jax.jit
    def step(params, opt_state, xb, yb):
      losses, grads, _, _ = mnn.task_gradients(
          fns, 'representation', params, fns.state, xb, yb, None)
      u, opt_state = tx.update(grads, opt_state, params, losses=losses)
      return optax.apply_updates(params, u), opt_state, losses

    params, opt_state = fns.params, tx.init(fns.params)
    for epoch in range(epochs):
      order = rng.permutation(len(x))
      for i in range(len(x) // b):
        idx = order[i * b:(i + 1) * b]
        params, opt_state, losses = step(params, opt_state, x[idx], y[idx])
      log(f'round {rnd}, epoch {epoch + 1}: groups {groups_spec(model.groups)}'
          f', last losses {np.round(np.asarray(losses), 3).tolist()}')
    model = nnx.merge(fns.graphdef, params, fns.state)
    sub = rng.choice(len(x), min(affinity_examples, len(x)), replace=False)
    m = margins(model, x[sub], y[sub])
    difficult.append((m >= m.mean(0)).mean(0))
    return model, mnn.error_affinity(m)

  return train_round


def search(config, *, alpha: float = 1.0, epochs_per_round: int = 1,
           affinity_examples: int = 10_000, log=print) -> dict:
  """Runs FAFS; returns ``{'groups', 'rounds': [...]}``."""
  data = train.load_data(config, log)
  x, y = (np.asarray(a) for a in data.train)
  if config.max_train_examples:
    x, y = x[:config.max_train_examples], y[:config.max_train_examples]
  names = train.TASKS.names
  thin = mnn.Branched([architectures.block(l) for l in range(3)],
                      {t: architectures.head(r) for t, r in
                       zip(names, [nnx.Rngs(config.seed + 1 + i)
                                   for i in range(len(names))])},
                      rngs=nnx.Rngs(config.seed))
  difficult = []
  model, rounds = mnn.fafs(
      thin, trainer(x, y, config, epochs_per_round, affinity_examples,
                    config.seed, difficult, log),
      alpha=alpha, branch_costs=[UNIT_COST * 2 ** p for p in POOLS_ABOVE])
  out = {'groups': groups_spec(model.groups), 'alpha': alpha,
         'epochs_per_round': epochs_per_round, 'rounds': []}
  for r, hard in zip(rounds, difficult):
    # Agreement expected of independent tasks: p_i p_j + (1-p_i)(1-p_j),
    # p_i the fraction of images difficult for task i.
    chance = hard[0] * hard[1] + (1 - hard[0]) * (1 - hard[1])
    out['rounds'].append({
        'layer': r.layer, 'affinity': np.round(r.affinity, 4).tolist(),
        'difficult': np.round(hard, 4).tolist(),
        'chance_affinity': round(float(chance), 4),
        'branches': [list(b) for b in r.branches],
        'losses': [[round(v, 5) for v in d.loss] for d in r.decisions],
        'groups': groups_spec(r.groups)})
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--alpha', type=float, default=1.0)
  p.add_argument('--epochs-per-round', type=int, default=1)
  p.add_argument('--affinity-examples', type=int, default=10_000)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--set', nargs='*', default=[], metavar='FIELD=VALUE',
                 help='config overrides, e.g. data.mnist_dir=DIR')
  p.add_argument('--out', default='runs/multimnist-fafs/fafs.json')
  args = p.parse_args(argv)
  config = train.EXPERIMENT.default_config()
  config.seed = args.seed
  for k, v in multimnist.parse_set(args.set).items():
    multimnist.reproduce.set_field(config, k, v)
  out = search(config, alpha=args.alpha,
               epochs_per_round=args.epochs_per_round,
               affinity_examples=args.affinity_examples)
  os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(out, f, indent=1)
  print(json.dumps(out))
  return out


if __name__ == '__main__':
  main()
