"""The dense experiments: Cityscapes' tasks, metrics, network and configs,
and the dense MultiMNIST scenes, on generated data."""

import json
import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.cityscapes import dense
from experiments.cityscapes import input_pipeline
from experiments.cityscapes import main as cityscapes_main
from experiments.cityscapes import models
from experiments.cityscapes import train
from experiments.cityscapes.configs import test as test_config
from experiments.common import trainer
from experiments.dense_mnist import input_pipeline as scenes
from experiments.dense_mnist import train as dense_mnist
from experiments.dense_mnist.configs import test as scenes_config
from experiments.multimnist import input_pipeline as mnist_pipeline
from test_cityscapes_data import write_official, write_preprocessed

# --------------------------------------------------------------------------
# Metrics and losses against hand-computed examples.


def test_miou_and_pixel_accuracy_by_hand():
  # One 2x3 image, 3 classes; one pixel ignored.
  labels = np.array([[[0, 0, 1], [2, 255, 1]]], np.uint8)
  pred_cls = np.array([[[0, 1, 1], [2, 2, 0]]])
  logits = jax.nn.one_hot(pred_cls, 3) * 5.0
  acc = dense.accumulators('semantic', logits, labels, 3)
  r = dense.reduce(acc, 1, ['semantic'])
  # Labelled pixels: (0,0) 0->0 ok, (0,1) 0->1, (0,2) 1->1 ok, (1,0) 2->2
  # ok, (1,2) 1->0. Class 0: I=1, U=|{(0,0),(0,1),(1,2)}|=3; class 1: I=1,
  # U=|{(0,1),(0,2),(1,2)}|=3; class 2: I=1, U=1 (the ignored pixel's
  # prediction does not count).
  np.testing.assert_allclose(r['score'], [(1 / 3 + 1 / 3 + 1) / 3], rtol=1e-6)
  np.testing.assert_allclose(r['pixacc'], [3 / 5], rtol=1e-6)
  assert np.isnan(r['relerr'][0])


def test_miou_skips_absent_classes_and_accumulates_over_batches():
  # Class 2 never appears (neither predicted nor labelled): left out.
  a = dense.accumulators('semantic', jax.nn.one_hot(jnp.array([[[0, 1]]]), 3),
                         np.array([[[0, 1]]], np.uint8), 3)
  b = dense.accumulators('semantic', jax.nn.one_hot(jnp.array([[[0, 0]]]), 3),
                         np.array([[[0, 1]]], np.uint8), 3)
  total = jax.tree.map(lambda x, y: x + y, a, b)
  r = dense.reduce(total, 2, ['semantic'])
  # Class 0: I=2, U=3; class 1: I=1, U=2. Not the mean of per-batch mIoUs.
  np.testing.assert_allclose(r['score'], [(2 / 3 + 1 / 2) / 2], rtol=1e-6)


def test_instance_and_depth_errors_by_hand():
  offset = np.zeros((1, 1, 3, 2), np.float32)
  offset[0, 0] = [[1, 2], [3, 4], [9, 9]]
  valid = np.array([[[1, 1, 0]]], np.float32)
  pred = np.zeros((1, 1, 3, 2), np.float32)
  label = {'offset': offset, 'valid': valid}
  # Mean |error| over the 2 valid pixels' 4 coordinates: (1+2+3+4)/4.
  np.testing.assert_allclose(dense.instance_loss(pred, label), 2.5)
  depth = np.array([[[2.0, 0.0, 4.0]]], np.float32)
  pd = np.array([[[[1.0], [7.0], [5.0]]]], np.float32)
  np.testing.assert_allclose(dense.depth_loss(pd, depth), 1.0)  # (1 + 1) / 2
  acc = {**dense.accumulators('instance', pred, label, 0),
         **dense.accumulators('depth', pd, depth, 0)}
  r = dense.reduce(acc, 1, ['instance', 'depth'])
  np.testing.assert_allclose(r['score'], [2.5, 1.0])
  np.testing.assert_allclose(r['relerr'][1], (1 / 2 + 1 / 4) / 2)
  assert np.isnan(r['relerr'][0]) and np.isnan(r['pixacc']).all()


def test_semantic_loss_is_cross_entropy_over_labelled_pixels():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
  labels = rng.integers(0, 5, (2, 3, 4)).astype(np.uint8)
  labels[0, 0] = 255
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  keep = labels != 255
  want = -np.mean(np.take_along_axis(
      logp, np.where(keep, labels, 0)[..., None].astype(int), -1)[..., 0][keep])
  np.testing.assert_allclose(dense.semantic_loss(logits, labels), want,
                             rtol=1e-5)


def test_adaptive_pool_matches_pytorch_bins():
  # PyTorch's adaptive bins for 5 -> 3: [0, 2), [1, 4), [3, 5).
  m = models.adaptive_pool_matrix(5, 3)
  np.testing.assert_allclose(m, [[.5, .5, 0, 0, 0], [0, 1 / 3, 1 / 3, 1 / 3, 0],
                                 [0, 0, 0, .5, .5]])
  x = jnp.arange(2 * 5 * 7 * 1, dtype=jnp.float32).reshape(2, 5, 7, 1)
  out = models.adaptive_avg_pool(x, 3)
  np.testing.assert_allclose(out[1, 2, 0, 0], np.mean(x[1, 3:5, 0:3, 0]),
                             rtol=1e-6)


