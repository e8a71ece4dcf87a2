"""MultiMNIST training and evaluation (Sener & Koltun 2018, Table 2).

``train_and_evaluate(config, workdir)`` trains one method and returns the
final metrics of the best-validation epoch. Everything a step does is one
jitted XLA program: an epoch is a few calls of a ``lax.scan`` over chunks of
on-device batches (gathered from the device-resident training set), and
nothing leaves the device until the chunk ends. Per epoch it writes

* ``metrics.jsonl``: losses, accuracies, the task weights (MGDA's alpha) and
  the solver's gap and steps, seconds per epoch;
* TensorBoard event files (``tensorboardX``, no TensorFlow needed);
* an orbax checkpoint of parameters, optimizer state and PRNG key, from which
  an interrupted run resumes, losing nothing.
"""

import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from experiments.multimnist import input_pipeline
from experiments.multimnist import models
from experiments.multimnist.configs import default as default_config
import mgda_jax

TASK_NAMES = ('left', 'right')


# ----------------------------------------------------------------------------
# Methods


def _gradient_methods(config, k, seed):
  """The Gram-matrix gradient methods, by name (they see per-task grads)."""
  return {
      'pcgrad': lambda: mgda_jax.pcgrad(k, key=seed),
      'graddrop': lambda: mgda_jax.graddrop(k, key=seed),
      'gradvac': lambda: mgda_jax.gradvac(k, beta=config.gradvac_beta,
                                          key=seed),
      'cagrad': lambda: mgda_jax.cagrad(k, c=config.cagrad_c),
      'imtl_g': lambda: mgda_jax.imtl_g(k),
      'nash_mtl': lambda: mgda_jax.nash_mtl(k, normalize=True),  # as in RESULTS.md
      'aligned_mtl': lambda: mgda_jax.aligned_mtl(k),
      'upgrad': lambda: mgda_jax.upgrad(k),
      'dualproj': lambda: mgda_jax.dualproj(k),
      # 'mean': unit weights at Z diverge at this learning rate
      # (docs/RESULTS.md, gradient_normalization's docstring).
      'gradient_normalization': lambda: mgda_jax.gradient_normalization(
          k, scale='mean'),
  }


def _loss_methods(config, k, seed, steps_per_epoch):
  """The loss weightings, by name (they see the losses, or KPIs)."""
  return {
      'uniform': lambda: mgda_jax.uniform_weighting(k),
      'single_task': lambda: mgda_jax.uniform_weighting(k),
      'initial_loss': lambda: mgda_jax.initial_loss_weighting(k),
      # MultiMNIST's ten classes are balanced: the prior is log 10 for both
      # digits (the class frequencies of the training labels).
      'prior_loss': lambda: mgda_jax.prior_loss_weighting(
          jnp.full((k,), jnp.log(10.0))),
      'realtime_loss': lambda: mgda_jax.realtime_loss_weighting(k),
      'kendall': lambda: mgda_jax.uncertainty_weighting(
          k, learning_rate=config.kendall_lr, momentum=config.momentum),
      'gradnorm': lambda: mgda_jax.gradnorm(
          k, alpha=config.gradnorm_alpha, learning_rate=config.gradnorm_lr),
      'dwa': lambda: mgda_jax.dwa(k, temperature=config.dwa_temperature,
                                  steps_per_epoch=steps_per_epoch),
      'dtp': lambda: mgda_jax.dtp(k, gamma=config.dtp_gamma),
      'lbtw': lambda: mgda_jax.lbtw(k, alpha=config.lbtw_alpha),
      'rlw': lambda: mgda_jax.rlw(k, key=seed),
      'famo': lambda: mgda_jax.famo(k, learning_rate=config.famo_lr,
                                    weight_decay=config.famo_decay),
  }


