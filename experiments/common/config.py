"""Experiment configs (``ml_collections``), one section per registered method.

Every field can be overridden on the command line, the Flax examples' way
(``--config.method=cagrad --config.cagrad.c=0.2``). The method sections are
read off ``mgda_jax.METHODS`` (each factory's keyword arguments and their
defaults), so a new method is configurable without touching this file.

Rules that :func:`validate` enforces:

* ``method`` is a registry name, or ``single_task`` (one network per task);
* a field of another method's section that differs from its default is an
  error (it would be silently ignored), naming the field;
* sizes and rates are positive, ``tasks`` a subset of the spec's tasks.

:func:`check_resume` compares a run's saved ``config.json`` with the config
of a resumed run and names every field that differs.
"""

import inspect
import json
import os
from typing import Any, Iterable, Sequence

from ml_collections import config_dict

import mgda_jax

BASELINES = ('single_task',)
# Method arguments that are not configuration: set by the framework (the
# seed, the shared mask, the device axis, the epoch length) or arrays the
# dataset supplies (priors).
NOT_CONFIG = ('num_tasks', 'axis_name', 'shared', 'key', 'priors',
              'preferences', 'steps_per_epoch')
# Fields a resumed run may change: the length of the run, and where the
# same data is read from (its content is fingerprinted by the pipeline).
RESUMABLE_CHANGES = ('epochs', 'data.mnist_dir', 'data.tfds_data_dir',
                     'data.download_dir', 'data.mirrors', 'data.download',
                     'data.celeba_dir', 'data.cityscapes_dir', 'input')
# Fields added after runs were recorded: a saved config without one is the
# same config when the new value is this default.
ADDED_FIELDS = {'optimizer.decay_every': 0, 'optimizer.decay_factor': 1.0,
                'architecture.name': 'multilenet',
                'architecture.mrn_weight': 1.0, 'architecture.mrn_every': 1,
                'architecture.groups': '', 'architecture.experts': 3,
                'input': 'auto'}
INPUTS = ('auto', 'device', 'host')
OPTIMIZERS = ('sgd', 'adam')
AFFINITY_KINDS = ('lookahead', 'linearized', 'representation', 'cosine')


def method_names() -> tuple[str, ...]:
  """``single_task`` and every registered method, in registry order."""
  return BASELINES + tuple(mgda_jax.METHODS)


def method_section(name: str) -> config_dict.ConfigDict:
  """The configurable keyword arguments of a registered method.

  Numbers, strings and booleans with a default in the factory's signature
  (``None`` defaults are left to the factory); ``fixed_weighting``'s
  ``weights`` is a tuple, empty meaning ones.
  """
  spec = mgda_jax.method_spec(name)
  out = {}
  for arg, p in inspect.signature(spec.factory).parameters.items():
    if arg in NOT_CONFIG:
      continue
    if arg == 'weights':
      out[arg] = ()
    elif p.default is not inspect.Parameter.empty and isinstance(
        p.default, (bool, int, float, str)):
      out[arg] = p.default
  return config_dict.ConfigDict(out)


