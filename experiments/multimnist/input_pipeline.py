"""MultiMNIST: two overlapping MNIST digits, left and right, from real MNIST.

The construction of Sener & Koltun (2018, Section 4 and their code), with two
documented improvements:

* each image ``i`` is the left digit; the right digit is another MNIST image
  ``j`` of the same split, drawn by a **seeded** permutation (the original
  drew without a seed);
* on a 36x36 canvas the left digit fills rows/columns ``[0:28]`` and the right
  ``[6:34]``; where they overlap the pixel-wise maximum is kept; the canvas is
  resized to 28x28 (bilinear with antialiasing, ``jax.image.resize``);
* 60,000 training and 10,000 test samples; a **validation split** of 10,000
  (a sixth) is carved from the training set (seeded) for best-epoch selection
  (the original selected on the test set).

MNIST is read the way a user has it, in this order:

1. the four raw IDX files (``.gz`` or not) in a folder the user names;
2. a prepared TFDS data dir, through ``tfds.data_source('mnist',
   data_dir=...)`` (no TensorFlow needed);
3. else downloaded: the four ``.gz`` files from the canonical mirrors (the
   one TFDS uses, then PyTorch's), each verified against its known SHA-256
   (:data:`SHA256`, as in TFDS's ``url_checksums/mnist.txt``), kept in a
   download folder and reused. (TFDS's own ``download_and_prepare`` needs
   TensorFlow to build the set, which the experiments do not install.)

Offline with none of them, :func:`load_mnist` raises an error saying how to
point it at local files. The generated set is cached as one ``.npz`` per (source,
seed) and re-validated on load; a corrupt cache is rebuilt.
"""

import gzip
import hashlib
import os
import struct
from typing import NamedTuple

import numpy as np

from experiments.common import download

IDX_FILES = {
    'train_images': 'train-images-idx3-ubyte',
    'train_labels': 'train-labels-idx1-ubyte',
    'test_images': 't10k-images-idx3-ubyte',
    'test_labels': 't10k-labels-idx1-ubyte',
}
# SHA-256 of the canonical .gz files (TFDS url_checksums/mnist.txt).
SHA256 = {
    'train-images-idx3-ubyte.gz':
        '440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609',
    'train-labels-idx1-ubyte.gz':
        '3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c',
    't10k-images-idx3-ubyte.gz':
        '8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6',
    't10k-labels-idx1-ubyte.gz':
        'f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6',
}
# The mirror TFDS's mnist builder uses, then the one torchvision uses.
MIRRORS = ('https://storage.googleapis.com/cvdf-datasets/mnist/',
           'https://ossci-datasets.s3.amazonaws.com/mnist/')
NUM_TRAIN, NUM_TEST = 60_000, 10_000
VAL_FRACTION = 6  # one sixth of the training set: 10,000 of 60,000
# The normalisation of the paper's code (MNIST mean and std).
MEAN, STD = 0.1307, 0.3081


class MnistError(download.DataError):
  """MNIST could not be found or read."""


class Mnist(NamedTuple):
  train_images: np.ndarray  # (60000, 28, 28) uint8
  train_labels: np.ndarray  # (60000,) int64
  test_images: np.ndarray   # (10000, 28, 28) uint8
  test_labels: np.ndarray   # (10000,) int64


class Split(NamedTuple):
  images: np.ndarray  # (N, 28, 28, 1) float32, normalised
  labels: np.ndarray  # (N, 2) int32: left digit, right digit


class MultiMnist(NamedTuple):
  train: Split
  val: Split
  test: Split


# ----------------------------------------------------------------------------
# Reading MNIST


def _open(path):
  if os.path.exists(path):
    return open(path, 'rb')
  if os.path.exists(path + '.gz'):
    return gzip.open(path + '.gz', 'rb')
  raise FileNotFoundError(path)


def read_idx(path: str) -> np.ndarray:
  """Reads one IDX file (optionally ``.gz``) into a uint8 array.

  Raises:
    MnistError: for a missing, truncated or malformed file.
  """
  try:
    with _open(path) as f:
      data = f.read()
  except FileNotFoundError as e:
    raise MnistError(f'missing MNIST file {path}(.gz)') from e
  except (OSError, EOFError) as e:
    raise MnistError(f'cannot read {path}(.gz): {e}') from e
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise MnistError(f'{path}: not an unsigned-byte IDX file (bad magic)')
  ndim = data[3]
  header = 4 + 4 * ndim
  if len(data) < header:
    raise MnistError(f'{path}: truncated header')
  shape = struct.unpack('>' + 'I' * ndim, data[4:header])
  size = int(np.prod(shape))
  if len(data) != header + size:
    raise MnistError(f'{path}: expected {size} bytes of data for shape '
                     f'{shape}, found {len(data) - header}')
  return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def read_idx_dir(mnist_dir: str) -> Mnist:
  """The four MNIST IDX files from a folder, validated."""
  arrays = {k: read_idx(os.path.join(mnist_dir, v))
            for k, v in IDX_FILES.items()}
  mnist = Mnist(arrays['train_images'], arrays['train_labels'].astype(np.int64),
                arrays['test_images'], arrays['test_labels'].astype(np.int64))
  check(mnist, mnist_dir)
  return mnist


