"""MultiMNIST on every mgda_jax.nn architecture through the framework, the
architecture config, and the FAFS search, on generated digits."""

import json
import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mgda_jax
import mgda_jax.nn as mnn
from experiments.multimnist import architectures
from experiments.multimnist import fafs
from experiments.multimnist import input_pipeline as ip
from experiments.multimnist import models
from experiments.multimnist import reproduce_architectures
from experiments.multimnist import train
from test_multimnist import assert_same_records
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


CASES = [(a, 'mgda_ub') for a in NN_ARCHS] + [('cross_stitch', 'mgda'),
                                              ('mrn', 'uniform_weighting')]
MRN_WEIGHT = 30.0   # large enough that leaving the prior out shows


@pytest.mark.parametrize('arch', ['cross_stitch', 'ple'])
def test_the_cpu_default_chunk_records_what_a_step_per_call_records(
    arch, data, tmp_path):
  """Architectures other than MTAN scan steps on CPU (``cpu_chunk``); that
  must train as one compiled step per call does: the same records (to
  1e-6; bitwise on the development machine)."""
  assert train.experiment_for(arch_cfg(arch)).cpu_chunk == 15
  assert train.experiment_for(arch_cfg('mtan')).cpu_chunk == 1
  # 0: the default, 15 (4 batches: chunks of 4); arch_cfg(): one epoch.
  assert_same_records(
      lambda chunk: arch_cfg(arch, chunk=chunk, max_train_examples=128),
      data, tmp_path, epochs=1)


@pytest.mark.parametrize('arch,method', CASES)
def test_an_epoch_is_the_documented_loop_on_every_architecture(arch, method,
                                                               data, tmp_path):
  """Two steps through the framework equal a loop written here with
  mgda_jax.nn directly: the same initialisation and batches (seeding as in
  tests/test_multimnist.py), the representation path for MGDA-UB and
  uniform, the parameter path with the architecture's shared mask for full
  MGDA, MRN's prior between the method and the optimizer."""
  c = arch_cfg(arch, method=method)
  if arch == 'mrn':
    c.architecture.mrn_weight = MRN_WEIGHT
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(c, workdir, data, log=lambda _: None)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    got = json.loads(f.readline())

  init_key, data_key, _ = jax.random.split(jax.random.key(0), 3)
  model = architectures.build(c, train.TASKS.names, nnx.Rngs(
      int(jax.random.randint(init_key, (), 0, 2**31 - 1))))
  fns = mnn.functional(model, lambda outs, y: models.nll_per_task(
      jnp.stack(list(outs.values())), y))
  kwargs = {'shared': fns.shared} if method == 'mgda' else {}
  kind = 'per_task' if method == 'mgda' else 'representation'
  x, y = data.train.images[:64], data.train.labels[:64]
  perm = np.asarray(jax.random.permutation(jax.random.fold_in(data_key, 1),
                                           64))

  def loop(with_prior):
    parts = [mgda_jax.make_method(method, 2, **kwargs)]
    if with_prior:
      parts.append(model.prior(MRN_WEIGHT, every=c.architecture.mrn_every))
    tx = optax.chain(*parts, optax.apply_if_finite(
        optax.sgd(0.05, momentum=0.9), 100))

    @jax.jit
    def step(params, opt_state, x, y):
      losses, grads, _, _ = mnn.task_gradients(fns, kind, params, fns.state,
                                               x, y)
      u, opt_state = tx.update(grads, opt_state, params, losses=losses)
      return optax.apply_updates(params, u), opt_state, losses

    params, opt_state = fns.params, tx.init(fns.params)
    losses = []
    for i in range(2):
      idx = perm[i * 32:(i + 1) * 32]
      params, opt_state, l = step(params, opt_state, x[idx], y[idx])
      losses.append(np.asarray(l))
    return params, losses

  params, losses = loop(arch == 'mrn')
  np.testing.assert_allclose(got['train_loss'], np.mean(losses, 0),
                             rtol=2e-5)
  if arch == 'mrn':
    # The prior acts on the second step's losses (after the first update).
    _, plain = loop(False)
    assert np.max(np.abs(plain[1] - losses[1])) > 1e-3, (plain, losses)
  m = nnx.merge(fns.graphdef, params, fns.state)
  logits = np.asarray(jnp.stack(list(m(data.test.images).values())))
  acc = (logits.argmax(-1) == data.test.labels.T).mean(1)
  np.testing.assert_allclose(got['test_acc'], acc, atol=1.5 / 120)


