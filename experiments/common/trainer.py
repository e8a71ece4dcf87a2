"""``train_and_evaluate(experiment, config, workdir)``: any dataset, any method.

Everything a step does is one jitted XLA program: an epoch is a few calls of
a ``lax.scan`` over chunks of on-device batches (gathered from the
device-resident training set, or on the host with ``config.input='host'``),
and nothing leaves the device until the chunk ends. Per epoch it writes

* ``metrics.jsonl``: losses, every evaluation metric per task and split, the
  method's task weights and its solver's certificate and steps, seconds;
* TensorBoard event files (``tensorboardX``, no TensorFlow needed);
* an orbax checkpoint of parameters, optimizer state and epoch, from which
  an interrupted run resumes, losing nothing (the data order and every key
  are functions of the seed and the epoch);
* with ``config.affinity.every > 0``, the epoch's mean inter-task affinity
  (TAG's lookahead, its linearisation, or the gradients' cosine; see
  :mod:`mgda_jax.tag`), computed inside the same jitted step as training;
  ``final.json`` then holds its average over epochs.

The run's ``config.json`` is checked on resume
(:func:`experiments.common.config.check_resume`).
"""

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, NamedTuple, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
from ml_collections import config_dict
import numpy as np
import optax
import orbax.checkpoint as ocp

from experiments.common import config as config_lib
from experiments.common import logs
from experiments.common import methods as methods_lib
from experiments.common import tasks as tasks_lib
import mgda_jax


