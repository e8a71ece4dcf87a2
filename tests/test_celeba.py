"""CelebA: the loaders on generated files in the official layout and TFDS
mock data, the metrics on a hand-computed example, and training steps."""

import json
import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.celeba import input_pipeline as ip
from experiments.celeba import models
from experiments.celeba import train
from experiments.celeba.configs import test as test_config
from experiments.common import reproduce
from experiments.common import trainer
from experiments.tag import protocol
from experiments.tag.configs import celeba as tag_celeba


def write_folder(root, n=24, png=False, nested=False, seed=0):
  """The official layout: attribute and partition lists, aligned images.

  Image ``i`` is a flat colour ``(i * 10, 255 - i * 10, 7)``, so a resized
  image still names its file.
  """
  from PIL import Image
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, size=(n, 40))
  names = [f'{i + 1:06d}.jpg' for i in range(n)]
  part = np.array([0] * (n - 8) + [1] * 4 + [2] * 4)
  rng.shuffle(part)
  anno = os.path.join(root, 'Anno') if nested else root
  evald = os.path.join(root, 'Eval') if nested else root
  imgs = os.path.join(root, 'Img' if nested else '',
                      'img_align_celeba_png' if png else 'img_align_celeba')
  for d in (anno, evald, imgs):
    os.makedirs(d, exist_ok=True)
  with open(os.path.join(anno, 'list_attr_celeba.txt'), 'w') as f:
    f.write(f'{n}\n' + ' '.join(ip.ATTRIBUTES) + '\n')
    for name, row in zip(names, labels):
      f.write(name + '  ' + ' '.join('1' if v else '-1' for v in row) + '\n')
  with open(os.path.join(evald, 'list_eval_partition.txt'), 'w') as f:
    for name, p in zip(names, part):
      f.write(f'{name} {p}\n')
  for i, name in enumerate(names):
    img = np.zeros((218, 178, 3), np.uint8)
    img[...] = (i * 10, 255 - i * 10, 7)
    if png:
      Image.fromarray(img).save(os.path.join(imgs, name[:-4] + '.png'))
    else:
      Image.fromarray(img).save(os.path.join(imgs, name), quality=95)
  return labels, part


@pytest.mark.parametrize('png,nested', [(False, False), (True, True)])
def test_folder_reader(tmp_path, png, nested):
  labels, part = write_folder(str(tmp_path), png=png, nested=nested)
  data = ip.read_folder(str(tmp_path), log=lambda _: None)
  for code, split in enumerate(data):
    idx = np.flatnonzero(part == code)
    assert split.images.shape == (len(idx), 64, 64, 3)
    assert split.images.dtype == np.uint8
    np.testing.assert_array_equal(split.labels, labels[idx])  # -1 -> 0
    # Each image is its own file's (flat colour survives the resize).
    red = split.images[:, 32, 32, 0].astype(int)
    np.testing.assert_allclose(red, idx * 10, atol=3)


def test_corrupt_and_missing_files(tmp_path):
  root = str(tmp_path)
  write_folder(root)
  attr = os.path.join(root, 'list_attr_celeba.txt')
  text = open(attr).read()
  with open(attr, 'w') as f:
    f.write(text.rsplit('\n', 3)[0] + '\n')  # two lines short
  with pytest.raises(ip.CelebAError, match='truncated'):
    ip.read_folder(root, log=lambda _: None)
  with open(attr, 'w') as f:
    f.write(text.replace('Young', 'Old'))
  with pytest.raises(ip.CelebAError, match='40 attributes'):
    ip.read_folder(root, log=lambda _: None)
  with open(attr, 'w') as f:
    f.write(text.replace(' -1', ' 0', 1))
  with pytest.raises(ip.CelebAError, match='1 or -1'):
    ip.read_folder(root, log=lambda _: None)
  with open(attr, 'w') as f:
    f.write(text)
  img = os.path.join(root, 'img_align_celeba', '000003.jpg')
  with open(img, 'wb') as f:
    f.write(b'not a jpeg')
  with pytest.raises(ip.CelebAError, match='unreadable image'):
    ip.read_folder(root, log=lambda _: None)
  os.remove(img)
  with pytest.raises(ip.CelebAError, match='missing image'):
    ip.read_folder(root, log=lambda _: None)
  with pytest.raises(ip.CelebAError, match='official CelebA files'):
    ip.read_folder(str(tmp_path / 'nowhere'), log=lambda _: None)


def test_tfds_reader_with_mock_data():
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=6):
    data = ip.read_tfds(None, log=lambda _: None)
  for split in data:
    assert split.images.shape == (6, 64, 64, 3)
    assert split.labels.shape == (6, 40)
    assert set(np.unique(split.labels)) <= {0, 1}