def base_config() -> config_dict.ConfigDict:
  """The fields every experiment has; a dataset's config fills them in."""
  c = config_dict.ConfigDict()
  c.method = 'mgda_ub'
  c.epochs = 10
  c.batch_size = 256
  c.eval_batch_size = 1000
  c.seed = 0         # model initialisation, shuffling, dropout, method draws
  c.data_seed = 0    # the dataset's own seeded construction and splits
  # decay_every > 0: the learning rate times decay_factor every that many
  # epochs (a staircase).
  c.optimizer = config_dict.ConfigDict(
      {'name': 'sgd', 'learning_rate': 0.05, 'momentum': 0.9,
       'decay_every': 0, 'decay_factor': 1.0})
  # Skip (do not apply) a step whose update is not finite; after this many
  # in a row the NaN goes through and the run shows it.
  c.max_consecutive_nonfinite = 100
  # Steps per compiled call (a lax.scan when > 1); the largest divisor of
  # the batches per epoch not above it is used. 0: automatic: on CPU the
  # experiment's Experiment.cpu_chunk (MultiMNIST 15, but 1 for MTAN; 1
  # where XLA:CPU runs the step slower inside a loop), 15 elsewhere.
  c.chunk = 0
  # Data parallelism: shard each batch over this many devices (a 'data'
  # mesh axis under jax.jit; parameters replicated). 1: one device; 0: all.
  c.devices = 1
  # Where training batches are gathered: 'device' holds the training set on
  # the devices and indexes it inside the compiled step; 'host' gathers
  # each batch from host memory, each process only the rows of its own
  # devices. Same figures either way. 'auto': host when several processes.
  c.input = 'auto'
  # Train only these tasks (indices into the task spec); () means all.
  c.tasks = ()
  # Stop after this many training examples (0: all); for tests.
  c.max_train_examples = 0
  # Best-epoch selection: this evaluation metric on the validation split,
  # averaged over tasks (its direction comes from the task spec).
  c.select = 'acc'
  # TAG (mgda_jax.tag): record the inter-task affinity inside the training
  # step every `every` steps (0: off), per epoch into metrics.jsonl and its
  # average over epochs into final.json.
  c.affinity = config_dict.ConfigDict({
      'every': 0,
      'kind': 'lookahead',    # lookahead|linearized|representation|cosine
      'divide_by_lr': False,  # the official code's division by the lr
      'drop_last': 0,         # epochs left out of the final average
  })
  for name in mgda_jax.METHODS:
    c[name] = method_section(name)
  return c


FIELD_HELP = {
    'method': 'single_task or any mgda_jax.METHODS name',
    'epochs': 'training epochs',
    'batch_size': 'training batch size',
    'eval_batch_size': 'evaluation batch size (a divisor of the split is '
                       'used)',
    'seed': 'model initialisation, shuffling, dropout, method draws',
    'data_seed': "the dataset's seeded construction and splits",
    'optimizer.name': 'sgd (with momentum) or adam',
    'optimizer.learning_rate': 'learning rate',
    'optimizer.momentum': 'SGD momentum (ignored by adam: must stay default)',
    'optimizer.decay_every': 'multiply the learning rate by decay_factor '
                             'every this many epochs (0: constant)',
    'optimizer.decay_factor': 'the step decay factor, in (0, 1]',
    'max_consecutive_nonfinite': 'non-finite steps skipped in a row before '
                                 'the NaN goes through',
    'chunk': 'steps per compiled call (0: on CPU the experiment\'s default, '
             'MultiMNIST 15 (MTAN 1), else 1; 15 elsewhere)',
    'devices': 'data-parallel devices (0: all visible)',
    'input': 'where batches are gathered: device (the training set on the '
             'devices), host (each process puts only its own rows of each '
             'batch on its devices) or auto (host across processes)',
    'tasks': 'train only these task indices, e.g. "(0,)" (): all',
    'max_train_examples': 'use only this many training examples (0: all)',
    'select': 'validation metric for best-epoch selection',
    'affinity.every': "TAG: the affinity's period in steps (0: off)",
    'affinity.kind': 'lookahead (TAG), linearized (its first order), '
                     'representation (from the gradients at Z alone) or '
                     'cosine (the CS baseline)',
    'affinity.divide_by_lr': "divide the lookahead by the learning rate "
                             "(the official code's choice)",
    'affinity.drop_last': "epochs left out of final.json's average",
    'architecture.name': 'the network: multilenet (the paper\'s) or an '
                         'mgda_jax.nn architecture of LeNet parts',
    'architecture.mrn_weight': "mrn: the tensor-normal prior's weight",
    'architecture.mrn_every': 'mrn: re-estimate its covariances every this '
                              'many steps',
    'architecture.groups': "branched: task groups per block, e.g. "
                           "'01|01|0,1' ('': all shared)",
    'architecture.experts': 'mmoe: the number of experts',
    # The data fields of the datasets that have them.
    'data.mnist_dir': 'a folder with the four MNIST IDX files (first choice)',
    'data.tfds_data_dir': "a TFDS data dir with prepared mnist ('': TFDS's "
                          'default)',
    'data.download': 'download MNIST when no local copy is found',
    'data.download_dir': 'where downloaded files are kept (and reused)',
    'data.mirrors': 'URL prefixes to download from, in order',
    'data.cache_dir': 'where the generated data set is cached',
    'data.celeba_dir': 'a folder of the official CelebA files (first '
                       'choice; else TFDS celeb_a)',
    'model': 'the network: resnet18 (the paper) or tag (the TAG code\'s '
             'one-block trunk)',
    'data.cityscapes_dir': 'a folder of Cityscapes: the official files or '
                           "MTAN's preprocessed .npy arrays",
    'data.layout': 'official (3 tasks) or preprocessed (.npy, 2 tasks)',
    'data.height': 'image height after resizing',
    'data.width': 'image width after resizing',
    'data.num_classes': 'semantic classes (19 official; 7 or 19 .npy)',
    'data.max_images': 'use at most this many images per split (0: all)',
    'data.sizes': 'train, validation and test scenes',
    'data.max_digits': 'at most this many digits per scene (2 at least)',
    'data.min_size': 'smallest digit, in pixels (square)',
    'data.max_size': 'largest digit, in pixels (square)',
    'model.encoder': 'resnet50 (dilated, the paper) or small (CPU runs)',
    'model.in_channels': 'image channels',
    'model.width': "the small encoder's width",
    'model.decoder_width': "each pyramid decoder's 3x3 convolution width",
    'model.bins': 'the pyramid pooling bins',
}


