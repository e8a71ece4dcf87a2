"""Cityscapes loaders on generated files in each exact on-disk format: the
official pngs (and TFDS's manual_dir naming) and MTAN's preprocessed .npy
arrays; the label table, the instance targets on a hand-computed example,
the disparity decoding, splits, the cache and the error messages."""

import os

import numpy as np
import pytest

from experiments.cityscapes import input_pipeline as ip

FULL = (64, 128)  # rows, columns of the generated official files
OUT = (32, 64)  # the loader's output: every map is constant on 2x2 blocks
# The table of cityscapesScripts' helpers/labels.py, written out by hand.
TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8,
             22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16,
             32: 17, 33: 18}


def quiet(_):
  pass


def _png(path, a):
  from PIL import Image
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(a).save(path)


def _up(a):
  """Each output pixel as a 2x2 block of the full-resolution file."""
  return np.repeat(np.repeat(a, 2, axis=0), 2, axis=1)


def _frame(rng, g):
  """Full-resolution maps of frame ``g`` and the expected outputs."""
  h, w = OUT
  ids = rng.integers(0, 34, size=(h, w)).astype(np.uint8)
  ids[:4] = rng.choice([0, 1, 3, 9, 14, 18, 29, 30], size=(4, w))  # void
  inst = ids.astype(np.uint16)  # stuff: the plain labelId
  ids[2:6, 4:12], inst[2:6, 4:12] = 26, 26001  # a car
  ids[10:13, 20:23], inst[10:13, 20:23] = 24, 24000  # a person (k = 0)
  ids[20:24, 40:48], inst[20:24, 40:48] = 26, 26  # a car group: no instance
  ids[25:28, 50:56], inst[25:28, 50:56] = 29, 29001  # caravan: no train id
  p = rng.integers(1, 60000, size=(h, w)).astype(np.uint16)
  p[rng.random((h, w)) < 0.3] = 0  # invalid
  p[0, :3] = (0, 1, 257)  # invalid, d = 0, d = 1
  semantic = np.full((h, w), 255, np.uint8)
  for label, train in TRAIN_IDS.items():
    semantic[ids == label] = train
  offset = np.zeros((h, w, 2), np.float32)
  valid = np.zeros((h, w), np.float32)
  yy, xx = np.mgrid[:h, :w]
  for rows, cols, cy, cx in ((slice(2, 6), slice(4, 12), 3.5, 7.5),
                             (slice(10, 13), slice(20, 23), 11.0, 21.0)):
    offset[rows, cols, 0] = cy - yy[rows, cols]
    offset[rows, cols, 1] = cx - xx[rows, cols]
    valid[rows, cols] = 1
  disparity = np.where(p > 0, (p.astype(np.float64) - 1) / 256, 0)
  files = {'image': np.full(FULL + (3,), (10 * g + 5, 200 - 10 * g, 7),
                            np.uint8),
           'labelIds': _up(ids), 'instanceIds': _up(inst),
           'disparity': _up(p)}
  expected = {'semantic': semantic, 'offset': offset, 'valid': valid,
              'disparity': disparity.astype(np.float32)}
  return files, expected


def write_official(root, tfds=False, seed=0):
  """2 cities x 2 frames of train, 2 x 1 of val, 1 test image (ignored).

  Frame ``g`` (in sorted file order, train then val) has red ``10 g + 5``.
  Returns the expected outputs of each frame.
  """
  rng = np.random.default_rng(seed)
  dirs = {n: os.path.join(root, f'{n}_trainvaltest', n) if tfds else
          os.path.join(root, n) for n in ('leftImg8bit', 'gtFine',
                                          'disparity')}
  expected, g = [], 0
  for split, cities, frames in (('train', ('aachen', 'bochum'), 2),
                                ('val', ('frankfurt', 'lindau'), 1)):
    for city in cities:
      for f in range(frames):
        stem = f'{city}_{f:06d}_000019'
        files, exp = _frame(rng, g)
        _png(os.path.join(dirs['leftImg8bit'], split, city,
                          stem + '_leftImg8bit.png'), files['image'])
        for what in ('labelIds', 'instanceIds'):
          _png(os.path.join(dirs['gtFine'], split, city,
                            f'{stem}_gtFine_{what}.png'), files[what])
        _png(os.path.join(dirs['disparity'], split, city,
                          stem + '_disparity.png'), files['disparity'])
        expected.append(exp)
        g += 1
  _png(os.path.join(dirs['leftImg8bit'], 'test', 'berlin',
                    'berlin_000000_000019_leftImg8bit.png'),
       np.zeros(FULL + (3,), np.uint8))
  return expected


