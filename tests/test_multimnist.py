"""Tests of the MultiMNIST pipeline and training program, on generated data."""

import gzip
import json
import os
import struct

import numpy as np
import pytest

from experiments.multimnist import input_pipeline as ip
from experiments.multimnist import main as main_lib
from experiments.multimnist import train
from experiments.multimnist.configs import default
from experiments.multimnist.configs import test as test_config


def write_idx(path, array, compress):
  header = struct.pack('>BBBB', 0, 0, 0x08, array.ndim) + struct.pack(
      '>' + 'I' * array.ndim, *array.shape)
  data = header + np.ascontiguousarray(array, np.uint8).tobytes()
  if compress:
    with gzip.open(path + '.gz', 'wb') as f:
      f.write(data)
  else:
    with open(path, 'wb') as f:
      f.write(data)


def fake_mnist(rng, n_train=600, n_test=120):
  """Digits drawn as bright blocks whose position encodes the label."""

  def digits(n):
    labels = rng.integers(0, 10, size=n)
    images = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
    for i, l in enumerate(labels):
      r, c = 2 + 2 * (l // 5) * 5, 2 + 5 * (l % 5)
      images[i, r:r + 6, c:c + 4] = 255
    return images, labels

  tr, te = digits(n_train), digits(n_test)
  return ip.Mnist(tr[0], tr[1], te[0], te[1])


@pytest.fixture(name='mnist_dir')
def fixture_mnist_dir(tmp_path):
  mnist = fake_mnist(np.random.default_rng(0))
  for i, (key, name) in enumerate(ip.IDX_FILES.items()):
    write_idx(str(tmp_path / name), getattr(mnist, key), compress=i % 2 == 0)
  return str(tmp_path), mnist


# ----------------------------------------------------------------------------
# Reading MNIST


def test_idx_files_round_trip(mnist_dir):
  path, mnist = mnist_dir
  got, where = ip.load_mnist(path)
  assert where.startswith('idx:')
  for a, b in zip(got, mnist):
    np.testing.assert_array_equal(a, b)


def test_corrupt_and_missing_files_raise_clear_errors(mnist_dir, tmp_path):
  path, _ = mnist_dir
  target = os.path.join(path, 't10k-labels-idx1-ubyte')
  with open(target, 'rb') as f:
    data = f.read()
  with open(target, 'wb') as f:
    f.write(data[:-5])  # truncated
  with pytest.raises(ip.MnistError, match='expected 120 bytes'):
    ip.load_mnist(path)
  with open(target, 'wb') as f:
    f.write(b'\x00\x00\x09\x01' + data[4:])  # not unsigned bytes
  with pytest.raises(ip.MnistError, match='bad magic'):
    ip.load_mnist(path)
  with pytest.raises(ip.MnistError, match='missing MNIST file'):
    ip.load_mnist(str(tmp_path / 'nowhere'))


def test_offline_without_data_says_how_to_fix(tmp_path):
  with pytest.raises(ip.MnistError, match='--mnist-dir'):
    ip.load_mnist(None, tfds_data_dir=str(tmp_path / 'empty'))


def test_tfds_data_source_with_mock_data():
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=30):
    mnist = ip.read_tfds(None)
  assert mnist.train_images.shape == (30, 28, 28)
  assert mnist.train_images.dtype == np.uint8
  assert mnist.test_labels.shape == (30,)
  assert mnist.train_labels.max() <= 9


# ----------------------------------------------------------------------------
# MultiMNIST construction


def test_overlay_matches_the_definition():
  rng = np.random.default_rng(1)
  left = rng.integers(0, 256, size=(3, 28, 28)).astype(np.uint8)
  right = rng.integers(0, 256, size=(3, 28, 28)).astype(np.uint8)
  canvas = ip.overlay(left, right)
  expected = np.zeros((3, 36, 36), np.uint8)
  for n in range(3):
    for r in range(36):
      for c in range(36):
        a = left[n, r, c] if r < 28 and c < 28 else 0
        b = right[n, r - 6, c - 6] if 6 <= r < 34 and 6 <= c < 34 else 0
        expected[n, r, c] = max(a, b)
  np.testing.assert_array_equal(canvas, expected)