class Splits(NamedTuple):
  """The data: each split an ``(inputs, labels)`` pair of host arrays.

  ``labels`` has one column per task of the spec, ``(N, K, ...)``, or is
  any pytree of arrays with a leading ``N`` (dense tasks: a dict keyed by
  task name), with the experiment's ``select_labels``.
  """

  train: tuple[np.ndarray, np.ndarray]
  val: tuple[np.ndarray, np.ndarray]
  test: tuple[np.ndarray, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Experiment:
  """What a dataset provides to the framework.

  Attributes:
    name: used in default workdirs, ``runs/<name>/<method>-seed<seed>``.
    default_config: ``() -> ConfigDict``, the dataset's ``configs/default``
      (method sections that differ from it must belong to the chosen
      method).
    tasks: the task spec (names, metrics, directions).
    load_data: ``(config, log) -> Splits``.
    make_model: ``(config, task_names, rngs) -> nnx.Module``.
    functional: ``model -> (graphdef, params, encode, task_losses)`` with
      ``encode(params, x, labels, key) -> Z`` and ``task_losses(params, z,
      x, labels, key) -> (losses (K,), outputs)``; given ``K`` copies of
      ``Z`` (the representation path: see ``z_copies``) head ``t`` must read
      only copy ``t``.
    eval_metrics: ``(graphdef, params, x, labels) -> {name: sums over the
      batch}``, in evaluation mode: each metric of the spec as a ``(K,)``
      sum, or any accumulators ``reduce_metrics`` turns into them.
    kpis: ``(outputs, labels) -> (K,)`` batch KPIs in ``[0, 1]`` (DTP's).
    method_args: ``(config, splits, tasks) -> {method: {arg: value}}``,
      dataset-specific arguments (e.g. ``prior_loss_weighting``'s
      ``priors``).
    shared: ``params -> bool mask`` of the shared parameters, for full
      MGDA (which runs on parameter gradients).
    stateful: the model has a state besides its parameters (BatchNorm
      statistics). Then ``functional`` returns ``(graphdef, params,
      model_state, encode, task_losses)`` with ``encode(params, model_state,
      x, labels, key) -> (Z, new_model_state)`` (the encoder runs once per
      step, so the statistics are updated once), and ``eval_metrics`` takes
      ``model_state`` as a fifth argument. The state is checkpointed with
      the parameters; TAG's lookahead reads batch statistics, as the
      official code does.
    select_labels: ``(labels, tasks) -> labels`` of the trained tasks
      (indices into the spec), on host arrays; the default takes the columns
      ``labels[:, tasks]``.
    regularizer: ``(config, model) -> optax transformation | None``, added
      to the method's update before the optimizer (MRN's tensor-normal
      prior); None by default.
    reduce_metrics: ``(sums, n, names) -> {metric: (K,)}``, the split's
      metrics from ``eval_metrics``' accumulators summed over all ``n``
      examples, for the trained tasks ``names`` (e.g. mIoU from summed
      intersections and unions); the default divides each sum by ``n``.
      A metric that does not apply to a task is NaN there (null in the
      records).
    z_copies: how ``task_losses`` receives the copies of ``Z`` on the
      representation path (``mgda_jax.representation_grads``' argument):
      ``'stacked'`` (every leaf ``(K, ...)``, for heads ``vmap``-ed over
      tasks, the default) or ``'tuple'`` (``K`` pytrees, for heads written
      as a loop over tasks, e.g. the ``mgda_jax.nn`` architectures).
    cpu_chunk: the steps per compiled call on CPU when ``config.chunk`` is
      0 (accelerators: 15). 1, a Python loop over one compiled step, unless
      the model's step is measured as fast inside ``lax.scan``: XLA:CPU runs
      some programs, e.g. JAX's transposed convolutions, much slower in a
      loop body than at the top level (BENCHMARKS.md, "Epoch structure on
      XLA:CPU").
  """

  name: str
  default_config: Callable[[], config_dict.ConfigDict]
  tasks: tasks_lib.TaskSpec
  load_data: Callable[..., Splits]
  make_model: Callable[..., nnx.Module]
  functional: Callable[..., tuple]
  eval_metrics: Callable[..., dict]
  kpis: Callable[..., jax.Array]
  method_args: Callable[..., dict] = lambda config, splits, tasks: {}
  shared: Callable[[Any], Any] = lambda params: (
      jax.tree_util.tree_map_with_path(
          lambda path, _: path[0].key == 'encoder', params))
  stateful: bool = False
  select_labels: Callable[[Any, Sequence[int]], Any] = (
      lambda labels, tasks: np.asarray(labels)[:, list(tasks)])
  reduce_metrics: Callable[[dict, int, Sequence[str]], dict] = (
      lambda sums, n, names: {k: v / n for k, v in sums.items()})
  regularizer: Callable[[config_dict.ConfigDict, Any], Any] = (
      lambda config, model: None)
  z_copies: str = 'stacked'
  cpu_chunk: int = 1


def split_model(experiment: Experiment, model):
  """``(graphdef, params, model_state, encode, task_losses, eval_metrics)``
  in the stateful form, whatever the experiment's (a stateless model's state
  is ``()``)."""
  if experiment.stateful:
    graphdef, params, state, encode, task_losses = experiment.functional(model)
    return graphdef, params, state, encode, task_losses, experiment.eval_metrics
  graphdef, params, encode, task_losses = experiment.functional(model)

  def stateful_encode(params, state, x, labels, key):
    return encode(params, x, labels, key), state

  def eval_metrics(graphdef, params, x, labels, state):
    del state
    return experiment.eval_metrics(graphdef, params, x, labels)

  return graphdef, params, (), stateful_encode, task_losses, eval_metrics


def largest_divisor_at_most(n: int, k: int) -> int:
  return max(d for d in range(1, min(n, k) + 1) if n % d == 0)


def check_devices(config) -> int:
  """The number of devices ``config.devices`` asks for, or a ValueError."""
  n = config.devices or jax.device_count()
  if n > jax.device_count():
    raise ValueError(f'config.devices={n} but only {jax.device_count()} are '
                     'visible (on CPU, simulate more with XLA_FLAGS='
                     '--xla_force_host_platform_device_count=N).')
  if config.batch_size % n:
    raise ValueError(f'config.batch_size={config.batch_size} must be a '
                     f'multiple of config.devices={n}.')
  if jax.process_count() > 1 and n != jax.device_count():
    raise ValueError(f'config.devices={config.devices}: a job of '
                     f'{jax.process_count()} processes trains on all '
                     f'{jax.device_count()} devices (config.devices=0).')
  return n


def initialize_distributed(coordinator_address=None, num_processes=None,
                           process_id=None) -> None:
  """``jax.distributed.initialize``, with CPU collectives (gloo) on CPU.

  Called before any other JAX call of the process. On a cluster (SLURM,
  Kubernetes, Cloud TPU, ...) JAX finds the arguments itself; on one
  machine give all three (a loopback coordinator, e.g. ``127.0.0.1:1234``).
  """
  # CPU devices of different processes talk through gloo (GPUs and TPUs
  # use their own collectives; the setting only concerns the CPU backend).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes,
                             process_id=process_id)


