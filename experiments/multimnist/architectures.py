"""MultiMNIST on every architecture of :mod:`mgda_jax.nn`, from LeNet parts.

``config.architecture.name`` picks the network. ``'multilenet'`` (the
default) is the paper's MultiLeNet of :mod:`.models` (with its dropout).
Every other name builds an :mod:`mgda_jax.nn` architecture from the same
LeNet parts, without dropout (the :mod:`mgda_jax.nn` modules take no dropout
key), so that they compare with one another:

* blocks ``conv 1->10 5x5, pool, ReLU`` (12x12x10), ``conv 10->20 5x5, pool,
  ReLU, flatten`` (320), ``dense 320->50, ReLU`` (the encoder);
* heads ``dense 50->50, ReLU, dense 50->10``.

================  ===========================================================
name              network
================  ===========================================================
hard_sharing      the encoder shared, one head per task
mrn               hard sharing, and a tensor-normal prior over the heads' last
                  layers (``architecture.mrn_weight``, ``mrn_every``)
branched          a FAFS tree: ``architecture.groups`` gives the task groups
                  at the three blocks (``'01|01|0,1'``: tasks 0 and 1 share
                  the two conv blocks and have their own dense block), e.g.
                  from :mod:`.fafs`
cross_stitch      one column per task, a cross-stitch unit after each block
sluice            columns of the encoder, then two dense 50->50 layers mixed
                  by alpha units (2 subspaces) and per-task beta over the
                  three 50-wide outputs; ``dense 50->10`` heads (the
                  orthogonality penalty is not added)
mtan              task attention over the two conv stages (LayerNorm); the
                  dense block goes into each task's decoder
mmoe              ``architecture.experts`` encoders as experts, a gate per
                  task on the flattened image
cgc               one shared and one task expert per task (encoders)
ple               two levels (conv blocks, then the dense block), one shared
                  and one task expert per level
================  ===========================================================
"""

from flax import nnx
import jax
import jax.numpy as jnp

from experiments.multimnist import models
import mgda_jax.nn as mnn

NAMES = ('multilenet', 'hard_sharing', 'mrn', 'branched', 'cross_stitch',
         'sluice', 'mtan', 'mmoe', 'cgc', 'ple')


class Conv(nnx.Module):
  """``conv 5x5 (VALID), 2x2 max-pool, ReLU``, optionally flattened."""

  def __init__(self, cin, cout, *, rngs, flatten=False):
    # One input channel (the first layer): as a matrix product, faster
    # on XLA:CPU (models.conv_as_matmul); otherwise gradients in the
    # canonical layout, fast inside lax.scan too (models.conv_nhwc_grads).
    conv = models.conv_as_matmul if cin == 1 else models.conv_nhwc_grads
    self.conv = nnx.Conv(cin, cout, (5, 5), padding='VALID', rngs=rngs,
                         conv_general_dilated=conv)
    self.flatten = flatten

  def __call__(self, x):
    x = jax.nn.relu(models.max_pool_2x2(self.conv(x)))
    return x.reshape(x.shape[0], -1) if self.flatten else x


class Dense(nnx.Module):
  """``dense, ReLU`` (flattening its input)."""

  def __init__(self, i, o, *, rngs):
    self.fc = nnx.Linear(i, o, rngs=rngs)

  def __call__(self, x):
    return jax.nn.relu(self.fc(x.reshape(x.shape[0], -1)))


def block(l):
  """The factory of LeNet block ``l`` (0, 1, 2)."""
  if l == 0:
    return lambda rngs: Conv(1, 10, rngs=rngs)
  if l == 1:
    return lambda rngs: Conv(10, 20, rngs=rngs, flatten=True)
  return lambda rngs: Dense(320, 50, rngs=rngs)


def encoder(rngs):
  return nnx.Sequential(*[block(l)(rngs) for l in range(3)])


def head(rngs, width=50):
  return nnx.Sequential(nnx.Linear(width, 50, rngs=rngs), nnx.relu,
                        nnx.Linear(50, 10, rngs=rngs))


def parse_groups(spec: str, k: int):
  """``'01|01|0,1'`` -> per block, the task groups (``,`` between groups,
  ``|`` between blocks; tasks as digits). Empty: every block shared."""
  if not spec:
    return [[tuple(range(k))]] * 3
  layers = spec.split('|')
  if len(layers) != 3:
    raise ValueError(f'config.architecture.groups: one entry per block (3), '
                     f"separated by '|'; got {spec!r}.")
  try:
    return [[tuple(int(c) for c in g) for g in layer.split(',')]
            for layer in layers]
  except ValueError as e:
    raise ValueError(f'config.architecture.groups: tasks are digits, groups '
                     f"separated by ','; got {spec!r}.") from e