# --------------------------------------------------------------------------
# The network.


def test_dilated_resnet50_shape_and_parameter_count():
  model = nnx.eval_shape(lambda: models.DilatedResNet50(rngs=nnx.Rngs(0)))
  n = sum(np.prod(p.shape) for p in jax.tree.leaves(nnx.state(model,
                                                              nnx.Param)))
  # torchvision's resnet50 has 25,557,032 parameters, of which the final
  # Linear(2048, 1000) holds 2,049,000: the backbone 23,508,032 (dilation
  # changes no shape).
  assert n == 23_508_032
  z = jax.eval_shape(lambda x: models.DilatedResNet50(rngs=nnx.Rngs(0))(x),
                     jax.ShapeDtypeStruct((2, 256, 512, 3), jnp.uint8))
  assert z.shape == (2, 32, 64, 2048)  # the paper's 2048 x 32 x 64


def test_pyramid_decoder_parameter_count():
  cin, out, width, bins = 64, 19, 32, (1, 2, 3, 6)
  dec = models.PyramidDecoder(cin, out, width=width, bins=bins,
                              rngs=nnx.Rngs(0))
  n = sum(np.prod(p.shape) for p in jax.tree.leaves(nnx.state(dec, nnx.Param)))
  red = cin // 4
  want = (len(bins) * (cin * red + 2 * red)            # 1x1 convs, GroupNorm
          + 9 * (cin + len(bins) * red) * width + 2 * width  # 3x3, GroupNorm
          + width * out + out)                          # classifier
  assert n == want


# --------------------------------------------------------------------------
# Training through the framework on generated files.


def _config(**kw):
  c = test_config.get_config()
  for k, v in kw.items():
    node = c
    *path, last = k.split('__')
    for p in path:
      node = node[p]
    node[last] = v
  return c


# MGDA-UB (gradients at the representation); the parameter path and every
# other method run in tests/test_every_method.py and tests/test_multimnist.py.
@pytest.mark.parametrize('method', ['mgda_ub'])
def test_official_layout_trains(tmp_path, method):
  write_official(str(tmp_path / 'cs'))
  c = _config(method=method, data__cityscapes_dir=str(tmp_path / 'cs'),
              data__cache_dir=str(tmp_path / 'cache'))
  r = trainer.train_and_evaluate(train.OFFICIAL, c, str(tmp_path / 'run'),
                                 log=lambda s: None)
  for t in ('semantic', 'instance', 'disparity'):
    assert np.isfinite(r[f'test_score_{t}']) and np.isfinite(
        r[f'test_loss_{t}'])
  assert 0 <= r['test_score_semantic'] <= 1
  assert r['test_pixacc_instance'] is None  # not a semantic task
  rec = json.loads(open(tmp_path / 'run' / 'metrics.jsonl').readline())
  assert len(rec['weights']) == 3


def test_preprocessed_layout_trains_by_command_line(tmp_path, capsys):
  write_preprocessed(str(tmp_path / 'npy'), shape=(32, 64))
  cityscapes_main.main([
      'prog', '--config=experiments/cityscapes/configs/preprocessed.py',
      '--config.epochs=1', '--config.batch_size=2', '--config.chunk=1',
      '--config.eval_batch_size=2', '--config.model.encoder=small',
      '--config.model.width=4', '--config.model.decoder_width=8',
      '--config.data.height=32', '--config.data.width=64',
      f'--config.data.cityscapes_dir={tmp_path / "npy"}',
      f'--config.data.cache_dir={tmp_path / "cache"}',
      f'--workdir={tmp_path / "run"}'])
  r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert set(k for k in r if k.startswith('test_score_')) == {
      'test_score_semantic', 'test_score_depth'}
  assert r['test_relerr_depth'] is not None and r['test_relerr_semantic'] is None


def test_a_subset_of_dense_tasks(tmp_path):
  write_official(str(tmp_path / 'cs'))
  c = _config(method='uniform_weighting', tasks=(2, 1),
              data__cityscapes_dir=str(tmp_path / 'cs'),
              data__cache_dir=str(tmp_path / 'cache'))
  r = trainer.train_and_evaluate(train.OFFICIAL, c, str(tmp_path / 'run'),
                                 log=lambda s: None)
  assert 'test_score_semantic' not in r
  # In config.tasks' order: disparity, then instance.
  rec = json.loads(open(tmp_path / 'run' / 'metrics.jsonl').readline())
  assert rec['test_score'] == [r['test_score_disparity'],
                               r['test_score_instance']]