def is_primary() -> bool:
  """Whether this process writes the run's files (process 0 of a job)."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """A barrier across the processes of a multi-process job (else nothing)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def primary_first(fn: Callable[[], Any], name: str) -> Any:
  """``fn()`` on process 0, then on the others (one process: just ``fn()``).

  For a step that writes files the others read: config.json, the data
  cache, the trimmed metrics. An error in ``fn`` on one process leaves the
  others waiting at the barrier until the distributed runtime's own
  timeouts stop the job (JAX has no cross-process exceptions).
  """
  if not is_primary():
    sync(name)
  out = fn()
  if is_primary():
    sync(name)
  return out


def load_data(experiment: Experiment, config, log) -> Splits:
  """``experiment.load_data``: process 0 builds (and caches) the data first;
  the others then read its cache instead of writing the same files."""
  return primary_first(lambda: experiment.load_data(config, log),
                       'data ready')


def batch_sharding(config, log):
  """The batch sharding for ``config.devices`` > 1 devices, else None.

  A ``'data'`` mesh axis under ``jax.jit``; the parameters are replicated
  and XLA all-reduces the Gram matrix and the gradients, so every device
  solves the global problem and the step equals the one-device step.
  """
  n = check_devices(config)
  if n == 1:
    return None
  mesh = jax.make_mesh((n,), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:n])
  log(f'data parallel over {n} devices ({jax.devices()[0].platform}): '
      f'{config.batch_size // n} examples per device per step')
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))


def affinity_tracker(config):
  """``mgda_jax.tag.affinity_average`` for ``config.affinity``, or None."""
  if not config.affinity.every:
    return None
  return mgda_jax.tag.affinity_average(every=config.affinity.every)