def test_pairs_are_seeded_labelled_and_never_self():
  mnist = fake_mnist(np.random.default_rng(2))
  a = ip.build_multimnist(mnist, seed=3)
  b = ip.build_multimnist(mnist, seed=3)
  c = ip.build_multimnist(mnist, seed=4)
  np.testing.assert_array_equal(a.train.images, b.train.images)
  assert not np.array_equal(a.train.labels, c.train.labels)
  assert len(a.train.labels) == 500 and len(a.val.labels) == 100
  assert len(a.test.labels) == 120
  assert a.train.images.shape[1:] == (28, 28, 1)
  assert a.train.images.dtype == np.float32
  # Left labels are the images' own (in order, test split unshuffled).
  np.testing.assert_array_equal(a.test.labels[:, 0], mnist.test_labels)
  # Recover each test pair's partner from the images and check its label.
  rng = np.random.default_rng(3)
  rng.permutation(600)
  partner = rng.permutation(120)
  same = partner == np.arange(120)
  partner[same] = (partner[same] + 1) % 120
  assert not np.any(partner == np.arange(120))
  np.testing.assert_array_equal(a.test.labels[:, 1],
                                mnist.test_labels[partner])


def test_cache_is_reused_and_rebuilt_when_corrupt(mnist_dir, tmp_path,
                                                  monkeypatch):
  path, _ = mnist_dir
  cache = str(tmp_path / 'cache')
  first = ip.load_multimnist(cache, 0, mnist_dir=path, log=lambda _: None)
  files = os.listdir(cache)
  assert len(files) == 1
  built = []
  real_build = ip.build_multimnist
  monkeypatch.setattr(ip, 'build_multimnist',
                      lambda *a: built.append(1) or real_build(*a))
  again = ip.load_multimnist(cache, 0, mnist_dir=path, log=lambda _: None)
  assert not built
  np.testing.assert_array_equal(again.val.images, first.val.images)
  with open(os.path.join(cache, files[0]), 'wb') as f:
    f.write(b'not an npz')
  messages = []
  rebuilt = ip.load_multimnist(cache, 0, mnist_dir=path, log=messages.append)
  assert built and any('rebuilding' in m for m in messages)
  np.testing.assert_array_equal(rebuilt.test.labels, first.test.labels)


# ----------------------------------------------------------------------------
# Training


@pytest.fixture(name='data', scope='module')
def fixture_data():
  return ip.build_multimnist(fake_mnist(np.random.default_rng(5)), seed=0)


@pytest.mark.parametrize('method', default.METHODS)
def test_every_configured_method_builds(method):
  """Every method of the config builds its transform and gradient kind.

  (What each method computes is tested for every registered method in
  tests/test_every_method.py; training every one here cost minutes and
  could not fail.)
  """
  config = test_config.get_config(method=method)
  tx, kind, diagnostics = train.make_method(config, 2)
  assert kind in ('representation', 'parameters')
  assert callable(diagnostics) and hasattr(tx, 'update')


@pytest.mark.parametrize('method', ['mgda_ub', 'mgda', 'graddrop',
                                    'single_task'])
def test_an_epoch_records_well_formed_metrics(method, data, tmp_path):
  config = test_config.get_config(method=method, epochs=1)
  train.train_and_evaluate(config, str(tmp_path), data, log=lambda _: None)
  if method != 'single_task':
    with open(tmp_path / 'metrics.jsonl') as f:
      record = json.loads(f.readline())
    assert np.all(np.isfinite(record['train_loss']))
    assert 'nonfinite_steps' not in record  # written only when some were
    assert len(record['weights']) == 2
    if method == 'graddrop':  # no task weights: null, not NaN, in JSON
      assert record['weights'] == [None, None]
    if method in ('mgda', 'mgda_ub'):
      np.testing.assert_allclose(sum(record['weights']), 1.0, rtol=1e-5)
      assert record['solver_gap'] >= 0


def test_training_learns_the_fake_digits(data, tmp_path):
  config = test_config.get_config(method='mgda_ub', epochs=3,
                                  max_train_examples=0, batch_size=50,
                                  chunk=5)
  result = train.train_and_evaluate(config, str(tmp_path), data,
                                    log=lambda _: None)
  # Ten classes: chance is 0.1; the block digits are easy to learn.
  assert result['test_acc_left'] > 0.5 and result['test_acc_right'] > 0.3


