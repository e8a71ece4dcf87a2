"""The TAG experiment: the eight-task MNIST set and the protocol, on
generated data."""

import json
import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.common import trainer
from experiments.tag import main as main_lib
from experiments.tag import mnist
from experiments.tag import protocol
from experiments.tag.configs import mnist_test
from mgda_jax import tag


def fake_splits(seed=0, n=300):
  rng = np.random.default_rng(seed)

  def split(m):
    digits = rng.integers(0, 10, size=(m, 2))
    images = rng.normal(size=(m, 28, 28, 1)).astype(np.float32)
    for i, (l, r) in enumerate(digits):  # the digits as bright blocks
      images[i, 2 + 2 * l:5 + 2 * l, 2:8] += 3.0
      images[i, 2 + 2 * r:5 + 2 * r, 18:24] += 3.0
    return images, mnist.derive_labels(digits)

  return trainer.Splits(split(n), split(100), split(100))


def test_labels_are_derived_from_the_digits():
  digits = np.array([[3, 7], [5, 5], [9, 0], [4, 6]])
  y = mnist.derive_labels(digits)
  assert y.shape == (4, 8) and y.dtype == np.int32
  for (l, r), row in zip(digits, y):
    expected = [l, r, l % 2, r % 2, int(l >= 5), int(r >= 5),
                int(l + r >= 10), int(l == r)]
    assert row.tolist() == expected


def test_binary_heads_are_two_class_cross_entropy():
  names = ('left', 'same')
  model = mnist.make_model(None, names, nnx.Rngs(0))
  graphdef, params, encode, task_losses = mnist.functional(model)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 28, 28, 1)),
                  jnp.float32)
  y = jnp.asarray([[1, 0], [2, 1], [3, 0], [9, 1], [0, 0], [5, 1]], jnp.int32)
  key = jax.random.key(0)
  z = jax.jit(encode)(params, x, y, key)
  losses, logits = jax.jit(task_losses)(params, z, x, y, key)
  # An independent reference: log-softmax over the task's own classes only.
  raw = jax.jit(lambda p, z: nnx.merge(graphdef, p).heads(
      z, key=jax.random.fold_in(key, 1), train=True))(params, z)
  for t, c in enumerate((10, 2)):
    logp = jax.nn.log_softmax(raw[t, :, :c], axis=-1)
    ref = -jnp.mean(logp[jnp.arange(6), y[:, t]])
    np.testing.assert_allclose(losses[t], ref, rtol=1e-5)
  assert np.all(np.asarray(logits[1, :, 2:]) < -1e8)  # masked classes


@pytest.fixture(name='report', scope='module')
def fixture_report(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('tag'))
  config = mnist_test.get_config()
  data = fake_splits()
  report = protocol.run_protocol(mnist.EXPERIMENT, config, workdir, data=data,
                                 log=lambda _: None)
  return report, workdir, config, data


def test_protocol_report_is_consistent(report):
  report, workdir, config, _ = report
  names = ['left', 'sum_ge10']
  assert report['tasks'] == names
  with open(os.path.join(workdir, 'tag.json')) as f:
    assert json.load(f)['tasks'] == names
  nets = report['networks']
  # HOA's affinity, recomputed from the pairs' and singles' validation
  # figures: [i, j] = task j's relative gain from training with task i.
  hoa = np.asarray(report['affinity']['HOA'])
  for i, a in enumerate(names):
    for j, b in enumerate(names):
      if i == j:
        continue
      pair = nets['-'.join(sorted([a, b], key=names.index))]['val'][b]
      alone = nets[b]['val'][b]
      np.testing.assert_allclose(hoa[i, j], (pair - alone) / alone)
  for r in report['results']:
    # Each task's figure is its serving group's network's.
    for t, name in enumerate(names):
      group = r['groups'][r['serving'][t]]
      assert name in group
      net = nets['-'.join(sorted(group, key=names.index))]
      assert r['test'][name] == net['test'][name]
    assert r['mean'] == pytest.approx(np.mean(list(r['test'].values())))
    assert len(r['groups']) <= r['budget']
    if r['method'] != 'random':
      sel = tag.select_groups(np.asarray(report['affinity'][r['method']]),
                              r['budget'])
      assert [list(g) for g in sel.groups] == [
          [names.index(n) for n in g] for g in r['groups']]
  # Costs are the networks' training seconds (no timing claim here); budget
  # 1 is all tasks together for every method.
  cost = report['cost']
  plain = nets['left-sum_ge10']['seconds']
  assert cost['plain_all_in_one'] == plain > 0
  assert cost['tag_overhead'] == pytest.approx(
      nets['left-sum_ge10-lookahead']['seconds'] / plain)
  assert cost['affinity_stage']['HOA'] == pytest.approx(
      nets['left']['seconds'] + nets['sum_ge10']['seconds'] + plain)
  assert {tuple(r['groups'][0]) for r in report['results']
          if r['budget'] == 1} == {tuple(names)}
  # The TAG network logged a 2x2 affinity every epoch.
  with open(os.path.join(workdir, 'runs', 'left-sum_ge10-lookahead',
                         'metrics.jsonl')) as f:
    rec = json.loads(f.readline())
  assert np.asarray(rec['affinity']).shape == (2, 2)
  assert rec['affinity_steps'] == config.max_train_examples // 32


def test_protocol_resumes_without_training_again(report):
  report, workdir, config, data = report
  messages = []
  again = protocol.run_protocol(mnist.EXPERIMENT, config, workdir, data=data,
                                log=messages.append)
  assert again['results'] == report['results']


def test_table_and_heatmap(report, tmp_path):
  report = report[0]
  text = protocol.table(report)
  assert '| TAG | 2 |' in text and 'every task alone' in text
  path = str(tmp_path / 'a.png')
  protocol.heatmap(report, path)
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_random_partition_covers_the_tasks():
  rng = np.random.default_rng(0)
  for b in (1, 2, 3, 8):
    groups = protocol.random_partition(range(8), b, rng)
    assert len(groups) == b and all(groups)
    assert sorted(t for g in groups for t in g) == list(range(8))


def test_cli_rejects_a_bad_budget(tmp_path):
  with pytest.raises(SystemExit, match='budgets'):
    main_lib.main(['tag', '--config.tag.budgets=(0,)',
                   f'--workdir={tmp_path}'])
  with pytest.raises(SystemExit, match='affinity.kind'):
    main_lib.main(['tag', '--config.affinity.kind=hessian',
                   f'--workdir={tmp_path}'])