def write_preprocessed(root, label_dirs=('label_7',), n_train=5, n_val=3,
                       shape=(16, 32), classes=7, seed=0):
  """MTAN's arrays; returns ``{split: [(image, label, depth), ...]}``."""
  rng = np.random.default_rng(seed)
  out = {}
  for split, n in (('train', n_train), ('val', n_val)):
    out[split] = []
    for i in range(n):
      x = rng.random(shape + (3,)).astype(np.float32)
      y = rng.integers(-1, classes, size=shape).astype(np.float32)
      d = rng.uniform(0.01, 0.2, size=shape + (1,)).astype(np.float32)
      d[rng.random(shape + (1,)) < 0.3] = 0
      for folder, a in [('image', x), ('depth', d)] + [
          (l, y) for l in label_dirs]:
        os.makedirs(os.path.join(root, split, folder), exist_ok=True)
        np.save(os.path.join(root, split, folder, f'{i}.npy'), a)
      out[split].append((x, y, d))
  return out


def _frame_ids(split):
  return (split.images[:, 0, 0, 0].astype(int) - 5) // 10


# ----------------------------------------------------------------- tables


def test_label_table():
  assert ip.IGNORE == 255
  assert len(ip.SEMANTIC_CLASSES) == 19
  assert ip.SEMANTIC_CLASSES[0] == 'road' and ip.SEMANTIC_CLASSES[-1] == (
      'bicycle')
  assert ip.LABEL_TO_TRAIN.dtype == np.uint8
  assert ip.LABEL_TO_TRAIN.shape == (256,)
  for label in range(256):
    assert ip.LABEL_TO_TRAIN[label] == TRAIN_IDS.get(label, 255), label


def test_instance_offsets_hand_example():
  ids = np.array([[26001, 26001, 7, 7, 23, 23],
                  [26001, 26001, 0, 24000, 24000, 24000],
                  [26, 26, 29001, 29001, 1, 24000]])
  offset, valid = ip.instance_offsets(ids)
  # Car: pixels (0,0) (0,1) (1,0) (1,1), centroid (0.5, 0.5). Person:
  # (1,3) (1,4) (1,5) (2,5), centroid (1.25, 4.25). Stuff (7, 23, 0, 1),
  # a car group (26) and a caravan (29001) are not instances.
  want_valid = np.array([[1, 1, 0, 0, 0, 0],
                         [1, 1, 0, 1, 1, 1],
                         [0, 0, 0, 0, 0, 1]], np.float32)
  want = np.zeros((3, 6, 2), np.float32)
  want[0, 0] = (0.5, 0.5)
  want[0, 1] = (0.5, -0.5)
  want[1, 0] = (-0.5, 0.5)
  want[1, 1] = (-0.5, -0.5)
  want[1, 3] = (0.25, 1.25)
  want[1, 4] = (0.25, 0.25)
  want[1, 5] = (0.25, -0.75)
  want[2, 5] = (-0.75, -0.75)
  assert offset.dtype == np.float32 and valid.dtype == np.float32
  np.testing.assert_array_equal(valid, want_valid)
  np.testing.assert_allclose(offset, want, atol=1e-6)
  # 16-bit input and an all-stuff map.
  offset, valid = ip.instance_offsets(np.full((2, 3), 21, np.uint16))
  assert not offset.any() and not valid.any()
  with pytest.raises(ValueError, match='integer id map'):
    ip.instance_offsets(np.zeros((2, 3), np.float32))


# --------------------------------------------------------------- official


