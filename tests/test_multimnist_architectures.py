"""MultiMNIST on every mgda_jax.nn architecture through the framework, the
architecture config, and the FAFS search, on generated digits."""

import json

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mgda_jax
import mgda_jax.nn as mnn
from experiments.multimnist import architectures
from experiments.multimnist import fafs
from experiments.multimnist import input_pipeline as ip
from experiments.multimnist import reproduce_architectures
from experiments.multimnist import train
from test_multimnist import cfg
from test_multimnist import fake_mnist

NN_ARCHS = [a for a in architectures.NAMES if a != 'multilenet']


@pytest.fixture(name='data', scope='module')
def fixture_data():
  return ip.build_multimnist(fake_mnist(np.random.default_rng(5)), seed=0)


def arch_cfg(arch, **kw):
  c = cfg(**{'architecture.name': arch, 'epochs': 1, 'max_train_examples': 64,
             'batch_size': 32, 'chunk': 1, **kw})
  if arch == 'branched':
    c.architecture.groups = '01|01|0,1'
  return c


@pytest.mark.parametrize('arch', NN_ARCHS)
def test_every_architecture_trains_through_the_framework(arch, data,
                                                         tmp_path):
  """One epoch with MGDA-UB on the representation path (uniform on the
  branched tree): finite metrics for both digits."""
  method = 'uniform_weighting' if arch == 'branched' else 'mgda_ub'
  result = train.train_and_evaluate(arch_cfg(arch, method=method),
                                    str(tmp_path), data, log=lambda _: None)
  for split in ('val', 'test'):
    for t in ('left', 'right'):
      assert 0.0 <= result[f'{split}_acc_{t}'] <= 1.0
      assert np.isfinite(result[f'{split}_loss_{t}'])


def test_parameter_path_and_mrn_prior_in_the_chain(data, tmp_path):
  """Full MGDA on the parameter gradients with the architecture's mask, and
  MRN's prior between the method and the optimizer."""
  train.train_and_evaluate(arch_cfg('cross_stitch', method='mgda'),
                           str(tmp_path / 'cs'), data, log=lambda _: None)
  c = arch_cfg('mrn', method='uniform_weighting')
  exp = train.experiment_for(c)
  model = exp.make_model(c, train.TASKS.names, nnx.Rngs(0))
  graphdef, params, encode, task_losses = exp.functional(model)
  reg = exp.regularizer(c, model)
  assert reg is not None
  from experiments.common import methods as methods_lib
  method = methods_lib.build(c, 2, steps_per_epoch=1, shared=exp.shared,
                             regularizer=reg)
  state = method.tx.init(params)
  assert isinstance(state[1], mnn.TensorNormalPriorState)
  x = jnp.asarray(data.train[0][:8])
  y = jnp.asarray(data.train[1][:8])
  losses, grads = mgda_jax.representation_grads(
      encode, task_losses, params, x, y, jax.random.key(0), has_aux=True,
      per_task_z=2)
  _, state = method.tx.update(grads, state, params, losses=losses[0])
  assert int(state[1].count) == 1 and float(state[1].penalty) > 0
  # The method's state and the optimizer's are where diagnostics read them.
  assert method.diagnostics(state)[0].shape == (2,)
  method.base_state(state)


def test_parameter_path_equals_jacrev_on_an_architecture(data):
  """task_losses takes Z as encode gives it (parameter path) or replicated
  (representation path); both give the losses of the whole model."""
  c = arch_cfg('mtan')
  exp = train.experiment_for(c)
  model = exp.make_model(c, train.TASKS.names, nnx.Rngs(0))
  _, params, encode, task_losses = exp.functional(model)
  x = jnp.asarray(data.train[0][:4])
  y = jnp.asarray(data.train[1][:4])
  z = encode(params, x, y, None)
  plain, _ = task_losses(params, z, x, y, None)
  rep, _ = task_losses(params, jax.tree.map(lambda l: jnp.stack([l, l]), z),
                       x, y, None)
  want = architectures.loss_fn(model(x), y, None)
  np.testing.assert_allclose(plain, want, rtol=1e-6)
  np.testing.assert_allclose(rep, want, rtol=1e-6)


def test_architecture_config_errors():
  with pytest.raises(ValueError, match='architecture.name must be one of'):
    train.experiment_for(cfg(**{'architecture.name': 'resnet'}))
  with pytest.raises(ValueError, match="applies to 'mrn' only"):
    train.experiment_for(cfg(**{'architecture.name': 'hard_sharing',
                                'architecture.mrn_weight': 0.5}))
  with pytest.raises(ValueError, match='one entry per block'):
    architectures.parse_groups('01|01', 2)
  with pytest.raises(ValueError, match='tasks are digits'):
    architectures.parse_groups('0a|01|01', 2)
  assert train.experiment_for(cfg()) is train.EXPERIMENT


def test_parameter_counts_of_the_table():
  # Hard sharing: conv 1->10 (5x5), conv 10->20, dense 320->50; heads
  # 50->50->10.
  enc = (25 * 10 + 10) + (250 * 20 + 20) + (320 * 50 + 50)
  head = (50 * 50 + 50) + (50 * 10 + 10)
  assert reproduce_architectures.counts('hard_sharing', '') == (
      enc + 2 * head, enc)
  assert reproduce_architectures.counts('mrn', '') == (enc + 2 * head, enc)
  # Independent networks: nothing shared.
  assert reproduce_architectures.counts('branched', '0,1|0,1|0,1') == (
      2 * (enc + head), 0)
  # Cross-stitch: two columns, a 2x2 unit per block.
  assert reproduce_architectures.counts('cross_stitch', '') == (
      2 * enc + 3 * 4 + 2 * head, 2 * enc + 3 * 4)


def test_fafs_search_on_generated_digits(data, monkeypatch):
  """The search runs the procedure and returns a tree the config accepts."""
  monkeypatch.setattr(train, 'load_data', lambda config, log=print: data)
  c = cfg(**{'max_train_examples': 64, 'batch_size': 32})
  out = fafs.search(c, alpha=1.0, affinity_examples=64, log=lambda _: None)
  assert [r['layer'] for r in out['rounds']] == [2, 1, 0]
  groups = architectures.parse_groups(out['groups'], 2)
  mnn.Branched([architectures.block(l) for l in range(3)],
               [architectures.head(nnx.Rngs(0)) for _ in range(2)],
               rngs=nnx.Rngs(0), groups=groups)
  for r in out['rounds']:
    a = np.asarray(r['affinity'])
    assert a.shape == (2, 2) and np.all((0 <= a) & (a <= 1))
  json.dumps(out)
  assert fafs.groups_spec(((( 0, 1),), ((0,), (1,)), ((0,), (1,))))  == (
      '01|0,1|0,1')