def make_functions(experiment: Experiment, config, fns, method, num_tasks,
                   sharding=None, names=None):
  """The jitted chunk of training steps and the evaluation function."""
  graphdef, encode_with_state, task_losses, eval_metrics = fns
  names = tuple(experiment.tasks.names[:num_tasks]) if names is None else names
  tx = method.tx
  tracker = affinity_tracker(config)
  aff = config.affinity

  def track_affinity(track, mode, all_losses, params, opt_state, grads, losses,
                     x, labels, key):
    """TAG's affinity of this batch into the running average: ``mode``
    'add' (a due step), 'skip', or 'cond' (the schedule on the device)."""
    def affinity():
      if aff.kind == 'cosine':
        return mgda_jax.tag.cosine_affinity(grads, params,
                                            shared=experiment.shared)
      if aff.kind == 'representation':
        return mgda_jax.tag.representation_affinity(grads, losses)
      return mgda_jax.tag.lookahead_affinity(
          all_losses, params, x, labels, key, has_aux=True,
          optimizer=method.base, opt_state=method.base_state(opt_state),
          shared=experiment.shared, grads=grads, losses=losses,
          linearize=aff.kind == 'linearized',
          # vmap over the weights makes convolutions grouped: slow on CPU.
          unroll=jax.default_backend() == 'cpu',
          step_size=(config.optimizer.learning_rate if aff.divide_by_lr
                     else None)).affinity
    if mode == 'add':
      return tracker.add(track, affinity())
    if mode == 'skip':
      return tracker.skip(track)
    return tracker.update(track, affinity)

  def train_step(params, model_state, opt_state, track, x, labels, key,
                 mode):
    if sharding is not None:
      x = jax.lax.with_sharding_constraint(x, sharding)
      labels = jax.lax.with_sharding_constraint(labels, sharding)

    def encode(params, x, labels, key):
      return encode_with_state(params, model_state, x, labels, key)

    def all_losses(params, x, labels, key):
      z, _ = encode(params, x, labels, key)
      return task_losses(params, z, x, labels, key)

    if method.grad_kind == 'representation':
      losses, grads, model_state = mgda_jax.representation_grads(
          encode, task_losses, params, x, labels, key, has_aux=True,
          per_task_z=num_tasks, z_copies=experiment.z_copies,
          encoder_has_aux=True)
    else:
      def with_state(params, x, labels, key):
        z, new_state = encode(params, x, labels, key)
        losses, outputs = task_losses(params, z, x, labels, key)
        return losses, (outputs, new_state)
      (losses, (outputs, model_state)), grads = mgda_jax.per_task_grads(
          with_state, params, x, labels, key, has_aux=True)
      losses = (losses, outputs)
    losses, outputs = losses
    if tracker is not None:
      track = track_affinity(track, mode, all_losses, params, opt_state,
                             grads, losses, x, labels, key)
    kpis = experiment.kpis(outputs, labels)
    updates, opt_state = tx.update(grads, opt_state, params, losses=losses,
                                   kpis=kpis)
    params = optax.apply_updates(params, updates)
    weights, gap, steps = method.diagnostics(opt_state)
    return params, model_state, opt_state, track, (losses, weights, gap,
                                                   steps)

  @functools.partial(jax.jit, static_argnames='mode')
  def train_chunk(params, model_state, opt_state, track, inputs, labels,
                  batch_idx, key, step0, mode='none'):
    """``lax.scan`` over a ``(chunk, B)`` block of batch indices.

    ``inputs`` and ``labels`` are the training set, indexed here by
    ``batch_idx``; or, with ``batch_idx=None``, the chunk's batches
    themselves, gathered on the host (``(chunk, B, ...)``, see
    :func:`host_batches`).

    A chunk of one step is a plain compiled step: XLA:CPU runs some steps
    several times slower inside a loop (``lax.scan`` or ``fori_loop``) or a
    ``lax.cond`` than as a top-level program (BENCHMARKS.md), so on CPU an
    epoch is a Python loop over one compiled step unless the experiment
    says otherwise (``Experiment.cpu_chunk``); accelerators scan longer
    chunks. A one-step chunk takes the affinity schedule from the host
    (``mode`` 'add' or 'skip'); a longer chunk's steps use ``mode='cond'``
    (for MultiMNIST on CPU as fast as the host schedule, or faster).
    """
    if batch_idx is None:  # the batches themselves
      xs = (inputs, labels)
      def batch(b):
        return b
    else:  # indices into the training set on the devices
      xs = batch_idx
      def batch(idx):
        return inputs[idx], jax.tree.map(lambda l: l[idx], labels)
    n = jax.tree.leaves(xs)[0].shape[0]
    if n == 1:
      x, y = batch(jax.tree.map(lambda a: a[0], xs))
      *carry, metrics = train_step(
          params, model_state, opt_state, track, x, y,
          jax.random.fold_in(key, step0), mode)
      return (*carry, jax.tree.map(lambda m: m[None], metrics))

    def body(carry, xs):
      b, i = xs
      k = jax.random.fold_in(key, step0 + i)
      *carry, metrics = train_step(*carry, *batch(b), k, mode)
      return tuple(carry), metrics

    carry, metrics = jax.lax.scan(
        body, (params, model_state, opt_state, track), (xs, jnp.arange(n)))
    return (*carry, metrics)

  @jax.jit
  def evaluate(params, model_state, inputs, labels):
    """Every metric per task, averaged over the split, in fixed batches."""
    n = inputs.shape[0]
    # A batch size dividing n, so that no example is left out.
    b = largest_divisor_at_most(n, config.eval_batch_size)
    nb = n // b

    def body(_, xs):
      x, y = xs
      return None, eval_metrics(graphdef, params, x, y, model_state)

    def batched(a):
      return a[:nb * b].reshape(nb, b, *a.shape[1:])

    xs = (batched(inputs), jax.tree.map(batched, labels))
    _, sums = jax.lax.scan(body, None, xs)
    return experiment.reduce_metrics(
        {k: jnp.sum(v, 0) for k, v in sums.items()}, nb * b, names)

  return train_chunk, evaluate


def _checkpointer(workdir):
  options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(
      workdir, 'checkpoints')), options=options)


def _check_finite(splits: Splits):
  for name, (x, _) in zip(Splits._fields, splits):
    if np.issubdtype(np.asarray(x).dtype, np.floating) and not np.all(
        np.isfinite(x)):
      # Checked here because the network would not show it: XLA's max (in
      # ReLU and pooling) drops NaNs, so a bad input trains as a blank one.
      raise ValueError(f'the {name} inputs hold non-finite values; rebuild '
                       'the data (delete its cache).')