def check(mnist: Mnist, where: str) -> None:
  """Consistent shapes and labels (real MNIST: 60,000 and 10,000 images)."""
  for split in ('train', 'test'):
    images = getattr(mnist, f'{split}_images')
    labels = getattr(mnist, f'{split}_labels')
    if images.ndim != 3 or images.shape[1:] != (28, 28):
      raise MnistError(f'{where}: {split} images have shape {images.shape}, '
                       'expected (N, 28, 28)')
    if labels.shape != (images.shape[0],):
      raise MnistError(f'{where}: {len(labels)} {split} labels for '
                       f'{images.shape[0]} images')
    if len(labels) < 2 or labels.min() < 0 or labels.max() > 9:
      raise MnistError(f'{where}: {split} labels must be digits 0-9 (and at '
                       'least two images)')


def read_tfds(data_dir: str | None) -> Mnist:
  """MNIST through ``tfds.data_source`` (no TensorFlow needed)."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise MnistError('tensorflow-datasets is not installed') from e
  out = []
  for split in ('train', 'test'):
    try:
      source = tfds.data_source('mnist', split=split, data_dir=data_dir,
                                download=False)
      keys = list(range(len(source)))
      try:
        records = source.__getitems__(keys)  # batched random access
      except TypeError:  # sources without the batched form (mock data)
        records = [source[i] for i in keys]
    except Exception as e:  # pylint: disable=broad-except
      raise MnistError(f'TFDS could not read mnist/{split} from data_dir='
                       f'{data_dir!r}: {type(e).__name__}: {e}') from e
    images = np.stack([np.asarray(r['image'])[..., 0] for r in records])
    labels = np.asarray([r['label'] for r in records], np.int64)
    out += [images.astype(np.uint8), labels]
  mnist = Mnist(*out)
  check(mnist, f'TFDS mnist in {data_dir!r}')
  return mnist


def load_mnist(mnist_dir: str | None = None,
               tfds_data_dir: str | None = None, *,
               download_dir: str | None = None,
               mirrors=MIRRORS, log=print) -> tuple[Mnist, str]:
  """MNIST from the folder the user named, else TFDS, else downloaded.

  Args:
    mnist_dir: a folder with the four IDX files (takes precedence).
    tfds_data_dir: a TFDS data dir holding prepared ``mnist`` (``None``: the
      TFDS default, ``~/tensorflow_datasets`` or ``$TFDS_DATA_DIR``).
    download_dir: where downloaded files are kept (``None``: no download).
    mirrors: URL prefixes to download from, in order.
    log: progress messages.

  Returns:
    The arrays and a short description of where they came from.

  Raises:
    MnistError: nothing usable found; the message says how to fix it.
  """
  if mnist_dir:
    try:
      return read_idx_dir(mnist_dir), f'idx:{os.path.abspath(mnist_dir)}'
    except MnistError as e:
      raise MnistError(
          f'{e}. config.data.mnist_dir must name a folder holding the four '
          'MNIST IDX '
          f'files ({", ".join(v + "[.gz]" for v in IDX_FILES.values())}).'
      ) from e
  try:
    return read_tfds(tfds_data_dir), f'tfds:{tfds_data_dir or "default"}'
  except MnistError as e:
    tfds_error = e
  fix = ('Point the experiment at local data: --config.data.mnist_dir=DIR '
         'with the four files train-images-idx3-ubyte.gz, '
         'train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, '
         't10k-labels-idx1-ubyte.gz, or --config.data.tfds_data_dir=DIR with '
         "a prepared TFDS mnist (e.g. made by tfds.builder('mnist')."
         'download_and_prepare() on a machine with internet).')
  if not download_dir:
    raise MnistError(f'No MNIST found ({tfds_error}); downloading is off '
                     f'(config.data.download). {fix}') from tfds_error
  log(f'no local MNIST ({tfds_error}); downloading into {download_dir}')
  try:
    download.fetch_all(SHA256, mirrors, download_dir, log=log)
  except download.DownloadError as e:
    raise MnistError(f'No MNIST found ({tfds_error}), and the download '
                     f'failed: {e}. This machine may be offline. {fix}'
                     ) from e
  return read_idx_dir(download_dir), f'download:{os.path.abspath(download_dir)}'



# ----------------------------------------------------------------------------
# MultiMNIST


def overlay(left: np.ndarray, right: np.ndarray) -> np.ndarray:
  """The 36x36 canvas: left at [0:28], right at [6:34], pixel-wise max.

  Args:
    left, right: ``(N, 28, 28)`` uint8.

  Returns:
    ``(N, 36, 36)`` uint8.
  """
  n = left.shape[0]
  canvas = np.zeros((n, 36, 36), np.uint8)
  canvas[:, 0:28, 0:28] = left
  canvas[:, 6:34, 6:34] = np.maximum(canvas[:, 6:34, 6:34], right)
  return canvas


def resize_28(canvas: np.ndarray, chunk: int = 10_000) -> np.ndarray:
  """Bilinear, antialiased resize of ``(N, 36, 36)`` to ``(N, 28, 28)``."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  resize = jax.jit(lambda x: jax.image.resize(
      x, (x.shape[0], 28, 28), 'linear', antialias=True))
  out = [np.asarray(resize(jnp.asarray(canvas[i:i + chunk], jnp.float32)))
         for i in range(0, canvas.shape[0], chunk)]
  return np.clip(np.concatenate(out), 0, 255)


