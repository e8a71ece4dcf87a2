"""CelebA (Liu et al. 2015) as 64x64 images and 40 binary attributes.

Two sources, in this order:

1. **A local folder of the official files** (``config.data.celeba_dir``)::

     <dir>/list_attr_celeba.txt       (or Anno/list_attr_celeba.txt)
     <dir>/list_eval_partition.txt    (or Eval/list_eval_partition.txt)
     <dir>/img_align_celeba/000001.jpg ...
                                      (or img_align_celeba_png/*.png,
                                       or Img/img_align_celeba{,_png}/)

   ``list_attr_celeba.txt``: the number of images, the 40 attribute names,
   then one line per image, ``000001.jpg -1 1 ...`` (1 / -1).
   ``list_eval_partition.txt``: ``000001.jpg 0`` (0 train, 1 validation,
   2 test; 162,770 / 19,867 / 19,962 images).
2. **TFDS** ``celeb_a`` (``tfds.data_source``, no TensorFlow needed), from
   ``config.data.tfds_data_dir``. Its Google Drive download often fails with
   checksum errors (tensorflow/datasets#1482, #2401), so nothing is
   downloaded here: prepare it with ``tfds build celeb_a --manual_dir=...``
   or use the folder.

Images are resized from 178x218 to 64x64 (bilinear with antialiasing, the
aspect not kept: the paper's 64x64 input) and kept as ``uint8``; the model
normalises them. The official code subtracts a per-channel mean and then
resizes with ``scipy.misc.imresize``, which rescales each image's range to
0..255; that per-image contrast stretch is its quirk and is not copied.
Each split is cached as ``.npz`` under ``config.data.cache_dir``, named
after the source's file list and sizes.
"""

import hashlib
import os
from typing import NamedTuple

import numpy as np

from experiments.common import download

ATTRIBUTES = (
    '5_o_Clock_Shadow', 'Arched_Eyebrows', 'Attractive', 'Bags_Under_Eyes',
    'Bald', 'Bangs', 'Big_Lips', 'Big_Nose', 'Black_Hair', 'Blond_Hair',
    'Blurry', 'Brown_Hair', 'Bushy_Eyebrows', 'Chubby', 'Double_Chin',
    'Eyeglasses', 'Goatee', 'Gray_Hair', 'Heavy_Makeup', 'High_Cheekbones',
    'Male', 'Mouth_Slightly_Open', 'Mustache', 'Narrow_Eyes', 'No_Beard',
    'Oval_Face', 'Pale_Skin', 'Pointy_Nose', 'Receding_Hairline',
    'Rosy_Cheeks', 'Sideburns', 'Smiling', 'Straight_Hair', 'Wavy_Hair',
    'Wearing_Earrings', 'Wearing_Hat', 'Wearing_Lipstick', 'Wearing_Necklace',
    'Wearing_Necktie', 'Young')
SPLITS = ('train', 'val', 'test')
SIZE = 64


class CelebAError(download.DataError):
  """CelebA could not be found or read."""


class Split(NamedTuple):
  images: np.ndarray  # (N, 64, 64, 3) uint8
  labels: np.ndarray  # (N, 40) int32 in {0, 1}


class CelebA(NamedTuple):
  train: Split
  val: Split
  test: Split


def _first(root, *candidates):
  for c in candidates:
    path = os.path.join(root, c)
    if os.path.exists(path):
      return path
  raise CelebAError(f'{root} has none of {list(candidates)}; expected the '
                    'official CelebA files (see experiments/celeba/'
                    'input_pipeline.py).')


def read_attributes(path: str) -> tuple[list[str], np.ndarray]:
  """``(file names, (N, 40) labels in {0, 1})`` from list_attr_celeba.txt."""
  with open(path) as f:
    lines = [l for l in f.read().splitlines() if l.strip()]
  if len(lines) < 2:
    raise CelebAError(f'{path}: expected a count line and a header line.')
  try:
    count = int(lines[0].split()[0])
  except ValueError as e:
    raise CelebAError(f'{path}: the first line should be the number of '
                      f'images; got {lines[0]!r}.') from e
  header = lines[1].split()
  if tuple(header) != ATTRIBUTES:
    raise CelebAError(f'{path}: the header should list the 40 attributes; '
                      f'got {len(header)} names starting {header[:3]}.')
  names, rows = [], []
  for n, line in enumerate(lines[2:], start=3):
    parts = line.split()
    if len(parts) != 41 or any(v not in ('1', '-1') for v in parts[1:]):
      raise CelebAError(f'{path}:{n}: expected a file name and 40 values '
                        f'of 1 or -1; got {line[:60]!r}.')
    names.append(parts[0])
    rows.append([v == '1' for v in parts[1:]])
  if len(names) != count:
    raise CelebAError(f'{path}: the header says {count} images but '
                      f'{len(names)} lines follow (truncated?).')
  return names, np.asarray(rows, np.int32)


def read_partition(path: str) -> dict[str, int]:
  """``{file name: 0 | 1 | 2}`` from list_eval_partition.txt."""
  out = {}
  with open(path) as f:
    for n, line in enumerate(f, start=1):
      parts = line.split()
      if not parts:
        continue
      if len(parts) != 2 or parts[1] not in ('0', '1', '2'):
        raise CelebAError(f'{path}:{n}: expected "<file> <0|1|2>"; got '
                          f'{line.strip()[:60]!r}.')
      out[parts[0]] = int(parts[1])
  return out