@pytest.mark.parametrize('tfds', [False, True])
def test_read_official(tmp_path, tfds):
  expected = write_official(str(tmp_path), tfds=tfds)
  data = ip.read_official(str(tmp_path), height=OUT[0], width=OUT[1],
                          val_fraction=0.25, log=quiet)
  assert data.tasks == ('semantic', 'instance', 'disparity')
  assert data.num_classes == 19
  assert [len(s.images) for s in data[:3]] == [3, 1, 2]
  ids = [_frame_ids(s).tolist() for s in data[:3]]
  assert sorted(ids[0] + ids[1]) == [0, 1, 2, 3]  # a split of official train
  assert ids[2] == [4, 5]  # test = official val, in file order
  for split, frames in zip(data[:3], ids):
    n = len(frames)
    assert split.images.shape == (n,) + OUT + (3,)
    assert split.images.dtype == np.uint8
    lab = split.labels
    assert set(lab) == {'semantic', 'instance', 'disparity'}
    assert lab['semantic'].shape == (n,) + OUT
    assert lab['semantic'].dtype == np.uint8
    assert lab['instance']['offset'].shape == (n,) + OUT + (2,)
    assert lab['instance']['offset'].dtype == np.float32
    assert lab['instance']['valid'].shape == (n,) + OUT
    assert lab['instance']['valid'].dtype == np.float32
    assert lab['disparity'].shape == (n,) + OUT
    assert lab['disparity'].dtype == np.float32
    for j, g in enumerate(frames):
      exp = expected[g]
      np.testing.assert_array_equal(split.images[j, ..., 1], 200 - 10 * g)
      np.testing.assert_array_equal(lab['semantic'][j], exp['semantic'])
      np.testing.assert_array_equal(lab['instance']['valid'][j],
                                    exp['valid'])
      np.testing.assert_allclose(lab['instance']['offset'][j],
                                 exp['offset'], atol=1e-6)
      np.testing.assert_allclose(lab['disparity'][j], exp['disparity'],
                                 rtol=1e-6)
      # (p - 1) / 256 with p = 0 invalid: p = 0, 1, 257 -> 0, 0, 1.
      np.testing.assert_array_equal(lab['disparity'][j, 0, :3], [0, 0, 1])


def test_official_split_is_seeded_and_truncated(tmp_path):
  write_official(str(tmp_path))
  read = lambda **kw: ip.read_official(str(tmp_path), height=8, width=16,
                                       log=quiet, **kw)
  a, b = read(seed=3), read(seed=3)
  for x, y in zip(a[:3], b[:3]):
    np.testing.assert_array_equal(_frame_ids(x), _frame_ids(y))
  # The default val_fraction still holds out one of four images.
  assert [len(s.images) for s in a[:3]] == [3, 1, 2]
  vals = {tuple(_frame_ids(read(seed=s).val)) for s in range(8)}
  assert len(vals) > 1
  small = read(seed=3, max_images=1)
  assert [len(s.images) for s in small[:3]] == [1, 1, 1]
  assert _frame_ids(small.train)[0] == _frame_ids(a.train)[0]
  np.testing.assert_array_equal(_frame_ids(small.val), _frame_ids(a.val))


# ----------------------------------------------------------- preprocessed


def test_read_preprocessed(tmp_path):
  arrays = write_preprocessed(str(tmp_path))
  data = ip.read_preprocessed(str(tmp_path), log=quiet)
  assert data.tasks == ('semantic', 'depth')
  assert data.num_classes == 7
  assert [len(s.images) for s in data[:3]] == [4, 1, 3]

  def match(image):
    for split in ('train', 'val'):
      for i, (x, y, d) in enumerate(arrays[split]):
        if np.array_equal(image, np.round(255 * x).astype(np.uint8)):
          return split, i, y, d
    raise AssertionError('an image that is in no file')

  seen = []
  for name, split in zip(ip.SPLITS, data[:3]):
    assert split.images.dtype == np.uint8
    assert split.images.shape == (len(split.images), 16, 32, 3)
    assert set(split.labels) == {'semantic', 'depth'}
    for j, image in enumerate(split.images):
      source, i, y, d = match(image)
      assert source == ('val' if name == 'test' else 'train')
      seen.append((source, i))
      sem = split.labels['semantic'][j]
      assert sem.dtype == np.uint8
      np.testing.assert_array_equal(sem == 255, y == -1)
      np.testing.assert_array_equal(sem[y >= 0], y[y >= 0])
      depth = split.labels['depth'][j]
      assert depth.dtype == np.float32 and depth.shape == (16, 32)
      np.testing.assert_array_equal(depth, d[..., 0])
  assert sorted(seen) == sorted([('train', i) for i in range(5)] +
                                [('val', i) for i in range(3)])
  assert [i for s, i in seen[-3:]] == [0, 1, 2]


