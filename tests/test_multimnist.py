"""Tests of the MultiMNIST pipeline and training program, on generated data."""

import gzip
import json
import os
import struct

from flax import nnx
import jax
import numpy as np
import optax
import pytest

from experiments.common import reproduce
from experiments.common import trainer
from experiments.multimnist import input_pipeline as ip
from experiments.multimnist import main as main_lib
from experiments.multimnist import models
from experiments.multimnist import train
from experiments.multimnist.configs import test as test_config
import mgda_jax


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
  with pytest.raises(ip.MnistError, match='config.data.mnist_dir'):
    ip.load_mnist(None, tfds_data_dir=str(tmp_path / 'empty'))
  # Download on, but no mirror answers (a closed local port): the same
  # advice, and what each mirror said.
  with pytest.raises(ip.MnistError, match='download failed.*offline.*'
                     'config.data.mnist_dir'):
    ip.load_mnist(None, tfds_data_dir=str(tmp_path / 'empty'),
                  download_dir=str(tmp_path / 'dl'),
                  mirrors=('http://127.0.0.1:9/',), log=lambda _: None)


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


def cfg(**overrides):
  c = test_config.get_config()
  for k, v in overrides.items():
    reproduce.set_field(c, k, v)
  return c


# Full MGDA (parameter gradients) trains through the framework in
# tests/test_multidevice.py, on one and eight devices.
@pytest.mark.parametrize('method', ['mgda_ub', 'graddrop', 'single_task'])
def test_an_epoch_records_well_formed_metrics(method, data, tmp_path):
  train.train_and_evaluate(cfg(method=method, epochs=1), str(tmp_path), data,
                           log=lambda _: None)
  if method == 'single_task':
    for name in ('left', 'right'):
      assert os.path.exists(tmp_path / name / 'metrics.jsonl')
    return
  with open(tmp_path / 'metrics.jsonl') as f:
    record = json.loads(f.readline())
  assert np.all(np.isfinite(record['train_loss']))
  assert 'nonfinite_steps' not in record  # written only when some were
  assert len(record['weights']) == 2
  assert len(record['val_acc']) == 2 and len(record['test_loss']) == 2
  if method == 'graddrop':  # no task weights: null, not NaN, in JSON
    assert record['weights'] == [None, None]
  if method == 'mgda_ub':
    np.testing.assert_allclose(sum(record['weights']), 1.0, rtol=1e-5)
    assert record['solver_gap'] >= 0


def _ref_step(tx, encode, task_losses, params, state, x, y, key):
  (losses, _), grads = mgda_jax.representation_grads(
      encode, task_losses, params, x, y, key, has_aux=True, per_task_z=2)
  updates, state = tx.update(grads, state, params, losses=losses)
  return optax.apply_updates(params, updates), state, losses