def make_method(config: default_config.Config, num_tasks: int,
                steps_per_epoch: int = 1):
  """The optax transform of a method, and how its gradients are computed.

  Every method but full MGDA reads a :class:`mgda_jax.RepresentationGrads`
  (one forward pass, per-task gradients at Z, one pullback through the
  encoder): loss weightings weight the losses, gradient methods combine the
  gradients at Z and give the heads their own gradients, as MGDA-UB does.

  Returns:
    ``(tx, grad_kind, diagnostics)``: ``grad_kind`` is ``'representation'``
    or ``'parameters'`` (K backward passes; full MGDA), and
    ``diagnostics(opt_state)`` returns ``(weights, gap, steps)``.
  """
  # A step whose update is not finite (NaN/inf loss or gradients) is skipped,
  # not applied; it is counted in the epoch's metrics ('nonfinite_steps').
  # After 100 consecutive ones the NaN goes through and the run shows it.
  sgd = optax.apply_if_finite(
      optax.sgd(config.learning_rate, momentum=config.momentum),
      max_consecutive_errors=100)
  m = config.method
  seed = config.seed

  def solver_info(state):
    # Every method's state is a mgda_jax.MethodState: the last weights (NaN
    # for GradDrop) and the inner solve's certificate and steps.
    return state[0].weights, state[0].info.error, state[0].info.num_steps

  weights_only = solver_info

  if m == 'mgda_ub':
    tx = mgda_jax.mgda_ub(num_tasks, normalizer=config.normalizer)
    return optax.chain(tx, sgd), 'representation', solver_info
  if m == 'mgda':
    shared = lambda p: jax.tree_util.tree_map_with_path(
        lambda path, _: path[0].key == 'encoder', p)
    tx = mgda_jax.mgda(num_tasks, normalizer=config.normalizer, shared=shared)
    return optax.chain(tx, sgd), 'parameters', solver_info
  methods = {**_loss_methods(config, num_tasks, seed, steps_per_epoch),
             **_gradient_methods(config, num_tasks, seed)}
  if m not in methods:
    raise ValueError(f'unknown method {m!r}')
  return optax.chain(methods[m](), sgd), 'representation', weights_only


# ----------------------------------------------------------------------------
# Steps


def make_functions(config, graphdef_and_fns, tx, grad_kind, diagnostics,
                   batch_sharding=None):
  """The jitted chunk of training steps and the evaluation function.

  With ``batch_sharding`` (a ``NamedSharding`` over a ``'data'`` mesh axis)
  each batch is split over the devices and ``jax.jit`` partitions the step:
  the per-task gradients at Z stay on their devices, and XLA all-reduces
  the K x K Gram matrix and the parameter gradients, so every device solves
  the same problem and the step equals the one-device step.
  """
  _, encode, task_losses = graphdef_and_fns
  num_tasks = len(config.tasks)

  def all_losses(params, x, labels, key):
    z = encode(params, x, labels, key)
    return task_losses(params, z, x, labels, key)

  def train_step(params, opt_state, x, labels, key):
    if batch_sharding is not None:
      x = jax.lax.with_sharding_constraint(x, batch_sharding)
      labels = jax.lax.with_sharding_constraint(labels, batch_sharding)
    if grad_kind == 'representation':
      losses, grads = mgda_jax.representation_grads(
          encode, task_losses, params, x, labels, key, has_aux=True,
          per_task_z=num_tasks)
    else:
      losses, grads = mgda_jax.per_task_grads(all_losses, params, x, labels,
                                              key, has_aux=True)
    (losses, logits) = losses
    # Batch accuracy per task: the KPI of DTP (ignored by other methods).
    kpis = jnp.mean(jnp.argmax(logits, -1) == labels.T, axis=1)
    updates, opt_state = tx.update(grads, opt_state, params, losses=losses,
                                   kpis=kpis)
    params = optax.apply_updates(params, updates)
    weights, gap, steps = diagnostics(opt_state)
    return params, opt_state, (losses, weights, gap, steps)

  @jax.jit
  def train_chunk(params, opt_state, images, labels, batch_idx, key, step0):
    """``lax.scan`` over a ``(chunk, B)`` block of batch indices.

    A chunk of one step is a plain compiled step: on XLA:CPU this network's
    step runs about 6x slower inside a loop (``lax.scan`` or ``fori_loop``)
    than as a top-level program (BENCHMARKS.md), so on CPU an epoch is a
    Python loop over one compiled step; accelerators scan longer chunks.
    """
    if batch_idx.shape[0] == 1:
      params, opt_state, metrics = train_step(
          params, opt_state, images[batch_idx[0]], labels[batch_idx[0]],
          jax.random.fold_in(key, step0))
      return params, opt_state, jax.tree.map(lambda m: m[None], metrics)

    def body(carry, xs):
      params, opt_state = carry
      idx, i = xs
      k = jax.random.fold_in(key, step0 + i)
      params, opt_state, metrics = train_step(params, opt_state, images[idx],
                                              labels[idx], k)
      return (params, opt_state), metrics

    steps = jnp.arange(batch_idx.shape[0])
    (params, opt_state), metrics = jax.lax.scan(body, (params, opt_state),
                                                (batch_idx, steps))
    return params, opt_state, metrics

  @jax.jit
  def evaluate(params, images, labels):
    """Mean NLL and accuracy per task, dropout off, in fixed-size batches."""
    graphdef = graphdef_and_fns[0]
    n = images.shape[0]
    # A batch size dividing n, so that no example is left out.
    b = _largest_divisor_at_most(n, config.eval_batch_size)
    nb = n // b

    def body(_, xs):
      x, y = xs
      logits = nnx.merge(graphdef, params)(x, train=False)  # (K, B, C)
      nll = models.nll_per_task(logits, y) * x.shape[0]
      correct = jnp.sum(jnp.argmax(logits, -1) == y.T, axis=1)
      return None, (nll, correct)

    xs = (images[:nb * b].reshape(nb, b, *images.shape[1:]),
          labels[:nb * b].reshape(nb, b, -1))
    _, (nll, correct) = jax.lax.scan(body, None, xs)
    count = nb * b
    return jnp.sum(nll, 0) / count, jnp.sum(correct, 0) / count

  return train_chunk, evaluate