def test_evaluation_counts_every_example(data):
  config = test_config.get_config(eval_batch_size=64)  # 120 = 2 x 60
  model = train.models.MultiLeNet(train.TASK_NAMES, 10,
                                  rngs=train.nnx.Rngs(0))
  graphdef, params, encode, task_losses = train.models.functional(model)
  tx, kind, diag = train.make_method(config, 2)
  _, evaluate = train.make_functions(config, (graphdef, encode, task_losses),
                                     tx, kind, diag)
  x, y = data.test.images, data.test.labels
  _, acc = evaluate(params, x, y)
  logits = np.asarray(model(x))  # independent: all 120 at once
  expected = (logits.argmax(-1) == y.T).mean(1)
  np.testing.assert_allclose(acc, expected, rtol=1e-6)


def test_nonfinite_data_is_rejected(data, tmp_path):
  images = data.train.images.copy()
  images[3] = np.nan
  bad = ip.MultiMnist(ip.Split(images, data.train.labels), data.val, data.test)
  config = test_config.get_config(method='mgda_ub', epochs=1)
  with pytest.raises(ValueError, match='train images hold non-finite'):
    train.train_and_evaluate(config, str(tmp_path), bad, log=lambda _: None)


@pytest.mark.parametrize('method', ['uniform', 'mgda_ub'])
def test_nonfinite_steps_are_skipped_by_the_method_chain(method):
  config = test_config.get_config(method=method)
  tx, _, _ = train.make_method(config, 2)
  params = {'w': np.ones(3, np.float32)}
  state = tx.init(params)
  good = {'w': np.ones((2, 3), np.float32)}
  bad = {'w': np.array([[1.0, np.nan, 1.0], [1.0, 1.0, 1.0]], np.float32)}
  if method == 'mgda_ub':  # per-task gradients through the same pullback
    import mgda_jax  # pylint: disable=g-import-not-at-top
    as_rep = lambda g: mgda_jax.representation_grads(
        lambda p: p['w'], lambda p, z: z @ g['w'].T, params)[1]
    good, bad = as_rep(good), as_rep(bad)
  upd, state = tx.update(bad, state, params, losses=np.ones(2, np.float32))
  np.testing.assert_array_equal(upd['w'], 0.0)  # skipped
  upd, state = tx.update(good, state, params, losses=np.ones(2, np.float32))
  assert np.all(np.isfinite(upd['w'])) and np.any(upd['w'] != 0)


def test_resume_loses_nothing(data, tmp_path):
  straight = str(tmp_path / 'straight')
  resumed = str(tmp_path / 'resumed')
  cfg = lambda e: test_config.get_config(method='mgda_ub', epochs=e)
  train.train_and_evaluate(cfg(2), straight, data, log=lambda _: None)
  train.train_and_evaluate(cfg(1), resumed, data, log=lambda _: None)
  # An interrupted epoch leaves a half-written line; resume discards it.
  with open(os.path.join(resumed, 'metrics.jsonl'), 'a') as f:
    f.write('{"epoch": 2, "train_lo')
  messages = []
  train.train_and_evaluate(cfg(2), resumed, data, log=messages.append)
  assert any('resumed from the checkpoint of epoch 1' in m for m in messages)
  read = lambda d: [json.loads(l) for l in open(os.path.join(d,
                                                             'metrics.jsonl'))]
  a, b = read(straight), read(resumed)
  assert [r['epoch'] for r in b] == [1, 2]
  for ra, rb in zip(a, b):
    np.testing.assert_allclose(rb['train_loss'], ra['train_loss'], rtol=1e-6)
    np.testing.assert_allclose(rb['test_acc'], ra['test_acc'])
    np.testing.assert_allclose(rb['weights'], ra['weights'], rtol=1e-6)


def test_cli_bad_config_and_missing_data(tmp_path, capsys):
  with pytest.raises(SystemExit, match='epochs must be >= 1'):
    main_lib.main(['--epochs', '0'])
  with pytest.raises(SystemExit, match='devices=64 but only'):
    main_lib.main(['--devices', '64'])
  with pytest.raises(SystemExit, match='--mnist-dir'):
    main_lib.main(['--mnist-dir', str(tmp_path / 'missing'), '--workdir',
                   str(tmp_path / 'w'), '--cache-dir', str(tmp_path / 'c')])
  capsys.readouterr()


def test_cli_end_to_end_on_idx_files(mnist_dir, tmp_path, capsys):
  path, _ = mnist_dir
  result = main_lib.main(['--config', 'test', '--epochs', '1', '--mnist-dir',
                          path, '--workdir', str(tmp_path / 'w'),
                          '--cache-dir', str(tmp_path / 'c')])
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert json.loads(last) == json.loads(json.dumps(result))
  assert os.path.exists(tmp_path / 'w' / 'tensorboard')