def test_an_epoch_is_the_documented_loop(data, tmp_path):
  """The framework's epoch equals a loop written here from its docstrings.

  Seeding: key(seed) -> (init, data, step) keys; the epoch's permutation
  from fold_in(data, epoch); step i's key fold_in(fold_in(step, epoch), i);
  MGDA-UB at Z chained with apply_if_finite(SGD with momentum); TAG's
  affinity (config.affinity) on steps 0, 3, 6 with the bare SGD's state
  before the step, the step's batch and key, the encoder shared.
  """
  c = cfg(method='mgda_ub', epochs=1, chunk=1, **{'affinity.every': 3})
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(c, workdir, data, log=lambda _: None)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    got = json.loads(f.readline())

  init_key, data_key, step_key = jax.random.split(jax.random.key(0), 3)
  model = models.MultiLeNet(('left', 'right'), 10, rngs=nnx.Rngs(
      int(jax.random.randint(init_key, (), 0, 2**31 - 1))))
  graphdef, params, encode, task_losses = models.functional(model)
  tx = optax.chain(mgda_jax.mgda_ub(2), optax.apply_if_finite(
      optax.sgd(0.05, momentum=0.9), 100))
  state = tx.init(params)
  x, y = data.train.images[:256], data.train.labels[:256]
  perm = np.asarray(jax.random.permutation(jax.random.fold_in(data_key, 1),
                                           256))
  epoch_key = jax.random.fold_in(step_key, 1)
  step = jax.jit(lambda *a: _ref_step(tx, encode, task_losses, *a))
  sgd = optax.sgd(0.05, momentum=0.9)

  @jax.jit
  def affinity(params, sgd_state, x, y, key):
    return mgda_jax.tag.lookahead_affinity(
        lambda p, x, y, k: task_losses(p, encode(p, x, y, k), x, y, k),
        params, x, y, key, has_aux=True, optimizer=sgd, opt_state=sgd_state,
        shared=lambda p: jax.tree_util.tree_map_with_path(
            lambda path, _: path[0].key == 'encoder', p)).affinity

  losses, affinities = [], []
  for i in range(256 // 32):
    idx = perm[i * 32:(i + 1) * 32]
    key = jax.random.fold_in(epoch_key, i)
    if i % 3 == 0:
      affinities.append(affinity(params, state[1].inner_state, x[idx], y[idx],
                                 key))
    params, state, l = step(params, state, x[idx], y[idx], key)
    losses.append(np.asarray(l))
  np.testing.assert_allclose(got['train_loss'], np.mean(losses, 0),
                             rtol=1e-5)
  assert got['affinity_steps'] == 3 and got['affinity_skipped'] == 0
  np.testing.assert_allclose(got['affinity'], np.mean(affinities, 0),
                             rtol=1e-4, atol=1e-6)
  logits = np.asarray(nnx.merge(graphdef, params)(data.test.images,
                                                  train=False))
  acc = (logits.argmax(-1) == data.test.labels.T).mean(1)
  np.testing.assert_allclose(got['test_acc'], acc, atol=1.5 / 120)


@pytest.mark.parametrize('method', ['mgda_ub', 'uniform_weighting'])
def test_the_cpu_default_chunk_records_what_a_step_per_call_records(
    method, data, tmp_path):
  """MultiMNIST scans 15 steps per call on CPU (``cpu_chunk``), which must
  train as a Python loop over one compiled step does: the same losses,
  weights and accuracies in every epoch's record (to 1e-6; bitwise on the
  development machine)."""
  assert train.EXPERIMENT.cpu_chunk == 15
  # 0: the default, 15 here (8 batches: chunks of 8); cfg(): two epochs.
  assert_same_records(lambda chunk: cfg(method=method, chunk=chunk), data,
                      tmp_path, epochs=2)


def assert_same_records(config_for_chunk, data, tmp_path, epochs):
  """Trains ``config_for_chunk(0)`` (the default chunk) and
  ``config_for_chunk(1)``; their ``epochs`` records must agree in every
  field but the seconds (to 1e-6)."""
  records = {}
  for chunk in (0, 1):
    workdir = tmp_path / str(chunk)
    train.train_and_evaluate(config_for_chunk(chunk), str(workdir), data,
                             log=lambda _: None)
    with open(workdir / 'metrics.jsonl') as f:
      records[chunk] = [json.loads(line) for line in f]
    for r in records[chunk]:
      r.pop('seconds')
  assert len(records[0]) == len(records[1]) == epochs
  for a, b in zip(records[0], records[1]):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_allclose(np.asarray(a[key], float),
                                 np.asarray(b[key], float), rtol=1e-6,
                                 atol=1e-7, err_msg=key)


def test_training_learns_the_fake_digits(data, tmp_path):
  c = cfg(method='mgda_ub', epochs=3, max_train_examples=0, batch_size=50,
          chunk=5)
  result = train.train_and_evaluate(c, str(tmp_path), data, log=lambda _: None)
  # Ten classes: chance is 0.1; the block digits are easy to learn.
  assert result['test_acc_left'] > 0.5 and result['test_acc_right'] > 0.3


def test_evaluation_counts_every_example(data):
  c = cfg(eval_batch_size=64)  # 120 = 2 x 60
  model = models.MultiLeNet(('left', 'right'), 10, rngs=nnx.Rngs(0))
  graphdef, params, state, encode, task_losses, metrics = trainer.split_model(
      train.EXPERIMENT, model)
  method = trainer.methods_lib.build(c, 2, steps_per_epoch=1,
                                     shared=train.EXPERIMENT.shared)
  _, evaluate = trainer.make_functions(
      train.EXPERIMENT, c, (graphdef, encode, task_losses, metrics), method, 2)
  x, y = data.test.images, data.test.labels
  got = evaluate(params, state, x, y)
  logits = np.asarray(model(x), np.float64)  # independent: all 120 at once
  np.testing.assert_allclose(got['acc'], (logits.argmax(-1) == y.T).mean(1),
                             rtol=1e-6)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, y.T[..., None], -1)[..., 0].mean(1)
  np.testing.assert_allclose(got['loss'], nll, rtol=1e-4)


def test_prior_is_the_entropy_of_the_training_labels(data):
  args = train.method_args(cfg(), data, (0, 1))
  priors = np.asarray(args['prior_loss_weighting']['priors'])
  for i in range(2):
    p = np.bincount(data.train.labels[:, i], minlength=10) / len(
        data.train.labels)
    p = p[p > 0]
    np.testing.assert_allclose(priors[i], -(p * np.log(p)).sum(), rtol=1e-5)


def test_nonfinite_data_is_rejected(data, tmp_path):
  images = data.train.images.copy()
  images[3] = np.nan
  bad = ip.MultiMnist(ip.Split(images, data.train.labels), data.val, data.test)
  with pytest.raises(ValueError, match='train inputs hold non-finite'):
    train.train_and_evaluate(cfg(epochs=1), str(tmp_path), bad,
                             log=lambda _: None)


