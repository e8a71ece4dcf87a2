"""Dense MultiMNIST scenes: Cityscapes' three tasks on real digits.

A scene is a ``height x width`` canvas (default 64x128) holding 2 to
``max_digits`` (5) MNIST digits, each scaled to a random size (``min_size``
to ``max_size``, 24 to 48 pixels square, bilinear), placed at a random
position fully inside the canvas, and given a random disparity ``d`` in
``[2, 8]`` (larger is nearer). Digits are drawn far to near, so a nearer
digit hides what it overlaps: a digit owns a pixel where its scaled intensity is at
least ``INK`` (of 255) and no nearer digit owns it. The image is the
pixel-wise ink of the owning digits (background 0), one ``uint8`` channel.

Labels, as Cityscapes' (:mod:`experiments.cityscapes.input_pipeline`):

* ``'semantic'``: ``uint8`` class per pixel, 0 background and ``1 + digit``
  for a digit's visible pixels (11 classes);
* ``'instance'``: ``{'offset': (dy, dx) float32, 'valid': float32}``, the
  offset from each visible digit pixel to the centroid of that digit's
  visible pixels (centroid minus pixel), valid on digit pixels only;
* ``'disparity'``: the owning digit's disparity, ``BACKGROUND_DISPARITY``
  (1.0, a far wall) on the background; every pixel valid.

Splits: scenes of the first 50,000 MNIST training digits (train), of the
other 10,000 (validation), and of the test digits (test): no digit image is
in two splits. Sizes and the construction are seeded (``config.data_seed``)
and the scenes cached as ``.npz``, named after the MNIST content, the seed
and every size argument.
"""

import hashlib
import os
from typing import NamedTuple

import numpy as np
from PIL import Image

from experiments.multimnist import input_pipeline as mnist_pipeline

INK = 64
BACKGROUND_DISPARITY = 1.0
DISPARITY_RANGE = (2.0, 8.0)
NUM_CLASSES = 11
TASKS = ('semantic', 'instance', 'disparity')
VAL_DIGITS = 10_000


class Scenes(NamedTuple):
  images: np.ndarray   # (N, H, W, 1) uint8
  labels: dict         # see the module docstring


class DenseMnist(NamedTuple):
  train: Scenes
  val: Scenes
  test: Scenes


def _scaled(digit: np.ndarray, size: int) -> np.ndarray:
  return np.asarray(Image.fromarray(digit).resize((size, size),
                                                  Image.BILINEAR))


def make_scenes(images: np.ndarray, labels: np.ndarray, n: int,
                rng: np.random.Generator, *, height: int = 64,
                width: int = 128, max_digits: int = 5, min_size: int = 24,
                max_size: int = 48) -> Scenes:
  """``n`` scenes from these digits (``(M, 28, 28)`` uint8, ``(M,)``)."""
  if max_size > min(height, width) or min_size < 4 or max_digits < 2:
    raise ValueError(f'digit sizes {min_size}..{max_size} must fit the '
                     f'{height}x{width} canvas (and max_digits >= 2)')
  x = np.zeros((n, height, width, 1), np.uint8)
  sem = np.zeros((n, height, width), np.uint8)
  off = np.zeros((n, height, width, 2), np.float32)
  valid = np.zeros((n, height, width), np.float32)
  disp = np.full((n, height, width), BACKGROUND_DISPARITY, np.float32)
  yy, xx = np.mgrid[:height, :width].astype(np.float32)
  for i in range(n):
    k = rng.integers(2, max_digits + 1)
    which = rng.integers(0, len(labels), k)
    d = np.sort(rng.uniform(*DISPARITY_RANGE, k))  # far (small) to near
    owner = np.full((height, width), -1)
    for j in range(k):
      s = int(rng.integers(min_size, max_size + 1))
      top = int(rng.integers(0, height - s + 1))
      left = int(rng.integers(0, width - s + 1))
      ink = _scaled(images[which[j]], s)
      mask = ink >= INK
      region = (slice(top, top + s), slice(left, left + s))
      owner[region][mask] = j
      x[i, :, :, 0][region][mask] = ink[mask]
    for j in range(k):
      m = owner == j
      if not m.any():
        continue  # wholly hidden
      sem[i][m] = 1 + labels[which[j]]
      disp[i][m] = d[j]
      valid[i][m] = 1.0
      off[i, :, :, 0][m] = yy[m].mean() - yy[m]
      off[i, :, :, 1][m] = xx[m].mean() - xx[m]
  return Scenes(x, {'semantic': sem,
                    'instance': {'offset': off, 'valid': valid},
                    'disparity': disp})