def flatten(c: Any, prefix: str = '') -> dict[str, Any]:
  """``{'a.b': value}`` for every leaf of a (nested) ConfigDict or dict."""
  out = {}
  items = c.items() if hasattr(c, 'items') else []
  for k, v in items:
    key = f'{prefix}{k}'
    if hasattr(v, 'items'):
      out.update(flatten(v, key + '.'))
    else:
      out[key] = list(v) if isinstance(v, tuple) else v
  return out


def describe(c: config_dict.ConfigDict) -> str:
  """A help text: every field with its default (and meaning, where known)."""
  lines = ['Fields (override with --config.<field>=<value>):']
  for key, value in flatten(c).items():
    section = key.split('.')[0]
    if section in mgda_jax.METHODS:
      continue
    text = FIELD_HELP.get(key, '')
    lines.append(f'  {key} = {value!r}' + (f'  ({text})' if text else ''))
  lines.append('Method hyperparameters, under the method\'s name '
               '(e.g. --config.cagrad.c=0.2); set only those of the chosen '
               'method:')
  for name in mgda_jax.METHODS:
    fields = ', '.join(f'{k}={v!r}' for k, v in flatten(c[name]).items())
    lines.append(f'  {name}: {fields or "(none)"}')
  return '\n'.join(lines)