def make_pairs(images, labels, rng: np.random.Generator):
  """Each image is the left digit, paired with another one (seeded)."""
  n = images.shape[0]
  partner = rng.permutation(n)
  same = partner == np.arange(n)
  partner[same] = (partner[same] + 1) % n  # never pair an image with itself
  pixels = resize_28(overlay(images, images[partner]))
  normalised = ((pixels / 255.0 - MEAN) / STD).astype(np.float32)[..., None]
  return Split(normalised,
               np.stack([labels, labels[partner]], 1).astype(np.int32))


def build_multimnist(mnist: Mnist, seed: int) -> MultiMnist:
  """Train / validation / test MultiMNIST splits (50k / 10k / 10k)."""
  rng = np.random.default_rng(seed)
  train = make_pairs(mnist.train_images, mnist.train_labels, rng)
  test = make_pairs(mnist.test_images, mnist.test_labels, rng)
  n = len(train.labels)
  order = rng.permutation(n)
  n_val = n // VAL_FRACTION
  val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
  take = lambda s, i: Split(s.images[i], s.labels[i])
  return MultiMnist(take(train, train_idx), take(train, val_idx), test)


def _fingerprint(mnist: Mnist) -> str:
  h = hashlib.sha256()
  for a in mnist:
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()[:16]


def load_multimnist(cache_dir: str, seed: int = 0, *,
                    mnist_dir: str | None = None,
                    tfds_data_dir: str | None = None,
                    download_dir: str | None = None,
                    mirrors=MIRRORS,
                    log=print) -> MultiMnist:
  """MultiMNIST from the cache, or built from MNIST and cached.

  The cache file is named after the MNIST content's hash and the seed, so a
  different source or seed never reads a stale set; a cache file that fails
  to load or has the wrong shapes is rebuilt.
  """
  mnist, where = load_mnist(mnist_dir, tfds_data_dir,
                            download_dir=download_dir, mirrors=mirrors,
                            log=log)
  os.makedirs(cache_dir, exist_ok=True)
  path = os.path.join(cache_dir,
                      f'multimnist-{_fingerprint(mnist)}-seed{seed}.npz')
  if os.path.exists(path):
    try:
      with np.load(path) as z:
        data = MultiMnist(*(Split(z[f'{s}_images'], z[f'{s}_labels'])
                            for s in ('train', 'val', 'test')))
      sizes = [len(s.labels) for s in data]
      n_train, n_test = len(mnist.train_labels), len(mnist.test_labels)
      n_val = n_train // VAL_FRACTION
      if sizes == [n_train - n_val, n_val, n_test] and all(
          s.images.shape[1:] == (28, 28, 1) for s in data):
        return data
      log(f'cache {path} has unexpected shapes; rebuilding')
    except Exception as e:  # pylint: disable=broad-except
      log(f'cache {path} unreadable ({type(e).__name__}: {e}); rebuilding')
  log(f'building MultiMNIST (seed {seed}) from {where}')
  data = build_multimnist(mnist, seed)
  tmp = path + '.tmp.npz'
  np.savez(tmp, **{f'{n}_{f}': getattr(s, f) for n, s in zip(
      ('train', 'val', 'test'), data) for f in ('images', 'labels')})
  os.replace(tmp, path)
  return data