def test_task_losses_take_z_plain_or_copied(data):
  """task_losses takes Z as encode gives it (parameter path) or as a tuple
  of K copies (representation path, z_copies='tuple'); both give the losses
  of the whole model."""
  c = arch_cfg('mtan')
  exp = train.experiment_for(c)
  model = exp.make_model(c, train.TASKS.names, nnx.Rngs(0))
  _, params, encode, task_losses = exp.functional(model)
  x = jnp.asarray(data.train[0][:4])
  y = jnp.asarray(data.train[1][:4])
  z = encode(params, x, y, None)
  plain, _ = task_losses(params, z, x, y, None)
  assert exp.z_copies == 'tuple'
  rep, _ = task_losses(params, (z, z), x, y, None)
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


def test_table_from_finished_runs_lists_the_missing(tmp_path):
  """--table-only: rows from the runs' final.json, Δm against the single
  task runs, the runs not made yet named."""
  def write(arch, method, left, right):
    d = tmp_path / 'runs' / arch / f'{method}-seed0'
    d.mkdir(parents=True)
    (d / 'final.json').write_text(json.dumps({
        'epochs': 10, 'seconds_per_epoch': 5.0, 'test_acc_left': left,
        'test_acc_right': right}))

  write('single', 'single_task', 0.95, 0.90)
  write('mrn', 'mgda_ub', 0.96, 0.90)
  reproduce_architectures.main([
      '--architectures', 'mrn', '--methods', 'mgda_ub', 'mgda', '--seeds',
      '0', '--runs', str(tmp_path / 'runs'), '--out', str(tmp_path),
      '--table-only'])
  text = (tmp_path / 'ARCHITECTURES.md').read_text()
  # Δm = -mean((96 - 95) / 95, 0) * 100 = -0.53.
  assert '| MRN | MGDA-UB (ours) | 96.00 | 90.00 | -0.53 |' in text
  assert 'Not run yet: mrn/mgda-seed0.' in text


def test_table_only_restores_archived_runs(tmp_path):
  """Runs archived under <out>/runs/architectures-e10/<arch>/ (records and
  config only) make their rows on a machine with no runs/ folder."""
  from experiments.common import config as config_lib  # pylint: disable=g-import-not-at-top
  from experiments.common import reproduce  # pylint: disable=g-import-not-at-top

  def archive(arch, method, left, right, name):
    d = tmp_path / 'runs' / 'architectures-e10' / arch / f'{method}-seed0'
    d.mkdir(parents=True)
    config = reproduce.make_config(train.EXPERIMENT, method, 0, 10,
                                   {'architecture.name': name})
    (d / 'config.json').write_text(json.dumps(config_lib.flatten(config)))
    (d / 'metrics.jsonl').write_text('')
    (d / 'final.json').write_text(json.dumps({
        'epochs': 10, 'seconds_per_epoch': 5.0, 'test_acc_left': left,
        'test_acc_right': right}))

  archive('single', 'single_task', 0.95, 0.90, 'hard_sharing')
  archive('mrn', 'mgda_ub', 0.96, 0.90, 'mrn')
  reproduce_architectures.main([
      '--architectures', 'mrn', '--methods', 'mgda_ub', '--seeds', '0',
      '--runs', str(tmp_path / 'fresh'), '--out', str(tmp_path),
      '--table-only'])
  text = (tmp_path / 'ARCHITECTURES.md').read_text()
  assert '| MRN | MGDA-UB (ours) | 96.00 | 90.00 | -0.53 |' in text
  assert 'Not run yet' not in text