def build(mnist, seed: int, sizes=(6_000, 1_000, 2_000), **kwargs
          ) -> DenseMnist:
  """Train / validation / test scenes from disjoint MNIST digits."""
  rng = np.random.default_rng(seed)
  n_train_digits = len(mnist.train_labels) - VAL_DIGITS
  imgs = mnist.train_images.reshape(-1, 28, 28)
  sources = ((imgs[:n_train_digits], mnist.train_labels[:n_train_digits]),
             (imgs[n_train_digits:], mnist.train_labels[n_train_digits:]),
             (mnist.test_images.reshape(-1, 28, 28), mnist.test_labels))
  return DenseMnist(*(make_scenes(i, l, n, rng, **kwargs)
                      for (i, l), n in zip(sources, sizes)))


def _flat(s: Scenes) -> dict:
  return {'images': s.images, 'semantic': s.labels['semantic'],
          'offset': s.labels['instance']['offset'],
          'valid': s.labels['instance']['valid'],
          'disparity': s.labels['disparity']}


def _unflat(z) -> Scenes:
  return Scenes(z['images'], {'semantic': z['semantic'],
                              'instance': {'offset': z['offset'],
                                           'valid': z['valid']},
                              'disparity': z['disparity']})


def load_dense_mnist(cache_dir: str, seed: int = 0, *,
                     sizes=(6_000, 1_000, 2_000), mnist_dir=None,
                     tfds_data_dir=None, download_dir=None,
                     mirrors=mnist_pipeline.MIRRORS, log=print,
                     **kwargs) -> DenseMnist:
  """The scenes from the cache, or built from MNIST (any source
  :func:`experiments.multimnist.input_pipeline.load_mnist` reads) and
  cached. A cache file that fails to load is rebuilt."""
  mnist, where = mnist_pipeline.load_mnist(
      mnist_dir, tfds_data_dir, download_dir=download_dir, mirrors=mirrors,
      log=log)
  h = hashlib.sha256()
  for a in mnist:
    h.update(np.ascontiguousarray(a).tobytes())
  h.update(repr((seed, tuple(sizes), sorted(kwargs.items()))).encode())
  os.makedirs(cache_dir, exist_ok=True)
  path = os.path.join(cache_dir, f'dense-mnist-{h.hexdigest()[:16]}.npz')
  if os.path.exists(path):
    try:
      with np.load(path) as z:
        data = DenseMnist(*(_unflat({k[len(s) + 1:]: z[k] for k in z.files
                                     if k.startswith(s + '/')})
                            for s in ('train', 'val', 'test')))
      if [len(s.images) for s in data] == list(sizes):
        return data
      log(f'cache {path} has unexpected sizes; rebuilding')
    except Exception as e:  # pylint: disable=broad-except
      log(f'cache {path} unreadable ({type(e).__name__}: {e}); rebuilding')
  log(f'building dense MultiMNIST scenes (seed {seed}, {sizes}) from {where}')
  data = build(mnist, seed, sizes, **kwargs)
  tmp = path + '.tmp.npz'
  np.savez(tmp, **{f'{s}/{k}': v for s, split in zip(
      ('train', 'val', 'test'), data) for k, v in _flat(split).items()})
  os.replace(tmp, path)
  return data