@pytest.mark.parametrize('dirs,num_classes,want', [
    (('label_19',), None, 19),
    (('label',), None, 7),
    (('label',), 13, 13),
    (('label_7', 'label_19'), None, 7),
    (('label_7', 'label_19'), 19, 19),
])
def test_preprocessed_classes_from_folder(tmp_path, dirs, num_classes, want):
  write_preprocessed(str(tmp_path), label_dirs=dirs, n_train=2, n_val=1,
                     classes=7)
  data = ip.read_preprocessed(str(tmp_path), num_classes=num_classes,
                              log=quiet)
  assert data.num_classes == want


# ------------------------------------------------------------------ cache


def _assert_same(a, b):
  assert a.tasks == b.tasks and a.num_classes == b.num_classes
  for x, y in zip(a[:3], b[:3]):
    np.testing.assert_array_equal(x.images, y.images)
    assert set(x.labels) == set(y.labels)
    for task in x.labels:
      if isinstance(x.labels[task], dict):
        for k in x.labels[task]:
          np.testing.assert_array_equal(x.labels[task][k],
                                        y.labels[task][k])
      else:
        np.testing.assert_array_equal(x.labels[task], y.labels[task])


@pytest.mark.parametrize('layout', ['official', 'preprocessed'])
def test_auto_layout_and_cache_round_trip(tmp_path, layout):
  root, cache = str(tmp_path / 'data'), str(tmp_path / 'cache')
  if layout == 'official':
    write_official(root, tfds=True)
  else:
    write_preprocessed(root)
  assert ip.detect_layout(root) == layout
  logs = []
  load = lambda: ip.load_cityscapes(cache, cityscapes_dir=root,
                                    height=OUT[0], width=OUT[1],
                                    log=logs.append)
  first = load()
  assert first.tasks == (ip.OFFICIAL_TASKS if layout == 'official' else
                         ip.PREPROCESSED_TASKS)
  (name,) = os.listdir(cache)
  assert name.startswith(f'cityscapes-{layout}') and name.endswith('.npz')
  assert any('reading' in l for l in logs)
  logs.clear()
  second = load()
  assert any('from the cache' in l for l in logs)
  assert not any('reading' in l for l in logs)
  _assert_same(first, second)
  with open(os.path.join(cache, name), 'wb') as f:
    f.write(b'not an npz')
  logs.clear()
  third = load()
  assert any('rebuilding' in l for l in logs)
  _assert_same(first, third)
  logs.clear()
  _assert_same(first, load())
  assert any('from the cache' in l for l in logs)
  # Other arguments: another cache file.
  ip.load_cityscapes(cache, cityscapes_dir=root, height=OUT[0],
                     width=OUT[1], max_images=1, log=quiet)
  assert len(os.listdir(cache)) == 2


def test_explicit_layout(tmp_path):
  root = str(tmp_path / 'data')
  write_preprocessed(root, n_train=2, n_val=1)
  data = ip.load_cityscapes(str(tmp_path / 'c'), cityscapes_dir=root,
                            layout='preprocessed', log=quiet)
  assert data.tasks == ('semantic', 'depth')
  with pytest.raises(ip.CityscapesError, match='no folder leftImg8bit'):
    ip.load_cityscapes(str(tmp_path / 'c'), cityscapes_dir=root,
                       layout='official', log=quiet)
  with pytest.raises(ValueError, match='layout must be one of'):
    ip.load_cityscapes(str(tmp_path / 'c'), cityscapes_dir=root,
                       layout='tfds', log=quiet)


# ----------------------------------------------------------------- errors


def test_missing_and_unknown_folders(tmp_path):
  cache = str(tmp_path / 'cache')
  assert issubclass(ip.CityscapesError, ip.download.DataError)
  with pytest.raises(ip.CityscapesError, match='does not exist'):
    ip.load_cityscapes(cache, cityscapes_dir=str(tmp_path / 'nope'),
                       log=quiet)
  with pytest.raises(ip.CityscapesError, match='no Cityscapes folder'):
    ip.load_cityscapes(cache, cityscapes_dir=None, log=quiet)
  other = tmp_path / 'other'
  other.mkdir()
  (other / 'readme.txt').write_text('hello')
  with pytest.raises(ip.CityscapesError, match='neither Cityscapes layout'):
    ip.load_cityscapes(cache, cityscapes_dir=str(other), log=quiet)
  partial = tmp_path / 'partial'
  (partial / 'leftImg8bit' / 'train').mkdir(parents=True)
  (partial / 'gtFine_trainvaltest.zip').write_bytes(b'')
  with pytest.raises(ip.CityscapesError,
                     match='no folder gtFine or disparity.*unzip gtFine_'):
    ip.load_cityscapes(cache, cityscapes_dir=str(partial), log=quiet)


