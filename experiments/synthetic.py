"""A short MGDA-UB training run on a synthetic two-task regression problem.

Two regression targets share an input: ``y_1 = sin(3 x . u)`` and ``y_2 =
cos(3 x . v) + 0.5 x . u``, with ``u`` and ``v`` random directions. An MLP
encoder produces a shared representation ``Z`` and each task has a linear
head. The whole step (forward, per-task VJP at ``Z``, min-norm solve,
pull-back, SGD with momentum) is one jitted XLA program.

    python -m experiments.synthetic --steps 300 --method mgda_ub
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import optax

import mgda_jax


def make_data(key, n_train, n_test, dim):
  """Train and test splits of the same two tasks."""
  k1, k2, k3 = jax.random.split(key, 3)
  u = jax.random.normal(k1, (dim,)) / jnp.sqrt(dim)
  v = jax.random.normal(k2, (dim,)) / jnp.sqrt(dim)
  x = jax.random.normal(k3, (n_train + n_test, dim))
  y = jnp.stack([jnp.sin(3 * x @ u), jnp.cos(3 * x @ v) + 0.5 * x @ u], 1)
  return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def init_params(key, dim, hidden, rep):
  k1, k2, k3 = jax.random.split(key, 3)
  glorot = jax.nn.initializers.glorot_normal()
  return {
      'encoder': {'w1': glorot(k1, (dim, hidden)), 'b1': jnp.zeros(hidden),
                  'w2': glorot(k2, (hidden, rep)), 'b2': jnp.zeros(rep)},
      'heads': {'w': glorot(k3, (2, rep)), 'b': jnp.zeros(2)},
  }


def encode(params, x, y):
  del y
  p = params['encoder']
  h = jax.nn.relu(x @ p['w1'] + p['b1'])
  return jax.nn.relu(h @ p['w2'] + p['b2'])


def task_losses(params, z, x, y):
  del x
  p = params['heads']
  pred = z @ p['w'].T + p['b']
  return jnp.mean((pred - y) ** 2, axis=0)  # (2,): one loss per task


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--method', choices=['mgda_ub', 'mgda', 'uniform'],
                      default='mgda_ub')
  parser.add_argument('--lr', type=float, default=0.05)
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)

  key = jax.random.PRNGKey(args.seed)
  kd, kp = jax.random.split(key)
  (x, y), (x_test, y_test) = make_data(kd, 8192, 2048, 16)
  params = init_params(kp, 16, 64, 32)

  sgd = optax.sgd(args.lr, momentum=0.9)
  if args.method == 'mgda_ub':
    tx = optax.chain(mgda_jax.mgda_ub(2), sgd)
  elif args.method == 'mgda':
    shared = {'encoder': jax.tree.map(lambda _: True, params['encoder']),
              'heads': jax.tree.map(lambda _: False, params['heads'])}
    tx = optax.chain(mgda_jax.mgda(2, shared=shared), sgd)
  else:
    tx = optax.chain(optax.identity(), sgd)
  opt_state = tx.init(params)

  def all_losses(params, x, y):
    return task_losses(params, encode(params, x, y), x, y)

  @jax.jit
  def train_step(params, opt_state, x, y):
    if args.method == 'mgda_ub':
      losses, grads = mgda_jax.representation_grads(encode, task_losses,
                                                    params, x, y)
    elif args.method == 'mgda':
      losses, grads = mgda_jax.per_task_grads(all_losses, params, x, y)
    else:
      losses, grads = jax.value_and_grad(
          lambda p: jnp.sum(all_losses(p, x, y)), has_aux=False)(params)
      losses = all_losses(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, losses=losses)
    return optax.apply_updates(params, updates), opt_state, losses

  n = x.shape[0]
  start = time.perf_counter()
  for step in range(args.steps):
    idx = jax.random.permutation(jax.random.fold_in(key, step), n)[:args.batch]
    params, opt_state, losses = train_step(params, opt_state, x[idx], y[idx])
    if step % 50 == 0 or step == args.steps - 1:
      line = {'step': step, 'loss_1': float(losses[0]),
              'loss_2': float(losses[1])}
      if args.method != 'uniform':
        info = opt_state[0].info
        line.update(alpha=[round(float(a), 4) for a in info.weights],
                    solver_gap=float(info.gap),
                    converged=bool(info.converged))
      print(json.dumps(line))
  test = all_losses(params, x_test, y_test)
  print(json.dumps({'method': args.method, 'steps': args.steps,
                    'seconds': round(time.perf_counter() - start, 2),
                    'test_loss_1': float(test[0]),
                    'test_loss_2': float(test[1])}))


if __name__ == '__main__':
  main()