@pytest.mark.parametrize('method', ['uniform_weighting', 'mgda_ub'])
def test_nonfinite_steps_are_skipped_by_the_method_chain(method):
  tx = trainer.methods_lib.build(cfg(method=method), 2, steps_per_epoch=1,
                                 shared=None).tx
  params = {'w': np.ones(3, np.float32)}
  state = tx.init(params)
  good = {'w': np.ones((2, 3), np.float32)}
  bad = {'w': np.array([[1.0, np.nan, 1.0], [1.0, 1.0, 1.0]], np.float32)}
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

  def run(epochs, workdir, log=lambda _: None):
    # every=3 over 8 steps an epoch: the schedule crosses the epochs.
    return train.train_and_evaluate(
        cfg(epochs=epochs, **{'affinity.every': 3}), workdir, data, log=log)

  run(2, straight)
  run(1, resumed)
  # An interrupted epoch leaves a half-written line; resume discards it.
  with open(os.path.join(resumed, 'metrics.jsonl'), 'a') as f:
    f.write('{"epoch": 2, "train_lo')
  messages = []
  run(2, resumed, messages.append)  # a longer run is a resumable change
  assert any('resumed from the checkpoint of epoch 1' in m for m in messages)
  read = lambda d: [json.loads(l) for l in open(os.path.join(d,
                                                             'metrics.jsonl'))]
  a, b = read(straight), read(resumed)
  assert [r['epoch'] for r in b] == [1, 2]
  for ra, rb in zip(a, b):
    np.testing.assert_allclose(rb['train_loss'], ra['train_loss'], rtol=1e-6)
    np.testing.assert_allclose(rb['test_acc'], ra['test_acc'])
    np.testing.assert_allclose(rb['weights'], ra['weights'], rtol=1e-6)
    np.testing.assert_allclose(rb['affinity'], ra['affinity'], rtol=1e-5)
    assert rb['affinity_steps'] == ra['affinity_steps']
  # Steps 0, 3, 6 of epoch 1; 9, 12, 15 (= 1, 4, 7) of epoch 2.
  assert [r['affinity_steps'] for r in a] == [3, 3]


def test_resume_with_a_changed_config_names_the_fields(data, tmp_path):
  workdir = str(tmp_path / 'w')
  train.train_and_evaluate(cfg(epochs=1), workdir, data, log=lambda _: None)
  saved = open(os.path.join(workdir, 'config.json')).read()
  changed = cfg(epochs=1, **{'optimizer.learning_rate': 0.1,
                             'mgda_ub.normalizer': 'l2'})
  with pytest.raises(ValueError, match=r"mgda_ub.normalizer: 'none' -> 'l2'"
                     r'.*optimizer.learning_rate: 0.05 -> 0.1'):
    train.train_and_evaluate(changed, workdir, data, log=lambda _: None)
  assert open(os.path.join(workdir, 'config.json')).read() == saved
  messages = []
  train.train_and_evaluate(changed, workdir, data, log=messages.append,
                           force=True)
  assert open(os.path.join(workdir, 'config.1.json')).read() == saved
  assert any('config changed on resume' in m for m in messages)


def test_cli_bad_config_and_missing_data(tmp_path, capsys):
  with pytest.raises(SystemExit, match='epochs must be >= 1'):
    main_lib.main(['prog', '--config.epochs=0'])
  with pytest.raises(SystemExit, match='devices=64 but only'):
    main_lib.main(['prog', '--config.devices=64'])
  with pytest.raises(SystemExit, match='config.cagrad.c=0.2 is set, but '
                     "config.method is 'famo'"):
    main_lib.main(['prog', '--config.method=famo', '--config.cagrad.c=0.2'])
  with pytest.raises(SystemExit, match='config.mgda_ub.normalizer'):
    main_lib.main(['prog', '--config.method=famo',
                   '--config.mgda_ub.normalizer=l2'])
  with pytest.raises(SystemExit, match='config.method must be one of'):
    main_lib.main(['prog', '--config.method=kendall'])
  with pytest.raises(SystemExit, match='config.data.mnist_dir'):
    main_lib.main(['prog', f'--config.data.mnist_dir={tmp_path / "missing"}',
                   f'--workdir={tmp_path / "w"}',
                   f'--config.data.cache_dir={tmp_path / "c"}'])
  capsys.readouterr()


def test_cli_end_to_end_on_idx_files(mnist_dir, tmp_path, capsys):
  path, _ = mnist_dir
  test_file = os.path.join(os.path.dirname(main_lib.DEFAULT_CONFIG), 'test.py')
  result = main_lib.main([
      'prog', f'--config={test_file}', '--config.epochs=1',
      '--config.method=cagrad', '--config.cagrad.c=0.2',
      f'--config.data.mnist_dir={path}', f'--workdir={tmp_path / "w"}',
      f'--config.data.cache_dir={tmp_path / "c"}'])
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert json.loads(last) == json.loads(json.dumps(result))
  assert result['method'] == 'cagrad'
  saved = json.load(open(tmp_path / 'w' / 'config.json'))
  assert saved['cagrad.c'] == 0.2 and saved['epochs'] == 1
  assert os.path.exists(tmp_path / 'w' / 'tensorboard')