def build(config, task_names, rngs) -> mnn.MTLArchitecture:
  """The architecture ``config.architecture.name`` (not 'multilenet')."""
  a = config.architecture
  k = len(task_names)
  name = a.name
  heads = {t: head(rngs) for t in task_names}
  if name == 'hard_sharing':
    return mnn.HardSharing(encoder(rngs), heads)
  if name == 'mrn':
    return mnn.MRN(encoder(rngs), heads, layers=[('layers', 2, 'kernel')])
  if name == 'branched':
    return mnn.Branched([block(l) for l in range(3)], heads, rngs=rngs,
                        groups=parse_groups(a.groups, k))
  if name == 'cross_stitch':
    return mnn.CrossStitch([block(l) for l in range(3)], heads, rngs=rngs)
  if name == 'sluice':
    return mnn.Sluice([lambda r: encoder(r),
                       lambda r: Dense(50, 50, rngs=r),
                       lambda r: Dense(50, 50, rngs=r)],
                      {t: nnx.Linear(50, 10, rngs=rngs) for t in task_names},
                      rngs=rngs, num_subspaces=2)
  if name == 'mtan':
    decoders = {t: nnx.Sequential(Dense(320, 50, rngs=rngs), head(rngs))
                for t in task_names}
    return mnn.MTAN([block(0)(rngs), Conv(10, 20, rngs=rngs)], [10, 20],
                    decoders,
                    rngs=rngs, norm='layer')
  if name == 'mmoe':
    return mnn.MMoE(encoder, a.experts, 784, heads, rngs=rngs)
  if name == 'cgc':
    return mnn.CGC(encoder, 1, 1, 784, heads, rngs=rngs)
  if name == 'ple':
    convs = lambda r: nnx.Sequential(block(0)(r), block(1)(r))
    return mnn.PLE([convs, block(2)], 1, 1, [784, 320], heads,
                   num_levels=2, rngs=rngs)
  raise ValueError(f'config.architecture.name must be one of {NAMES}; got '
                   f'{name!r}.')


def loss_fn(outputs, labels, key):
  """NLL per task from the per-task logits (a dict in task order)."""
  del key
  return models.nll_per_task(stacked(outputs), labels)


def stacked(outputs):
  return jnp.stack(list(outputs.values()) if isinstance(outputs, dict)
                   else list(outputs))


def functional(model: mnn.MTLArchitecture):
  """The framework's ``(graphdef, params, encode, task_losses)`` from
  :func:`mgda_jax.nn.functional` (stateless models: LayerNorm, no
  BatchNorm). ``task_losses`` takes ``Z`` as ``encode`` gives it (the
  parameter path) or a tuple of ``K`` copies (the representation path, with
  ``z_copies='tuple'``), told apart by the tree structure while
  tracing."""
  per_task = mnn.functional(model, loss_fn, per_task_z=True)
  plain = mnn.functional(model, loss_fn, per_task_z=False)
  if jax.tree.leaves(per_task.state):
    raise ValueError('the MultiMNIST architectures are stateless; this one '
                     'has non-parameter state.')
  state = per_task.state

  def encode(params, x, labels, key):
    z, _ = per_task.encode(params, state, x, labels, key)
    return z

  def task_losses(params, z, x, labels, key):
    own = jax.eval_shape(lambda: encode(params, x, labels, key))
    fns = (plain if jax.tree.structure(own) == jax.tree.structure(z)
           else per_task)
    losses, (outputs, _) = fns.task_losses(params, z, state, x, labels, key)
    return losses, stacked(outputs)

  return per_task.graphdef, per_task.params, encode, task_losses


def eval_metrics(graphdef, params, x, y):
  """NLL and accuracy sums per task."""
  return models.metric_sums(stacked(nnx.merge(graphdef, params)(x)), y)


def shared_mask(config, task_names):
  """``params -> bool mask`` from the architecture's declaration."""
  abstract = nnx.eval_shape(lambda: build(config, task_names, nnx.Rngs(0)))
  return abstract.shared_mask


def regularizer(config, model):
  """MRN's prior (an optax transformation) or None."""
  if config.architecture.name != 'mrn':
    return None
  return model.prior(config.architecture.mrn_weight,
                     every=config.architecture.mrn_every)