def train_and_evaluate(experiment: Experiment, config: config_dict.ConfigDict,
                       workdir: str, *, data: Splits | None = None,
                       force: bool = False,
                       log: Callable[[str], None] = print) -> dict[str, Any]:
  """Trains one method; returns the best-validation epoch's test metrics.

  Args:
    experiment: the dataset's parts.
    config: a config from :func:`experiments.common.config.base_config`.
    workdir: checkpoints, metrics and ``final.json``; an existing run there
      resumes.
    data: the splits (default: ``experiment.load_data``).
    force: resume even if the config differs from the saved one (the old
      ``config.json`` is kept).
    log: progress messages.

  Returns:
    ``{'method', 'seed', 'epochs', 'best_epoch', 'seconds_per_epoch',
    '<split>_<metric>_<task>': value, ...}``, also written to
    ``final.json``.
  """
  spec = experiment.tasks
  config_lib.validate(config, spec.names, [m.name for m in spec.metrics],
                      experiment.default_config())
  if not spec.metric(config.select).uniform:
    raise ValueError(f'config.select={config.select!r} has a direction per '
                     'task; select by a metric with one direction (e.g. '
                     'loss)')
  tasks = config_lib.task_indices(config, len(spec.names))
  if config.method == 'single_task' and len(tasks) > 1:
    return _single_task(experiment, config, workdir, data, force, log)
  check_devices(config)
  # The primary checks (and writes) config.json first; the others then
  # check against the file it wrote.
  primary_first(lambda: config_lib.check_resume(workdir, config, force=force,
                                                log=log), 'config checked')
  if data is None:
    data = load_data(experiment, config, log)
  _check_finite(data)
  names = tuple(spec.names[t] for t in tasks)
  num_tasks = len(tasks)
  train_x, train_y = data.train
  if config.max_train_examples:
    train_x = train_x[:config.max_train_examples]
    train_y = jax.tree.map(lambda l: l[:config.max_train_examples], train_y)
  on_host = host_input(config)
  # The training set stays in host memory for host input (in the dtypes
  # jnp.asarray would give it: float64 becomes float32 without x64).
  def put(a):
    if not on_host:
      return jnp.asarray(a)
    a = np.asarray(a)
    return a.astype(jax.dtypes.canonicalize_dtype(a.dtype), copy=False)
  images = put(train_x)
  labels = jax.tree.map(put, experiment.select_labels(train_y, tasks))
  splits = {s: (jnp.asarray(getattr(data, s)[0]),
                jax.tree.map(jnp.asarray, experiment.select_labels(
                    getattr(data, s)[1], tasks)))
            for s in ('val', 'test')}
  n_batches = images.shape[0] // config.batch_size
  if n_batches == 0:
    raise ValueError(f'{images.shape[0]} training examples are fewer than one '
                     f'batch of {config.batch_size}.')
  requested = config.chunk or (experiment.cpu_chunk
                               if jax.default_backend() == 'cpu' else 15)
  chunk = largest_divisor_at_most(n_batches, requested)
  if chunk > 1:
    log(f'{chunk} steps per compiled call (lax.scan; config.chunk='
        f'{config.chunk})')

  key = jax.random.key(config.seed)
  init_key, data_key, step_key = jax.random.split(key, 3)
  model = experiment.make_model(config, names, nnx.Rngs(
      int(jax.random.randint(init_key, (), 0, 2**31 - 1))))
  (graphdef, params, model_state, encode, task_losses,
   eval_metrics) = split_model(experiment, model)
  extra = experiment.method_args(config, data, tasks)
  method = methods_lib.build(config, num_tasks, steps_per_epoch=n_batches,
                             shared=experiment.shared, extra=extra,
                             regularizer=experiment.regularizer(config, model))
  opt_state = method.tx.init(params)
  sharding = batch_sharding(config, log)
  if on_host:
    log('training batches gathered on the host'
        + (', each process its own rows' if jax.process_count() > 1 else ''))
  train_chunk, evaluate = make_functions(
      experiment, config, (graphdef, encode, task_losses, eval_metrics),
      method, num_tasks, sharding, names)

  tracker = affinity_tracker(config)
  state = {'params': params, 'opt_state': opt_state,
           'epoch': jnp.zeros((), jnp.int32)}
  if tracker is not None:
    state['affinity'] = tracker.init(num_tasks)
  if experiment.stateful:
    state['model_state'] = model_state
  if sharding is not None:  # replicate the state and the data
    # From host values: across processes a global array is built from each
    # process's (identical) copy; one process gets the same arrays.
    replicated = jax.sharding.NamedSharding(sharding.mesh,
                                            jax.sharding.PartitionSpec())
    state, splits = replicate((state, splits), replicated)
    if not on_host:
      images, labels = replicate((images, labels), replicated)
  manager = _checkpointer(workdir)
  start_epoch = 0
  if manager.latest_step() is not None:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    state = manager.restore(manager.latest_step(),
                            args=ocp.args.StandardRestore(abstract))
    start_epoch = int(state['epoch'])
    log(f'resumed from the checkpoint of epoch {start_epoch} in {workdir}')
  # The others read metrics.jsonl after the primary has trimmed it.
  logger = primary_first(
      lambda: logs.Logger(workdir, start_epoch, write=is_primary()),
      'logs trimmed')
  params, opt_state = state['params'], state['opt_state']
  track = state.get('affinity', ())
  model_state = state.get('model_state', ())

  for epoch in range(start_epoch + 1, config.epochs + 1):
    # On the host: every process of a job holds the same order.
    perm = np.asarray(jax.random.permutation(
        jax.random.fold_in(data_key, epoch), images.shape[0]))
    batch_idx = perm[:n_batches * config.batch_size].reshape(
        n_batches // chunk, chunk, config.batch_size)
    epoch_key = jax.random.fold_in(step_key, epoch)
    if sharding is not None:
      epoch_key = replicate(epoch_key, replicated)
    metrics = []
    if tracker is not None:
      track = mgda_jax.tag.reset_epoch(track)
    start = time.perf_counter()
    with logs.progress(epoch, config.epochs, n_batches) as bar:
      for c in range(n_batches // chunk):
        if tracker is None:
          mode = 'none'
        elif chunk > 1:
          mode = 'cond'
        else:
          due = ((epoch - 1) * n_batches + c) % config.affinity.every == 0
          mode = 'add' if due else 'skip'
        if on_host:
          batch = (*host_batches((images, labels), batch_idx[c], sharding),
                   None)
        else:
          batch = (images, labels, batch_idx[c])
        params, model_state, opt_state, track, m = train_chunk(
            params, model_state, opt_state, track, *batch, epoch_key,
            c * chunk, mode=mode)
        metrics.append(m)
        if c % max(1, 15 // chunk) == 0 or (c + 1) * chunk == n_batches:
          jax.block_until_ready(params)
          bar.n = (c + 1) * chunk
          bar.refresh()
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
    if tracker is not None:
      z = np.asarray(mgda_jax.tag.epoch_affinity(track))
      # [source][target]; null where no finite affinity was recorded.
      record['affinity'] = [[None if np.isnan(v) else float(v) for v in row]
                            for row in z]
      record['affinity_steps'] = int(track.count)
      record['affinity_skipped'] = int(track.skipped)
    for split, (x, y) in splits.items():
      for name, value in evaluate(params, model_state, x, y).items():
        # null where a metric does not apply to a task: JSON has no NaN.
        record[f'{split}_{name}'] = [None if np.isnan(v) else v for v in
                                     np.asarray(value, float).tolist()]
    logger.write(record, names)
    shown = spec.table_metric
    log('  ' + ', '.join(
        f'{n} val {a:.4f} test {t:.4f}' for n, a, t in
        zip(names, record[f'val_{shown}'], record[f'test_{shown}'])) +
        f' ({shown}), weights '
        f'{[round(float(w), 3) for w in weights.mean(0)]}')
    epoch_done = jnp.asarray(epoch, jnp.int32)
    if sharding is not None:  # a global array, as the jitted outputs are
      epoch_done = replicate(epoch_done, replicated)
    state = {'params': params, 'opt_state': opt_state, 'epoch': epoch_done}
    if tracker is not None:
      state['affinity'] = track
    if experiment.stateful:
      state['model_state'] = model_state
    manager.save(epoch, args=ocp.args.StandardSave(state))
  manager.wait_until_finished()
  logger.close()
  return summarise(experiment, config, names, logger.records, workdir)


def replicate(tree, sharding):
  """``tree`` placed with ``sharding``, from host copies of its arrays.

  Across processes a global array is built from each process's copy (they
  are identical: the same seed, data and code); in one process this is a
  plain ``device_put``. PRNG keys travel as their key data.
  """
  def one(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key):
      data = jax.device_put(np.asarray(jax.random.key_data(x)), sharding)
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    return jax.device_put(np.asarray(x), sharding)
  return jax.tree.map(one, tree)


def host_input(config) -> bool:
  """Whether training batches are gathered on the host (``config.input``)."""
  if config.input == 'auto':
    return jax.process_count() > 1
  return config.input == 'host'


def batch_spec(sharding):
  """The ``PartitionSpec`` of a chunk of batches, ``(chunk, B, ...)``: the
  batch's own (``sharding``'s) one step in."""
  return jax.sharding.PartitionSpec(None, *sharding.spec)


def host_batches(tree, batch_idx, sharding):
  """The rows ``batch_idx`` (``(chunk, B)``) of each host array in ``tree``.

  Each leaf becomes a ``(chunk, B, ...)`` array: with ``sharding`` (a
  ``'data'`` mesh), a global array split over the batch axis, for which
  each process gathers and transfers only the rows of its own devices
  (``jax.make_array_from_callback`` asks for the addressable shards only);
  without, a plain device array. The values are those the device path
  gathers with ``inputs[batch_idx]``.
  """
  if sharding is None:
    return jax.tree.map(lambda a: jnp.asarray(a[batch_idx]), tree)
  spec = jax.sharding.NamedSharding(sharding.mesh, batch_spec(sharding))

  def one(a):
    shape = batch_idx.shape + a.shape[1:]
    return jax.make_array_from_callback(
        shape, spec, lambda index: a[batch_idx[index[:2]]][
            (slice(None), slice(None)) + tuple(index[2:])])
  return jax.tree.map(one, tree)


def summarise(experiment, config, names, records, workdir):
  """The best-validation epoch (``config.select``) and its figures."""
  if not records:
    raise RuntimeError(f'no finished epoch in {workdir}')
  best = tasks_lib.select_best(records, experiment.tasks.metric(config.select))
  result = {'method': config.method, 'seed': config.seed,
            'epochs': config.epochs, 'best_epoch': best['epoch'],
            'seconds_per_epoch': float(np.median([r['seconds']
                                                  for r in records]))}
  for split in ('val', 'test'):
    for m in experiment.tasks.metrics:
      for i, n in enumerate(names):
        result[f'{split}_{m.name}_{n}'] = best[f'{split}_{m.name}'][i]
  if config.affinity.every:
    epochs = np.array([[[np.nan if v is None else v for v in row]
                        for row in r['affinity']] for r in records])
    result['affinity'] = np.asarray(mgda_jax.tag.average_affinity(
        epochs, drop_last=config.affinity.drop_last)).tolist()
    result['tasks'] = list(names)
  if is_primary():
    with open(os.path.join(workdir, 'final.json'), 'w') as f:
      json.dump(result, f)
  return result


def _single_task(experiment, config, workdir, data, force, log):
  """A separate model per task; the results merged into one record."""
  tasks = config_lib.task_indices(config, len(experiment.tasks.names))
  merged = {'method': 'single_task', 'seed': config.seed,
            'epochs': config.epochs, 'best_epoch': {}, 'seconds_per_epoch': 0.0}
  if data is None:
    data = load_data(experiment, config, log)
  for t in tasks:
    sub = config.copy_and_resolve_references()
    sub.tasks = (t,)
    name = experiment.tasks.names[t]
    r = train_and_evaluate(experiment, sub, os.path.join(workdir, name),
                           data=data, force=force, log=log)
    merged['best_epoch'][name] = r['best_epoch']
    for k, v in r.items():
      if k.endswith('_' + name) and k.startswith(('val_', 'test_')):
        merged[k] = v
    merged['seconds_per_epoch'] += r['seconds_per_epoch']
  os.makedirs(workdir, exist_ok=True)
  if is_primary():
    with open(os.path.join(workdir, 'final.json'), 'w') as f:
      json.dump(merged, f)
  return merged