def resize(image: np.ndarray) -> np.ndarray:
  """An ``(H, W, 3)`` uint8 image to ``(64, 64, 3)`` uint8 (bilinear,
  antialiased)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  img = Image.fromarray(np.asarray(image, np.uint8))
  return np.asarray(img.convert('RGB').resize((SIZE, SIZE),
                                               Image.Resampling.BILINEAR))


def read_folder(root: str, log=print) -> CelebA:
  """The three splits from a folder of the official files."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  attr = _first(root, 'list_attr_celeba.txt', 'Anno/list_attr_celeba.txt')
  part = _first(root, 'list_eval_partition.txt',
                'Eval/list_eval_partition.txt')
  img_dir = _first(root, 'img_align_celeba', 'img_align_celeba_png',
                   'Img/img_align_celeba', 'Img/img_align_celeba_png')
  names, labels = read_attributes(attr)
  partition = read_partition(part)
  png = img_dir.endswith('_png')
  missing = [n for n in names if n not in partition]
  if missing:
    raise CelebAError(f'{part} has no split for {len(missing)} images '
                      f'(e.g. {missing[0]}).')
  out = []
  for code, split in enumerate(SPLITS):
    idx = [i for i, n in enumerate(names) if partition[n] == code]
    log(f'reading {len(idx)} {split} images from {img_dir}')
    images = np.zeros((len(idx), SIZE, SIZE, 3), np.uint8)
    for j, i in enumerate(idx):
      name = names[i]
      if png:
        name = os.path.splitext(name)[0] + '.png'
      path = os.path.join(img_dir, name)
      try:
        with Image.open(path) as img:
          images[j] = resize(np.asarray(img.convert('RGB')))
      except FileNotFoundError as e:
        raise CelebAError(f'missing image {path}') from e
      except OSError as e:
        raise CelebAError(f'unreadable image {path}: {e}') from e
    out.append(Split(images, labels[idx]))
  return CelebA(*out)


def read_tfds(data_dir: str | None, log=print) -> CelebA:
  """The three splits of TFDS ``celeb_a`` (``tfds.data_source``)."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise CelebAError('tensorflow-datasets is not installed') from e
  out = []
  for split, tfds_split in zip(SPLITS, ('train', 'validation', 'test')):
    try:
      source = tfds.data_source('celeb_a', split=tfds_split,
                                data_dir=data_dir, download=False)
      records = [source[i] for i in range(len(source))]
    except Exception as e:  # pylint: disable=broad-except
      raise CelebAError(
          f'TFDS could not read celeb_a/{tfds_split} from data_dir='
          f'{data_dir!r} ({type(e).__name__}: {e}). Prepare it with tfds '
          'build celeb_a, or set config.data.celeba_dir to a folder of the '
          'official files.') from e
    log(f'reading {len(records)} {split} images from TFDS celeb_a')
    images = np.stack([resize(np.asarray(r['image'])) for r in records])
    labels = np.asarray([[bool(r['attributes'][a]) for a in ATTRIBUTES]
                         for r in records], np.int32)
    out.append(Split(images, labels))
  return CelebA(*out)


def _fingerprint(*parts) -> str:
  h = hashlib.sha256()
  for p in parts:
    h.update(repr(p).encode())
  return h.hexdigest()[:16]


def load_celeba(cache_dir: str, *, celeba_dir: str | None = None,
                tfds_data_dir: str | None = None, log=print) -> CelebA:
  """CelebA from the folder, else TFDS; cached as uint8 arrays."""
  if celeba_dir:
    attr = _first(celeba_dir, 'list_attr_celeba.txt',
                  'Anno/list_attr_celeba.txt')
    key = _fingerprint('folder', os.path.abspath(celeba_dir),
                       os.path.getsize(attr), os.path.getmtime(attr))
    read = lambda: read_folder(celeba_dir, log)
  else:
    key = _fingerprint('tfds', tfds_data_dir)
    read = lambda: read_tfds(tfds_data_dir, log)
  path = os.path.join(cache_dir, f'celeba64-{key}.npz')
  if os.path.exists(path):
    try:
      with np.load(path) as z:
        data = CelebA(*(Split(z[f'{s}_images'], z[f'{s}_labels'])
                        for s in SPLITS))
      if all(s.images.shape[1:] == (SIZE, SIZE, 3) and
             s.labels.shape == (len(s.images), 40) for s in data):
        return data
      log(f'cache {path} has unexpected shapes; rebuilding')
    except Exception as e:  # pylint: disable=broad-except
      log(f'cache {path} unreadable ({type(e).__name__}: {e}); rebuilding')
  data = read()
  for s, split in zip(SPLITS, data):
    if len(split.labels) == 0:
      raise CelebAError(f'the {s} split of CelebA is empty.')
  os.makedirs(cache_dir, exist_ok=True)
  tmp = path + '.tmp.npz'
  np.savez(tmp, **{f'{n}_{f}': getattr(s, f) for n, s in zip(SPLITS, data)
                   for f in ('images', 'labels')})
  os.replace(tmp, path)
  return data