def test_cache_is_used_and_rebuilt(tmp_path, monkeypatch):
  root = str(tmp_path / 'celeba')
  write_folder(root)
  cache = str(tmp_path / 'cache')
  first = ip.load_celeba(cache, celeba_dir=root, log=lambda _: None)
  monkeypatch.setattr(ip, 'read_folder', lambda *a: 1 / 0)
  again = ip.load_celeba(cache, celeba_dir=root, log=lambda _: None)
  np.testing.assert_array_equal(first.train.images, again.train.images)
  (path,) = [os.path.join(cache, f) for f in os.listdir(cache)]
  with open(path, 'wb') as f:
    f.write(b'garbage')
  with pytest.raises(ZeroDivisionError):  # unreadable: rebuilt from source
    ip.load_celeba(cache, celeba_dir=root, log=lambda _: None)


def test_metrics_on_a_hand_computed_example():
  model = models.FaceNet(('a', 'b'), rngs=nnx.Rngs(0), small=True)
  # Heads with zero weights: the logits are the biases for every image.
  model.heads.w[...] = jnp.zeros_like(model.heads.w[...])
  model.heads.b[...] = jnp.array([[0.0, 1.0], [2.0, 0.0]])  # predict 1, 0
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  x = jnp.zeros((4, 64, 64, 3), jnp.uint8)
  y = jnp.array([[1, 0], [0, 0], [1, 1], [1, 1]], jnp.int32)
  m = train.eval_metrics(graphdef, params, x, y, stats)
  np.testing.assert_array_equal(m['err'], [1, 2])
  np.testing.assert_array_equal(m['acc'], [3, 2])
  lse_a = np.log(1 + np.e)   # log(e^0 + e^1)
  lse_b = np.log(1 + np.e ** 2)
  nll_a = 3 * (lse_a - 1) + 1 * lse_a
  nll_b = 2 * (lse_b - 2) + 2 * lse_b
  np.testing.assert_allclose(m['loss'], [nll_a, nll_b], rtol=1e-5)


@pytest.fixture(name='data', scope='module')
def fixture_data(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('celeba'))
  write_folder(root)
  return trainer.Splits(*((s.images, s.labels)
                          for s in ip.read_folder(root, log=lambda _: None)))


@pytest.mark.parametrize('method', ['mgda_ub', 'mgda'])
def test_training_updates_batchnorm_and_resumes(data, tmp_path, method):
  c = test_config.get_config()
  c.method = method
  c.tasks = (0, 1, 2)
  workdir = str(tmp_path / method)
  out = trainer.train_and_evaluate(train.EXPERIMENT, c, workdir, data=data,
                                   log=lambda _: None)
  assert 0.0 <= out['test_err_5_o_Clock_Shadow'] <= 1.0
  rec = json.loads(open(os.path.join(workdir, 'metrics.jsonl')).readline())
  assert np.all(np.isfinite(rec['train_loss']))
  # The BatchNorm statistics moved and were checkpointed.
  import orbax.checkpoint as ocp
  manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir,
                                                               'checkpoints')))
  saved = manager.restore(manager.latest_step())
  init = nnx.split(models.FaceNet(('a', 'b', 'c'), rngs=nnx.Rngs(0),
                                  small=True), nnx.Param, nnx.BatchStat)[2]
  moved = [not np.allclose(a, b) for a, b in zip(
      jax.tree.leaves(saved['model_state']), jax.tree.leaves(init))]
  assert any(moved)
  if method == 'mgda':
    return
  # Another epoch resumes from it.
  c.epochs = 2
  msgs = []
  trainer.train_and_evaluate(train.EXPERIMENT, c, workdir, data=data,
                             log=msgs.append)
  assert any('resumed from the checkpoint of epoch 1' in m for m in msgs)


def test_tag_celeba_config_runs_on_generated_data(data, tmp_path):
  c = tag_celeba.get_config()
  assert [train.TASKS.names[t] for t in c.tasks] == list(
      tag_celeba.ATTRIBUTES)
  for k, v in {'epochs': 1, 'batch_size': 8, 'eval_batch_size': 8,
               'chunk': 1}.items():
    reproduce.set_field(c, k, v)
  sub = protocol.network_config(c, c.tasks[:3], every=1, kind='lookahead')
  out = trainer.train_and_evaluate(train.EXPERIMENT, sub, str(tmp_path),
                                   data=data, log=lambda _: None)
  z = np.asarray(out['affinity'])
  assert z.shape == (3, 3) and np.all(np.isfinite(z))