# ----------------------------------------------------------------------------
# Logging, checkpoints


class Logger:
  """JSONL and TensorBoard metrics; on resume, keeps only finished epochs."""

  def __init__(self, workdir: str, resume_epoch: int):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.records = []
    if os.path.exists(self.path):
      with open(self.path) as f:
        for line in f:
          try:
            rec = json.loads(line)
          except json.JSONDecodeError:
            continue  # a line cut short by the interruption
          if rec.get('epoch', 0) <= resume_epoch:
            self.records.append(rec)
    with open(self.path, 'w') as f:
      for rec in self.records:
        f.write(json.dumps(rec) + '\n')
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self.tb = SummaryWriter(os.path.join(workdir, 'tensorboard'),
                              purge_step=resume_epoch + 1)
    except ImportError:
      self.tb = None

  def write(self, record: dict[str, Any]):
    self.records.append(record)
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    if self.tb is not None:
      for name, value in record.items():
        values = value if isinstance(value, list) else [value]
        for i, v in enumerate(values):
          if isinstance(v, (int, float)) and name != 'epoch':
            tag = name if len(values) == 1 else f'{name}/{i}'
            self.tb.add_scalar(tag, v, record['epoch'])
      self.tb.flush()

  def close(self):
    if self.tb is not None:
      self.tb.close()


def _progress(epoch, epochs, done, total, start, stream=sys.stderr):
  width = 30
  filled = int(width * done / total)
  bar = '#' * filled + '.' * (width - filled)
  elapsed = time.perf_counter() - start
  stream.write(f'\repoch {epoch}/{epochs} [{bar}] {done}/{total} batches '
               f'{elapsed:5.1f}s')
  if done == total:
    stream.write('\n')
  stream.flush()


def _checkpointer(workdir):
  options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(
      workdir, 'checkpoints')), options=options)


# ----------------------------------------------------------------------------
# The run


def check_devices(config) -> int:
  """The number of devices ``config.devices`` asks for, or a ValueError."""
  n = config.devices or jax.device_count()
  if n > jax.device_count():
    raise ValueError(f'devices={n} but only {jax.device_count()} are '
                     'visible (on CPU, simulate more with XLA_FLAGS='
                     '--xla_force_host_platform_device_count=N).')
  if config.batch_size % n:
    raise ValueError(f'batch_size={config.batch_size} must be a multiple of '
                     f'devices={n}.')
  return n