def _official_file(root, split, what):
  """The first frame's ``what`` file of ``split``."""
  sub = {'image': 'leftImg8bit', 'labelIds': 'gtFine',
         'instanceIds': 'gtFine', 'disparity': 'disparity'}[what]
  suffix = {'image': '_leftImg8bit.png', 'disparity': '_disparity.png'}.get(
      what, f'_gtFine_{what}.png')
  city = 'aachen' if split == 'train' else 'frankfurt'
  return os.path.join(root, sub, split, city,
                      f'{city}_000000_000019{suffix}')


@pytest.mark.parametrize('what', ['labelIds', 'instanceIds', 'disparity'])
def test_image_without_its_files(tmp_path, what):
  root = str(tmp_path)
  write_official(root)
  path = _official_file(root, 'val', what)
  os.remove(path)
  with pytest.raises(ip.CityscapesError,
                     match=f'has no {what} file: missing .*'
                     f'{os.path.basename(path)}'):
    ip.read_official(root, height=8, width=16, log=quiet)


def test_corrupt_and_malformed_pngs(tmp_path):
  root = str(tmp_path)
  write_official(root)
  read = lambda: ip.read_official(root, height=8, width=16, log=quiet)
  path = _official_file(root, 'val', 'disparity')
  with open(path, 'rb') as f:
    good = f.read()
  with open(path, 'wb') as f:
    f.write(b'\x89PNG not really')
  with pytest.raises(ip.CityscapesError,
                     match='unreadable disparity png .*frankfurt'):
    read()
  with open(path, 'wb') as f:
    f.write(good[:len(good) // 2])  # truncated
  with pytest.raises(ip.CityscapesError, match='unreadable disparity png'):
    read()
  _png(path, np.zeros(FULL, np.uint8))  # 8-bit
  with pytest.raises(ip.CityscapesError, match='16-bit png; got uint8'):
    read()
  _png(path, np.zeros((FULL[0], FULL[1] // 2), np.uint16))
  with pytest.raises(ip.CityscapesError, match='is 64x64 but its image'):
    read()
  _png(path, np.zeros(FULL, np.uint16))
  read()
  image = _official_file(root, 'train', 'image')
  with open(image, 'wb') as f:
    f.write(b'garbage')
  with pytest.raises(ip.CityscapesError, match='unreadable image png'):
    read()


def test_preprocessed_errors(tmp_path):
  root = str(tmp_path)
  write_preprocessed(root)
  read = lambda: ip.read_preprocessed(root, log=quiet)
  depth = os.path.join(root, 'val', 'depth', '1.npy')
  good = np.load(depth)
  with open(depth, 'wb') as f:
    f.write(b'\x93NUMPY garbage')
  with pytest.raises(ip.CityscapesError,
                     match=r'unreadable depth npy .*1\.npy'):
    read()
  np.save(depth, good)
  label = os.path.join(root, 'train', 'label_7', '2.npy')
  good = np.load(label)
  np.save(label, np.zeros((16, 33), np.float32))
  with pytest.raises(ip.CityscapesError,
                     match=r'expected labels of shape \(16, 32\); got '
                     r'\(16, 33\)'):
    read()
  np.save(label, np.full((16, 32), 7, np.float32))  # 7 classes: 0..6
  with pytest.raises(ip.CityscapesError, match=r'integers in -1\.\.6'):
    read()
  np.save(label, good)
  image = os.path.join(root, 'train', 'image', '3.npy')
  np.save(image, np.zeros((16, 32), np.float32))
  with pytest.raises(ip.CityscapesError, match='expected an image of shape'):
    read()
  np.save(image, np.full((16, 32, 3), 2.0, np.float32))
  with pytest.raises(ip.CityscapesError, match=r'values in \[0, 1\]'):
    read()
  os.remove(image)
  os.remove(os.path.join(root, 'val', 'depth', '0.npy'))
  with pytest.raises(ip.CityscapesError,
                     match=r'val/image/0\.npy has no depth file'):
    read()
  with pytest.raises(ip.CityscapesError, match='no label folder label_19'):
    ip.read_preprocessed(root, num_classes=19, log=quiet)