def validate(c: config_dict.ConfigDict, task_names: Sequence[str],
             metric_names: Iterable[str],
             defaults: config_dict.ConfigDict | None = None
             ) -> config_dict.ConfigDict:
  """Raises ``ValueError`` naming the field for a bad config; returns it.

  ``defaults`` is the experiment's default config (default:
  :func:`base_config`): a method section other than the chosen method's
  must equal it.
  """
  names = method_names()
  if c.method not in names:
    raise ValueError(f'config.method must be one of {names}; got '
                     f'{c.method!r}')
  defaults = base_config() if defaults is None else defaults
  for name in mgda_jax.METHODS:
    if name == c.method:
      continue
    for key, value in flatten(c[name]).items():
      default = flatten(defaults[name])[key]
      if value != default:
        raise ValueError(
            f'config.{name}.{key}={value!r} is set, but config.method is '
            f'{c.method!r}: it would be ignored. Set config.method={name} '
            f'or leave config.{name} at its defaults.')
  for field in ('epochs', 'batch_size', 'eval_batch_size',
                'max_consecutive_nonfinite'):
    if c[field] < 1:
      raise ValueError(f'config.{field} must be >= 1; got {c[field]}')
  for field in ('devices', 'chunk', 'max_train_examples'):
    if c[field] < 0:
      raise ValueError(f'config.{field} must be >= 0; got {c[field]}')
  if c.input not in INPUTS:
    raise ValueError(f'config.input must be one of {INPUTS}; got '
                     f'{c.input!r}')
  if c.optimizer.name not in OPTIMIZERS:
    raise ValueError(f'config.optimizer.name must be one of {OPTIMIZERS}; '
                     f'got {c.optimizer.name!r}')
  if not c.optimizer.learning_rate > 0:
    raise ValueError('config.optimizer.learning_rate must be > 0; got '
                     f'{c.optimizer.learning_rate}')
  if c.optimizer.decay_every < 0 or not 0 < c.optimizer.decay_factor <= 1:
    raise ValueError('config.optimizer.decay_every must be >= 0 and '
                     'config.optimizer.decay_factor in (0, 1]; got '
                     f'{c.optimizer.decay_every} and '
                     f'{c.optimizer.decay_factor}')
  if c.optimizer.name == 'adam' and c.optimizer.momentum != 0.9:
    raise ValueError('config.optimizer.momentum applies to sgd only; got '
                     f'{c.optimizer.momentum} with adam.')
  if c.affinity.every < 0 or c.affinity.drop_last < 0:
    raise ValueError('config.affinity.every and config.affinity.drop_last '
                     f'must be >= 0; got {c.affinity.every} and '
                     f'{c.affinity.drop_last}')
  if c.affinity.kind not in AFFINITY_KINDS:
    raise ValueError(f'config.affinity.kind must be one of {AFFINITY_KINDS}; '
                     f'got {c.affinity.kind!r}')
  if c.affinity.drop_last and c.affinity.drop_last >= c.epochs:
    raise ValueError(f'config.affinity.drop_last={c.affinity.drop_last} '
                     f'leaves no epoch of {c.epochs} to average.')
  k = len(task_names)
  tasks = tuple(c.tasks)
  if len(set(tasks)) != len(tasks) or any(
      not isinstance(t, int) or not 0 <= t < k for t in tasks):
    raise ValueError(f'config.tasks must be distinct indices in [0, {k}) '
                     f'(tasks {tuple(task_names)}); got {tasks}')
  metrics = tuple(metric_names)
  if c.select not in metrics:
    raise ValueError(f'config.select must be one of the metrics {metrics}; '
                     f'got {c.select!r}')
  return c


def task_indices(c: config_dict.ConfigDict, num_tasks: int) -> tuple[int, ...]:
  """The trained tasks: ``config.tasks``, or all."""
  return tuple(c.tasks) or tuple(range(num_tasks))


class ConfigMismatchError(ValueError):
  """A resumed run's config differs from the one it started with."""


def check_resume(workdir: str, c: config_dict.ConfigDict, *,
                 force: bool = False, log=print) -> None:
  """Writes ``config.json``, or checks a resumed run against it.

  A new run writes it. A resumed run (``config.json`` exists) must have the
  same config except for :data:`RESUMABLE_CHANGES`; otherwise
  :class:`ConfigMismatchError` names each differing field. With ``force``
  the old file is kept as ``config.<n>.json`` and the new one written, with
  a log line; it is never overwritten silently.
  """
  path = os.path.join(workdir, 'config.json')
  new = flatten(c)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    for k, default in ADDED_FIELDS.items():
      if k not in old and new.get(k) == default:
        old[k] = default
    diff = {k: (old.get(k, '<absent>'), new.get(k, '<absent>'))
            for k in sorted(set(old) | set(new))
            if old.get(k, '<absent>') != new.get(k, '<absent>')}
    blocking = {k: v for k, v in diff.items() if k not in RESUMABLE_CHANGES}
    if not diff:
      return
    if blocking and not force:
      fields = '; '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in
                         blocking.items())
      raise ConfigMismatchError(
          f'{workdir} holds a run with another config ({fields}). Resume it '
          'with its own config, use another --workdir, or pass --force to '
          'continue with the new config (the old config.json is kept).')
    n = 1
    while os.path.exists(os.path.join(workdir, f'config.{n}.json')):
      n += 1
    os.replace(path, os.path.join(workdir, f'config.{n}.json'))
    log(f'config changed on resume ({", ".join(diff)}); the previous one is '
        f'kept as config.{n}.json')
  os.makedirs(workdir, exist_ok=True)
  with open(path, 'w') as f:
    json.dump(new, f, indent=1)