def _data_parallel(config, log):
  """The batch sharding for ``config.devices`` > 1 devices, else None."""
  n = check_devices(config)
  if n == 1:
    return None
  mesh = jax.make_mesh((n,), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:n])
  log(f'data parallel over {n} devices ({jax.devices()[0].platform}): '
      f'{config.batch_size // n} examples per device per step')
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))


def _largest_divisor_at_most(n, k):
  return max(d for d in range(1, min(n, k) + 1) if n % d == 0)


def train_and_evaluate(config: default_config.Config, workdir: str,
                       data: input_pipeline.MultiMnist | None = None,
                       log: Callable[[str], None] = print) -> dict[str, Any]:
  """Trains one method; returns the best-validation epoch's test metrics."""
  config.validate()
  if config.method == 'single_task' and len(config.tasks) > 1:
    return _single_task(config, workdir, data, log)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(dataclasses.asdict(config), f, indent=1)
  if data is None:
    data = input_pipeline.load_multimnist(
        config.cache_dir, config.data_seed, mnist_dir=config.mnist_dir,
        tfds_data_dir=config.tfds_data_dir, log=log)
  tasks = list(config.tasks)
  names = [TASK_NAMES[t] for t in tasks]
  num_tasks = len(tasks)

  for split_name, split in zip(('train', 'val', 'test'), data):
    if not np.all(np.isfinite(split.images)):
      # Checked here because the network would not show it: XLA's max (in
      # ReLU and pooling) drops NaNs, so a bad image trains as a blank one.
      raise ValueError(f'the {split_name} images hold non-finite values; '
                       'rebuild the data (delete the MultiMNIST cache).')
  train = data.train
  if config.max_train_examples:
    train = input_pipeline.Split(train.images[:config.max_train_examples],
                                 train.labels[:config.max_train_examples])
  images = jnp.asarray(train.images)
  labels = jnp.asarray(train.labels[:, tasks])
  splits = {s: (jnp.asarray(getattr(data, s).images),
                jnp.asarray(getattr(data, s).labels[:, tasks]))
            for s in ('val', 'test')}
  n_batches = images.shape[0] // config.batch_size
  if n_batches == 0:
    raise ValueError(f'{images.shape[0]} training examples are fewer than one '
                     f'batch of {config.batch_size}.')
  requested = config.chunk or (1 if jax.default_backend() == 'cpu' else 15)
  chunk = _largest_divisor_at_most(n_batches, requested)

  key = jax.random.key(config.seed)
  init_key, data_key, step_key = jax.random.split(key, 3)
  model = models.MultiLeNet(names, 10, rngs=nnx.Rngs(
      int(jax.random.randint(init_key, (), 0, 2**31 - 1))))
  graphdef, params, encode, task_losses = models.functional(model)
  tx, grad_kind, diagnostics = make_method(config, num_tasks, n_batches)
  opt_state = tx.init(params)
  batch_sharding = _data_parallel(config, log)
  train_chunk, evaluate = make_functions(
      config, (graphdef, encode, task_losses), tx, grad_kind, diagnostics,
      batch_sharding)

  state = {'params': params, 'opt_state': opt_state,
           'epoch': jnp.zeros((), jnp.int32)}
  manager = _checkpointer(workdir)
  start_epoch = 0
  if manager.latest_step() is not None:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    state = manager.restore(manager.latest_step(),
                            args=ocp.args.StandardRestore(abstract))
    start_epoch = int(state['epoch'])
    log(f'resumed from the checkpoint of epoch {start_epoch} in {workdir}')
  logger = Logger(workdir, start_epoch)
  params, opt_state = state['params'], state['opt_state']
  if batch_sharding is not None:  # replicate the parameters and the data
    replicated = jax.sharding.NamedSharding(batch_sharding.mesh,
                                            jax.sharding.PartitionSpec())
    params, opt_state, images, labels, splits = jax.device_put(
        (params, opt_state, images, labels, splits), replicated)

  for epoch in range(start_epoch + 1, config.epochs + 1):
    perm = jax.random.permutation(jax.random.fold_in(data_key, epoch),
                                  images.shape[0])
    batch_idx = perm[:n_batches * config.batch_size].reshape(
        n_batches // chunk, chunk, config.batch_size)
    epoch_key = jax.random.fold_in(step_key, epoch)
    metrics = []
    start = time.perf_counter()
    for c in range(n_batches // chunk):
      params, opt_state, m = train_chunk(params, opt_state, images, labels,
                                         batch_idx[c], epoch_key, c * chunk)
      metrics.append(m)
      done = (c + 1) * chunk
      if done == n_batches or c % max(1, 15 // chunk) == 0:
        jax.block_until_ready(params)
        _progress(epoch, config.epochs, done, n_batches, start)
    seconds = time.perf_counter() - start
    losses, weights, gap, steps = (np.concatenate([np.asarray(m[i])
                                                   for m in metrics])
                                   for i in range(4))
    record = {'epoch': epoch, 'seconds': round(seconds, 3),
              'train_loss': losses.mean(0).tolist(),
              # null where a method has no task weights (GradDrop): JSON
              # has no NaN.
              'weights': [None if np.isnan(w) else w
                          for w in weights.mean(0).tolist()]}
    if not np.all(np.isnan(gap)):
      record['solver_gap'] = float(np.nanmean(gap))
      record['solver_steps'] = float(steps.mean())
    if not np.all(np.isfinite(losses)):
      record['nonfinite_steps'] = int(np.sum(~np.isfinite(losses).all(1)))
    for split, (x, y) in splits.items():
      nll, acc = evaluate(params, x, y)
      record[f'{split}_loss'] = np.asarray(nll).tolist()
      record[f'{split}_acc'] = np.asarray(acc).tolist()
    logger.write(record)
    log('  ' + ', '.join(
        f'{n} val {a:.4f} test {t:.4f}' for n, a, t in
        zip(names, record['val_acc'], record['test_acc'])) +
        f', weights {np.round(weights.mean(0), 3).tolist()}')
    state = {'params': params, 'opt_state': opt_state,
             'epoch': jnp.asarray(epoch, jnp.int32)}
    manager.save(epoch, args=ocp.args.StandardSave(state))
  manager.wait_until_finished()
  logger.close()
  return summarise(config, names, logger.records, workdir)


def summarise(config, names, records, workdir):
  """The best-validation epoch (mean accuracy over tasks) and its test figures."""
  if not records:
    raise RuntimeError(f'no finished epoch in {workdir}')
  best = max(records, key=lambda r: (np.mean(r['val_acc']), -r['epoch']))
  result = {'method': config.method, 'seed': config.seed,
            'epochs': config.epochs, 'best_epoch': best['epoch'],
            'seconds_per_epoch': float(np.median([r['seconds']
                                                  for r in records]))}
  for i, n in enumerate(names):
    result[f'val_acc_{n}'] = best['val_acc'][i]
    result[f'test_acc_{n}'] = best['test_acc'][i]
  with open(os.path.join(workdir, 'final.json'), 'w') as f:
    json.dump(result, f)
  return result


def _single_task(config, workdir, data, log):
  """A separate model per task; the results merged into one record."""
  merged = {'method': 'single_task', 'seed': config.seed,
            'epochs': config.epochs, 'best_epoch': {}, 'seconds_per_epoch': 0.0}
  for t in config.tasks:
    sub = dataclasses.replace(config, tasks=(t,))
    r = train_and_evaluate(sub, os.path.join(workdir, TASK_NAMES[t]), data,
                           log)
    name = TASK_NAMES[t]
    merged['best_epoch'][name] = r['best_epoch']
    merged[f'val_acc_{name}'] = r[f'val_acc_{name}']
    merged[f'test_acc_{name}'] = r[f'test_acc_{name}']
    merged['seconds_per_epoch'] += r['seconds_per_epoch']
  with open(os.path.join(workdir, 'final.json'), 'w') as f:
    json.dump(merged, f)
  return merged