def test_default_config_builds_the_paper_network_and_schedule():
  c = train.OFFICIAL.default_config()
  assert (c.batch_size, c.optimizer.learning_rate, c.epochs) == (8, 5e-4, 100)
  from experiments.common import methods as methods_lib  # pylint: disable=g-import-not-at-top
  lr = methods_lib.learning_rate(c, steps_per_epoch=3)
  # x0.85 every 10 epochs of 3 steps.
  np.testing.assert_allclose([lr(0), lr(29), lr(30), lr(61)],
                             [5e-4, 5e-4, 5e-4 * .85, 5e-4 * .85 ** 2],
                             rtol=1e-6)
  model = nnx.eval_shape(lambda: train.make_model(
      c, train.OFFICIAL_TASKS, nnx.Rngs(0)))
  assert isinstance(model.encoder, models.DilatedResNet50)
  assert [d.classify.kernel.shape[-1] for d in model.decoders] == [19, 2, 1]


def test_select_by_a_mixed_direction_metric_is_an_error(tmp_path):
  c = _config(select='score')
  with pytest.raises(ValueError, match='direction per task'):
    trainer.train_and_evaluate(train.OFFICIAL, c, str(tmp_path),
                               data=trainer.Splits(None, None, None))


def test_missing_or_mismatched_data_is_a_clear_error(tmp_path):
  with pytest.raises(input_pipeline.CityscapesError, match='cityscapes_dir'):
    train.load_data(_config())
  write_preprocessed(str(tmp_path / 'npy'), shape=(32, 64))
  c = _config(data__cityscapes_dir=str(tmp_path / 'npy'),
              data__cache_dir=str(tmp_path / 'cache'))  # official expected
  with pytest.raises(input_pipeline.CityscapesError):
    train.load_data(c)


# --------------------------------------------------------------------------
# Dense MultiMNIST scenes.


def _digits(n=40, seed=0):
  """Blocky fake digits: a filled rectangle whose width encodes the class."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 10, n)
  images = np.zeros((n, 28, 28), np.uint8)
  for i, l in enumerate(labels):
    images[i, 4:24, 4:6 + 2 * l] = 255
  return images, labels


def test_scene_labels_follow_from_the_drawn_digits():
  images, labels = _digits()
  s = scenes.make_scenes(images, labels, 20, np.random.default_rng(1),
                         height=48, width=64, min_size=16, max_size=28)
  sem, inst, disp = (s.labels['semantic'], s.labels['instance'],
                     s.labels['disparity'])
  ink = s.images[..., 0] >= scenes.INK
  # Labelled exactly where a digit's ink is; background elsewhere.
  np.testing.assert_array_equal(sem > 0, ink)
  np.testing.assert_array_equal(inst['valid'] > 0, ink)
  assert np.all(disp[~ink] == scenes.BACKGROUND_DISPARITY)
  assert np.all((disp[ink] >= 2) & (disp[ink] <= 8))
  # Each visible digit: one class and one disparity; its offsets point to
  # the centroid of its own visible pixels.
  yy, xx = np.mgrid[:48, :64]
  for i in range(20):
    for d in np.unique(disp[i][ink[i]]):
      m = ink[i] & (disp[i] == d)
      assert len(np.unique(sem[i][m])) == 1
      np.testing.assert_allclose(inst['offset'][i][m][:, 0],
                                 yy[m].mean() - yy[m], atol=1e-4)
      np.testing.assert_allclose(inst['offset'][i][m][:, 1],
                                 xx[m].mean() - xx[m], atol=1e-4)


def test_nearer_digits_occlude_farther_ones():
  images = np.full((2, 28, 28), 255, np.uint8)  # two solid squares
  for seed in range(10):
    s = scenes.make_scenes(images, np.array([3, 7]), 1,
                           np.random.default_rng(seed), height=40, width=40,
                           max_digits=2, min_size=20, max_size=30)
    d = s.labels['disparity'][0]
    near = d == d.max()
    # The nearer square is whole: its pixels fill their bounding box, a
    # square of a drawable size, whatever it overlaps.
    rows, cols = np.nonzero(near)
    h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert near.sum() == h * w and h == w and 20 <= h <= 30


def test_dense_mnist_trains_end_to_end(tmp_path, monkeypatch):
  images, labels = _digits(120)
  fake = mnist_pipeline.Mnist(images[:100, ..., None], labels[:100],
                              images[100:, ..., None], labels[100:])
  monkeypatch.setattr(mnist_pipeline, 'load_mnist',
                      lambda *a, **k: (fake, 'fake'))
  monkeypatch.setattr(scenes, 'VAL_DIGITS', 30)
  c = scenes_config.get_config()
  c.method = 'upgrad'
  c.data.cache_dir = str(tmp_path / 'cache')
  r = trainer.train_and_evaluate(dense_mnist.EXPERIMENT, c,
                                 str(tmp_path / 'run'), log=lambda s: None)
  assert np.isfinite(r['test_score_disparity'])
  # The cached scenes are read back unchanged.
  a = dense_mnist.load_data(c)
  b = dense_mnist.load_data(c)
  np.testing.assert_array_equal(a.train[1]['instance']['offset'],
                                b.train[1]['instance']['offset'])
  assert len(os.listdir(tmp_path / 'cache')) == 1
