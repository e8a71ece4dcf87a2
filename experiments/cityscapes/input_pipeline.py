"""Cityscapes (Cordts et al. 2016) for the dense multi-task experiment.

The experiment of Sener & Koltun (2018, arXiv:1810.04650, Table 4): one
image, three per-pixel tasks (semantic segmentation, instance offsets,
disparity). Two on-disk sources, picked with ``layout=`` (``'auto'`` detects
which one a folder holds):

1. **The official files** (``layout='official'``), as unzipped from
   cityscapes-dataset.com::

     <dir>/leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
     <dir>/gtFine/{train,val}/<city>/<...>_gtFine_labelIds.png
     <dir>/gtFine/{train,val}/<city>/<...>_gtFine_instanceIds.png
     <dir>/disparity/{train,val}/<city>/<...>_disparity.png

   or TFDS's ``manual_dir`` naming, each zip unzipped into a folder of its
   own name (``leftImg8bit_trainvaltest/leftImg8bit/...``,
   ``gtFine_trainvaltest/gtFine/...``, ``disparity_trainvaltest/
   disparity/...``); each of the three is looked for both ways.

   * ``labelIds`` (8-bit): the 34 label ids, mapped to the 19 train ids of
     cityscapesScripts' ``helpers/labels.py`` (:data:`LABEL_TO_TRAIN`,
     :data:`SEMANTIC_CLASSES`); every other id is :data:`IGNORE` (255).
   * ``instanceIds`` (16- or 32-bit): ``labelId * 1000 + k`` for a pixel of
     instance ``k`` of a class with instances, the plain ``labelId``
     (< 1000) elsewhere, including crowd regions (``car group``).
   * ``disparity`` (16-bit): ``d = (p - 1) / 256`` for ``p > 0``; ``p == 0``
     is an invalid measurement (cityscapesScripts' README).

   Outputs, at ``(height, width)`` (default 256x512, the paper's input):
   ``images`` resized bilinearly with antialiasing (Pillow's resize, whose
   filter widens when it shrinks) and kept ``uint8``; ``semantic`` train ids
   resized with nearest neighbour; ``instance`` from
   :func:`instance_offsets` applied to the nearest-neighbour-resized
   instance id map, so that centroids and offsets are in output pixels and
   agree with the resized semantic map (an instance too small to survive
   the resize has no target); ``disparity`` from the nearest-neighbour-
   resized raw values (so invalid pixels are never blended with valid ones),
   in pixels of the original 2048-wide image, ``0`` where invalid (``p`` of
   0, and also ``p == 1``, a disparity of exactly 0, which gives no depth;
   multiply by ``width / 2048`` for disparity in output pixels).
   The official ``test`` folder is not read (its labels are not public).

2. **The preprocessed arrays of MTAN** (Liu et al. 2019; the download of
   lorenmt/mtan's README, used by LibMTL and CAGrad; ``layout=
   'preprocessed'``)::

     <dir>/{train,val}/image/<i>.npy    (128, 256, 3) float in [0, 1]
     <dir>/{train,val}/label_7/<i>.npy  (128, 256) float, -1 ignored
                      (or label_19/, label_2/, or label/)
     <dir>/{train,val}/depth/<i>.npy    (128, 256, 1) float, 0 invalid

   (the 256x512 download has the same layout; any one size is accepted).
   Two tasks, ``semantic`` and ``depth``: no instances. Images become
   ``uint8`` as ``round(255 x)``; labels ``uint8`` with -1 -> 255; depth
   ``float32 (N, H, W)``, 0 invalid. The number of classes comes from the
   folder: ``label_<C>`` has ``C``; a plain ``label/`` (LibMTL's name) has
   ``num_classes`` (default 7, the 7-class task of MTAN and LibMTL). Where
   several ``label_<C>`` exist, ``num_classes`` picks one, else
   ``label_7``.

**Splits.** Cityscapes' test labels are not public, so the official code
trains on the official train set and reports on the official val set. Here
the training framework's three splits are: ``test`` = the official ``val``
(500 images; the figures to compare with the paper's), and ``train`` /
``val`` = a seeded, deterministic split of the official ``train`` (2,975
images): ``round(val_fraction * N)`` images (at least one) drawn with
``np.random.default_rng(seed).permutation`` form ``val``, the rest
``train``; both keep the sorted file order. The preprocessed arrays are
split the same way (their ``val`` is the official val set). ``max_images``
truncates each split after splitting, so a quick run never mixes them.

**The official code's quirks** (isl-org/MultiObjectiveOptimization,
``multi_task/loaders/cityscapes_loader.py``, ``losses.py``, ``metrics.py``),
documented and not copied:

* The targets are resized to 1/8 of the input (32x64 for a 256x512 image),
  the image with ``scipy.misc.imresize`` after reversing RGB to BGR and
  subtracting a mean, which rescales each image's range to 0..255 (a
  per-image contrast stretch), then divided by 255.
* Instance offsets are computed at full resolution (2048x1024), as pixel
  minus centroid, in full-resolution pixels, and then nearest-resized; here
  they are centroid minus pixel, in output pixels.
* Pixels without an instance are marked by the value 250 (the semantic
  ignore index) in the offset maps and masked by ``target != 250``. Crowd
  regions of thing classes (a value ``labelId < 1000``, e.g. 26 for a
  ``car group``) are not excluded: all of one class's crowd pixels in an
  image form one "instance". Here only ids ``>= 1000`` of the eight classes
  with instances and a train id (:data:`INSTANCE_LABELS`) count; caravan
  and trailer (no train id) are excluded in both.
* Disparity is the raw png value ``p`` (not ``(p - 1) / 256``), normalised
  as ``(p - mean) / 2729.07`` where ``p != 0`` with a per-pixel mean from
  ``depth_mean.npy`` (not shipped), and the loss masks ``target > 0``
  after normalising, which drops every valid pixel below the mean.
* The L1 metrics cast targets and predictions to ``int32`` before taking
  differences (truncating offsets and normalised disparities to integers).
* Training augments with a random rotation (+-10 degrees) and a horizontal
  flip, before the instance targets are computed. Nothing is augmented here.

Each source is cached as one ``.npz`` under ``cache_dir`` named after a
fingerprint of its file list, the files' sizes and the arguments; a cache
that cannot be read, or holds the wrong shapes, is rebuilt. Memory: the
official layout at 256x512 takes about 2.6 MB per image (9 GB for all
3,475 train and val images, most of it the float32 offsets, mask and
disparity); pass a smaller size or ``max_images`` for quick runs. The
preprocessed arrays at 128x256 take about 0.3 MB per image.
"""

import hashlib
import os
import re
from typing import NamedTuple

import numpy as np

from experiments.common import download

SEMANTIC_CLASSES = (
    'road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic light',
    'traffic sign', 'vegetation', 'terrain', 'sky', 'person', 'rider', 'car',
    'truck', 'bus', 'train', 'motorcycle', 'bicycle')
IGNORE = 255
# labelId of each train id 0..18 (cityscapesScripts, helpers/labels.py).
_TRAIN_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27,
                    28, 31, 32, 33)
LABEL_TO_TRAIN = np.full(256, IGNORE, np.uint8)
LABEL_TO_TRAIN[list(_TRAIN_LABEL_IDS)] = np.arange(19, dtype=np.uint8)
LABEL_TO_TRAIN.setflags(write=False)
# labelIds with hasInstances=True and a train id: person, rider, car, truck,
# bus, train, motorcycle, bicycle (caravan 29, trailer 30 have neither).
INSTANCE_LABELS = (24, 25, 26, 27, 28, 31, 32, 33)
SPLITS = ('train', 'val', 'test')
VAL_FRACTION = 0.1
OFFICIAL_TASKS = ('semantic', 'instance', 'disparity')
PREPROCESSED_TASKS = ('semantic', 'depth')
LAYOUTS = ('auto', 'official', 'preprocessed')
_OFFICIAL_DIRS = ('leftImg8bit', 'gtFine', 'disparity')
_CACHE_VERSION = 1


class CityscapesError(download.DataError):
  """Cityscapes could not be found or read."""


class DenseSplit(NamedTuple):
  images: np.ndarray  # (N, H, W, 3) uint8
  labels: dict  # task name -> array(s), see the module docstring


class DenseData(NamedTuple):
  train: DenseSplit
  val: DenseSplit
  test: DenseSplit
  num_classes: int
  tasks: tuple[str, ...]


def instance_offsets(instance_ids: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Per-pixel offsets to the instance centroid, from a Cityscapes id map.

  A pixel belongs to an instance if its id ``v >= 1000`` and its class
  ``v // 1000`` is in :data:`INSTANCE_LABELS`; all pixels of one id form one
  instance, with centroid ``(cy, cx)`` the mean of their (row, column)
  indices. Such a pixel at ``(y, x)`` gets ``(cy - y, cx - x)`` (centroid
  minus pixel) and ``valid = 1``; every other pixel (stuff, crowd regions
  with ``v < 1000``, classes without a train id) gets ``(0, 0)`` and
  ``valid = 0``.

  Args:
    instance_ids: ``(H, W)`` integer ids (an ``instanceIds.png``).

  Returns:
    ``(offset, valid)``: ``float32 (H, W, 2)`` as ``(dy, dx)``, and
    ``float32 (H, W)`` in ``{0, 1}``.

  Example:
    >>> ids = np.array([[26000, 26000, 7], [26000, 26000, 26]])
    >>> offset, valid = instance_offsets(ids)
    >>> offset[0, 0].tolist(), valid.tolist()
    ([0.5, 0.5], [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
  """
  ids = np.asarray(instance_ids)
  if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError('instance_offsets expects an (H, W) integer id map; got '
                     f'shape {ids.shape} and dtype {ids.dtype}.')
  ids = ids.astype(np.int64)
  valid = (ids >= 1000) & np.isin(ids // 1000, INSTANCE_LABELS)
  offset = np.zeros(ids.shape + (2,), np.float32)
  ys, xs = np.nonzero(valid)
  if ys.size:
    _, inverse = np.unique(ids[ys, xs], return_inverse=True)
    count = np.bincount(inverse)
    cy = np.bincount(inverse, weights=ys) / count
    cx = np.bincount(inverse, weights=xs) / count
    offset[ys, xs, 0] = cy[inverse] - ys
    offset[ys, xs, 1] = cx[inverse] - xs
  return offset, valid.astype(np.float32)


def _nearest(a: np.ndarray, height: int, width: int) -> np.ndarray:
  """Nearest-neighbour resize of ``(h, w, ...)``, sampling pixel centres."""
  h, w = a.shape[:2]
  rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.int64),
                    h - 1)
  cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.int64),
                    w - 1)
  return a[rows[:, None], cols[None, :]]


def _split_indices(n: int, val_fraction: float, seed: int, where: str
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Sorted ``(train, val)`` indices of a seeded hold-out of ``n`` items."""
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f'val_fraction must be in [0, 1); got {val_fraction}.')
  n_val = int(round(n * val_fraction))
  if val_fraction > 0:
    n_val = max(n_val, 1)
  if n_val >= n:
    raise CityscapesError(f'{where}: {n} images are too few to hold out '
                          f'{n_val} for validation (val_fraction='
                          f'{val_fraction}).')
  perm = np.random.default_rng(seed).permutation(n)
  return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _three_splits(train_items, test_items, val_fraction, seed, max_images,
                  where):
  """``[train, val, test]`` item lists: a hold-out of train; test as is."""
  train_idx, val_idx = _split_indices(len(train_items), val_fraction, seed,
                                      where)
  out = [[train_items[i] for i in train_idx],
         [train_items[i] for i in val_idx], list(test_items)]
  if max_images is not None:
    if max_images < 1:
      raise ValueError(f'max_images must be positive; got {max_images}.')
    out = [items[:max_images] for items in out]
  return out


# ---------------------------------------------------------------- official


def _official_dir(root: str, name: str) -> str | None:
  """``<root>/<name>`` or TFDS's ``<root>/<name>_trainvaltest/<name>``."""
  for path in (os.path.join(root, name),
               os.path.join(root, f'{name}_trainvaltest', name)):
    if os.path.isdir(path):
      return path
  return None


def _official_dirs(root: str) -> dict[str, str]:
  dirs = {name: _official_dir(root, name) for name in _OFFICIAL_DIRS}
  missing = [n for n, d in dirs.items() if d is None]
  if missing:
    zips = [f'{n}_trainvaltest.zip' for n in missing
            if os.path.exists(os.path.join(root, f'{n}_trainvaltest.zip'))]
    hint = f' (unzip {", ".join(zips)} there)' if zips else ''
    raise CityscapesError(
        f'{root} has no folder {" or ".join(missing)}{hint}: the official '
        'layout needs leftImg8bit/, gtFine/ and disparity/ (or TFDS\'s '
        '<name>_trainvaltest/<name>/).')
  return dirs


class _Frame(NamedTuple):
  image: str
  label: str
  instance: str
  disparity: str


def _official_files(root: str) -> dict[str, list[_Frame]]:
  """``{'train': frames, 'val': frames}``, each image with its three files."""
  dirs = _official_dirs(root)
  out = {}
  for split in ('train', 'val'):
    base = os.path.join(dirs['leftImg8bit'], split)
    if not os.path.isdir(base):
      raise CityscapesError(f'{root}: no {split} folder {base}.')
    frames = []
    for city in sorted(os.listdir(base)):
      city_dir = os.path.join(base, city)
      if not os.path.isdir(city_dir):
        continue
      for name in sorted(os.listdir(city_dir)):
        if not name.endswith('_leftImg8bit.png'):
          continue
        stem = name[:-len('_leftImg8bit.png')]
        gt = os.path.join(dirs['gtFine'], split, city, stem)
        frame = _Frame(
            os.path.join(city_dir, name), gt + '_gtFine_labelIds.png',
            gt + '_gtFine_instanceIds.png',
            os.path.join(dirs['disparity'], split, city,
                         stem + '_disparity.png'))
        for what, path in zip(('labelIds', 'instanceIds', 'disparity'),
                              frame[1:]):
          if not os.path.isfile(path):
            raise CityscapesError(f'the image {frame.image} has no {what} '
                                  f'file: missing {path}.')
        frames.append(frame)
    if not frames:
      raise CityscapesError(f'no *_leftImg8bit.png images under {base}/'
                            '<city>/.')
    out[split] = frames
  return out


def _open_png(path: str, what: str, use):
  """``use(image)`` of a png opened with Pillow; a clear error otherwise."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  try:
    with Image.open(path) as img:
      img.load()
      return use(img)
  except FileNotFoundError as e:
    raise CityscapesError(f'missing {what} file {path}.') from e
  except (OSError, ValueError, SyntaxError) as e:
    raise CityscapesError(f'unreadable {what} png {path}: {e}') from e


def _read_image(path: str, height: int, width: int):
  """``((width, height) of the file, (height, width, 3) uint8 resized)``."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  return _open_png(path, 'image', lambda img: (img.size, np.asarray(
      img.convert('RGB').resize((width, height),
                                Image.Resampling.BILINEAR))))


def _read_frame(frame: _Frame, height: int, width: int):
  """``(image, semantic, offset, valid, disparity)`` of one frame."""
  (w0, h0), image = _read_image(frame.image, height, width)
  maps = {}
  for what, path, kinds in (('labelIds', frame.label, 'uint8 (8-bit)'),
                            ('instanceIds', frame.instance,
                             '16- or 32-bit integer'),
                            ('disparity', frame.disparity, '16-bit')):
    a = _open_png(path, what, lambda img: np.array(img))
    if what == 'labelIds':
      ok = a.dtype == np.uint8
    elif what == 'instanceIds':
      ok = a.dtype in (np.uint16, np.int32, np.uint32)
    else:
      ok = a.dtype in (np.uint16, np.int32) and (a.size == 0 or a.min() >= 0
                                                 and a.max() < 65536)
    if not ok or a.ndim != 2:
      raise CityscapesError(f'{path}: expected a single-channel {kinds} png; '
                            f'got {a.dtype} of shape {a.shape}.')
    if a.shape != (h0, w0):
      raise CityscapesError(f'{path} is {a.shape[1]}x{a.shape[0]} but its '
                            f'image {frame.image} is {w0}x{h0}.')
    maps[what] = _nearest(a, height, width)
  semantic = LABEL_TO_TRAIN[maps['labelIds']]
  offset, valid = instance_offsets(maps['instanceIds'])
  p = maps['disparity'].astype(np.float32)
  disparity = np.where(p > 0, (p - 1.0) / 256.0, 0.0).astype(np.float32)
  return image, semantic, offset, valid, disparity


def _read_official_split(frames, height, width, name, log) -> DenseSplit:
  n = len(frames)
  log(f'reading {n} {name} images (official Cityscapes files)')
  images = np.zeros((n, height, width, 3), np.uint8)
  semantic = np.zeros((n, height, width), np.uint8)
  offset = np.zeros((n, height, width, 2), np.float32)
  valid = np.zeros((n, height, width), np.float32)
  disparity = np.zeros((n, height, width), np.float32)
  for j, frame in enumerate(frames):
    (images[j], semantic[j], offset[j], valid[j],
     disparity[j]) = _read_frame(frame, height, width)
  return DenseSplit(images, {'semantic': semantic,
                             'instance': {'offset': offset, 'valid': valid},
                             'disparity': disparity})


def read_official(root: str, *, height: int = 256, width: int = 512,
                  val_fraction: float = VAL_FRACTION, seed: int = 0,
                  max_images: int | None = None, log=print) -> DenseData:
  """The three splits from the official Cityscapes files (module docstring).

  Args:
    root: the folder holding ``leftImg8bit/``, ``gtFine/``, ``disparity/``
      (or TFDS's ``*_trainvaltest/`` folders).
    height: output rows.
    width: output columns.
    val_fraction: the share of the official train set held out as ``val``.
    seed: the seed of that hold-out.
    max_images: at most this many images per split (quick runs).
    log: progress messages.

  Returns:
    :class:`DenseData` with tasks ``('semantic', 'instance', 'disparity')``
    and 19 classes; ``test`` is the official val set.

  Raises:
    CityscapesError: a missing folder or file, an unreadable png, or maps
      whose size or type disagrees with the format.
  """
  if not os.path.isdir(root):
    raise CityscapesError(f'Cityscapes folder {root} does not exist.')
  if height < 1 or width < 1:
    raise ValueError(f'height and width must be positive; got {height}x'
                     f'{width}.')
  files = _official_files(root)
  splits = _three_splits(files['train'], files['val'], val_fraction, seed,
                         max_images, root)
  return DenseData(*(_read_official_split(f, height, width, s, log)
                     for s, f in zip(SPLITS, splits)),
                   num_classes=len(SEMANTIC_CLASSES), tasks=OFFICIAL_TASKS)


# ------------------------------------------------------------ preprocessed

_LABEL_DIR = re.compile(r'^label_(\d+)$')
_INDEX = re.compile(r'^(\d+)\.npy$')


def _is_preprocessed(root: str) -> bool:
  return os.path.isdir(os.path.join(root, 'train', 'image'))


def _label_dir(split_dir: str, num_classes: int | None) -> tuple[str, int]:
  """The label folder's name and its number of classes."""
  names = os.listdir(split_dir) if os.path.isdir(split_dir) else []
  numbered = {int(m.group(1)): n for n in names
              if (m := _LABEL_DIR.match(n))
              and os.path.isdir(os.path.join(split_dir, n))}
  plain = os.path.isdir(os.path.join(split_dir, 'label'))
  if num_classes is not None and num_classes in numbered:
    return numbered[num_classes], num_classes
  if plain:
    return 'label', 7 if num_classes is None else num_classes
  if num_classes is None and numbered:
    c = 7 if 7 in numbered else min(numbered)
    return numbered[c], c
  found = sorted(numbered.values())
  want = f'label_{num_classes}/ or label/' if num_classes else (
      'label_<C>/ or label/')
  raise CityscapesError(f'{split_dir} has no label folder {want} (found '
                        f'{found or "none"}).')


def _preprocessed_files(root: str, num_classes: int | None):
  """``(label folder, classes, {'train': items, 'val': items})``.

  Each item is ``(image, label, depth)`` paths of one index.
  """
  out, label = {}, None
  for split in ('train', 'val'):
    split_dir = os.path.join(root, split)
    image_dir = os.path.join(split_dir, 'image')
    if not os.path.isdir(image_dir):
      raise CityscapesError(f'{root}: no folder {image_dir} (the '
                            'preprocessed layout needs train/ and val/, each '
                            'with image/, label_<C>/ and depth/).')
    name, classes = _label_dir(split_dir, num_classes)
    if label is not None and name != label[0]:
      raise CityscapesError(f'{root}: train/ uses {label[0]}/ but val/ '
                            f'has {name}/.')
    label = (name, classes)
    indices = sorted(int(m.group(1)) for n in os.listdir(image_dir)
                     if (m := _INDEX.match(n)))
    if not indices:
      raise CityscapesError(f'no <i>.npy images in {image_dir}.')
    items = []
    for i in indices:
      item = tuple(os.path.join(split_dir, d, f'{i}.npy')
                   for d in ('image', name, 'depth'))
      for what, path in zip(('label', 'depth'), item[1:]):
        if not os.path.isfile(path):
          raise CityscapesError(f'the image {item[0]} has no {what} file: '
                                f'missing {path}.')
      items.append(item)
    out[split] = items
  return label[0], label[1], out


def _load_npy(path: str, what: str) -> np.ndarray:
  try:
    a = np.load(path, allow_pickle=False)
  except FileNotFoundError as e:
    raise CityscapesError(f'missing {what} file {path}.') from e
  except (OSError, ValueError, EOFError) as e:
    raise CityscapesError(f'unreadable {what} npy {path}: {e}') from e
  if not isinstance(a, np.ndarray) or not (
      np.issubdtype(a.dtype, np.floating) or
      np.issubdtype(a.dtype, np.integer)):
    raise CityscapesError(f'{path}: expected a numeric {what} array; got '
                          f'{getattr(a, "dtype", type(a))}.')
  return a


def _read_preprocessed_split(items, num_classes, shape, name, log
                             ) -> DenseSplit:
  n = len(items)
  h, w = shape
  log(f'reading {n} {name} images (preprocessed Cityscapes arrays)')
  images = np.zeros((n, h, w, 3), np.uint8)
  semantic = np.zeros((n, h, w), np.uint8)
  depth = np.zeros((n, h, w), np.float32)
  for j, (image_path, label_path, depth_path) in enumerate(items):
    x = _load_npy(image_path, 'image')
    if x.shape != (h, w, 3):
      raise CityscapesError(f'{image_path}: expected an image of shape '
                            f'{(h, w, 3)}; got {x.shape}.')
    if x.dtype == np.uint8:
      images[j] = x
    else:
      if not (np.all(np.isfinite(x)) and x.min() >= -1e-3 and
              x.max() <= 1 + 1e-3):
        raise CityscapesError(f'{image_path}: expected image values in '
                              f'[0, 1]; got [{x.min()}, {x.max()}].')
      images[j] = np.clip(np.round(255.0 * x), 0, 255).astype(np.uint8)
    y = _load_npy(label_path, 'label')
    if y.shape == (h, w, 1):
      y = y[..., 0]
    if y.shape != (h, w):
      raise CityscapesError(f'{label_path}: expected labels of shape '
                            f'{(h, w)}; got {y.shape}.')
    bad = ~np.isfinite(y) | (y != np.round(y)) | (y < -1) | (
        y >= num_classes)
    if np.any(bad):
      raise CityscapesError(
          f'{label_path}: labels must be integers in -1..{num_classes - 1} '
          f'(-1 ignored); got {np.asarray(y)[bad][0]}.')
    semantic[j] = np.where(y < 0, IGNORE, y).astype(np.uint8)
    d = _load_npy(depth_path, 'depth')
    if d.shape == (h, w, 1):
      d = d[..., 0]
    if d.shape != (h, w):
      raise CityscapesError(f'{depth_path}: expected depth of shape '
                            f'{(h, w, 1)}; got {d.shape}.')
    if not np.all(np.isfinite(d)):
      raise CityscapesError(f'{depth_path}: non-finite depth values.')
    depth[j] = d
  return DenseSplit(images, {'semantic': semantic, 'depth': depth})


def read_preprocessed(root: str, *, num_classes: int | None = None,
                      val_fraction: float = VAL_FRACTION, seed: int = 0,
                      max_images: int | None = None, log=print) -> DenseData:
  """The three splits from MTAN's preprocessed arrays (module docstring).

  Args:
    root: the folder holding ``train/`` and ``val/``.
    num_classes: which ``label_<C>/`` to read, or the classes of a plain
      ``label/`` (default 7); ``None`` takes ``label_7/`` where present.
    val_fraction: the share of ``train/`` held out as ``val``.
    seed: the seed of that hold-out.
    max_images: at most this many images per split (quick runs).
    log: progress messages.

  Returns:
    :class:`DenseData` with tasks ``('semantic', 'depth')``; ``test`` is
    ``val/``, at the arrays' own resolution.

  Raises:
    CityscapesError: a missing folder or file, an unreadable ``.npy``, or
      arrays of the wrong shape or range.
  """
  if not os.path.isdir(root):
    raise CityscapesError(f'Cityscapes folder {root} does not exist.')
  _, classes, files = _preprocessed_files(root, num_classes)
  first = _load_npy(files['train'][0][0], 'image')
  if first.ndim != 3 or first.shape[-1] != 3:
    raise CityscapesError(f'{files["train"][0][0]}: expected an (H, W, 3) '
                          f'image; got shape {first.shape}.')
  splits = _three_splits(files['train'], files['val'], val_fraction, seed,
                         max_images, root)
  return DenseData(*(_read_preprocessed_split(f, classes, first.shape[:2], s,
                                              log)
                     for s, f in zip(SPLITS, splits)),
                   num_classes=classes, tasks=PREPROCESSED_TASKS)


# ------------------------------------------------------------------ cached


def detect_layout(root: str) -> str:
  """``'official'`` or ``'preprocessed'``: which layout ``root`` holds."""
  if not os.path.isdir(root):
    raise CityscapesError(f'Cityscapes folder {root} does not exist.')
  official = _official_dir(root, 'leftImg8bit') is not None
  preprocessed = _is_preprocessed(root)
  if official and preprocessed:
    raise CityscapesError(f'{root} holds both the official files and the '
                          'preprocessed arrays; pass layout="official" or '
                          'layout="preprocessed".')
  if official:
    return 'official'
  if preprocessed:
    return 'preprocessed'
  raise CityscapesError(
      f'{root} is in neither Cityscapes layout: expected leftImg8bit/, '
      'gtFine/, disparity/ (or TFDS\'s leftImg8bit_trainvaltest/...), or '
      f'train/image/*.npy (MTAN\'s preprocessed arrays); found '
      f'{sorted(os.listdir(root))[:8]}.')


def _fingerprint(root: str, paths, *args) -> str:
  h = hashlib.sha256()
  h.update(repr((_CACHE_VERSION, os.path.abspath(root)) + args).encode())
  for path in paths:
    h.update(repr((os.path.relpath(path, root),
                   os.path.getsize(path))).encode())
  return h.hexdigest()[:16]


def _flatten(data: DenseData) -> dict[str, np.ndarray]:
  out = {'num_classes': np.asarray(data.num_classes),
         'tasks': np.asarray(data.tasks)}
  for name, split in zip(SPLITS, data[:3]):
    out[f'{name}/images'] = split.images
    for task, label in split.labels.items():
      if isinstance(label, dict):
        for k, v in label.items():
          out[f'{name}/{task}/{k}'] = v
      else:
        out[f'{name}/{task}'] = label
  return out


def _unflatten(z, tasks: tuple[str, ...]) -> DenseData:
  splits = []
  for name in SPLITS:
    labels = {}
    for task in tasks:
      if task == 'instance':
        labels[task] = {k: z[f'{name}/{task}/{k}'] for k in ('offset',
                                                             'valid')}
      else:
        labels[task] = z[f'{name}/{task}']
    splits.append(DenseSplit(z[f'{name}/images'], labels))
  return DenseData(*splits, num_classes=int(z['num_classes']), tasks=tasks)


def _shape_problem(data: DenseData, tasks, hw) -> str | None:
  """What is wrong with the arrays of ``data``, or ``None``."""
  if tuple(data.tasks) != tuple(tasks):
    return f'tasks {data.tasks}, expected {tasks}'
  for name, split in zip(SPLITS, data[:3]):
    n = len(split.images)
    h, w = hw or split.images.shape[1:3]
    want = {'images': ((n, h, w, 3), np.uint8),
            'semantic': ((n, h, w), np.uint8),
            'instance/offset': ((n, h, w, 2), np.float32),
            'instance/valid': ((n, h, w), np.float32),
            'disparity': ((n, h, w), np.float32),
            'depth': ((n, h, w), np.float32)}
    got = {'images': split.images}
    for task, label in split.labels.items():
      if isinstance(label, dict):
        got.update({f'{task}/{k}': v for k, v in label.items()})
      else:
        got[task] = label
    for key, a in got.items():
      if (a.shape, a.dtype) != want[key]:
        return f'{name}/{key} is {a.dtype}{a.shape}, expected {want[key]}'
  return None


def load_cityscapes(cache_dir: str, *, cityscapes_dir: str | None,
                    layout: str = 'auto', height: int = 256,
                    width: int = 512, num_classes: int | None = None,
                    max_images: int | None = None,
                    val_fraction: float = VAL_FRACTION, seed: int = 0,
                    log=print) -> DenseData:
  """Cityscapes from a folder in either layout, cached as one ``.npz``.

  Args:
    cache_dir: where the cache file is kept.
    cityscapes_dir: the folder of the official files or of the
      preprocessed arrays.
    layout: ``'official'``, ``'preprocessed'``, or ``'auto'`` (detected).
    height: output rows (official layout; the preprocessed arrays keep
      their own size).
    width: output columns (official layout).
    num_classes: the preprocessed layout's label folder (see
      :func:`read_preprocessed`); the official layout always has 19.
    max_images: at most this many images per split (quick runs).
    val_fraction: the share of the official train set held out as ``val``.
    seed: the seed of that hold-out.
    log: progress messages.

  Returns:
    :class:`DenseData`.

  Raises:
    CityscapesError: no folder, a folder in neither layout, or missing,
      unreadable or malformed files (the message names the file).
  """
  if layout not in LAYOUTS:
    raise ValueError(f'layout must be one of {LAYOUTS}; got {layout!r}.')
  if not cityscapes_dir:
    raise CityscapesError('no Cityscapes folder given (cityscapes_dir); see '
                          'experiments/cityscapes/input_pipeline.py for the '
                          'layouts it reads.')
  root = cityscapes_dir
  if layout == 'auto':
    layout = detect_layout(root)
  elif not os.path.isdir(root):
    raise CityscapesError(f'Cityscapes folder {root} does not exist.')
  if layout == 'official':
    files = _official_files(root)
    paths = [p for split in ('train', 'val') for f in files[split]
             for p in f]
    key = _fingerprint(root, paths, 'official', height, width, max_images,
                       val_fraction, seed)
    name = f'cityscapes-official-{height}x{width}-{key}.npz'
    tasks, hw = OFFICIAL_TASKS, (height, width)
    read = lambda: read_official(root, height=height, width=width,
                                 val_fraction=val_fraction, seed=seed,
                                 max_images=max_images, log=log)
  else:
    label, classes, files = _preprocessed_files(root, num_classes)
    paths = [p for split in ('train', 'val') for item in files[split]
             for p in item]
    key = _fingerprint(root, paths, 'preprocessed', label, classes,
                       max_images, val_fraction, seed)
    name = f'cityscapes-preprocessed-{key}.npz'
    tasks, hw = PREPROCESSED_TASKS, None
    read = lambda: read_preprocessed(root, num_classes=num_classes,
                                     val_fraction=val_fraction, seed=seed,
                                     max_images=max_images, log=log)
  path = os.path.join(cache_dir, name)
  if os.path.exists(path):
    try:
      with np.load(path, allow_pickle=False) as z:
        data = _unflatten(z, tuple(str(t) for t in z['tasks']))
      problem = _shape_problem(data, tasks, hw)
      if problem is None:
        log(f'read Cityscapes from the cache {path}')
        return data
      log(f'cache {path} has unexpected contents ({problem}); rebuilding')
    except Exception as e:  # pylint: disable=broad-except
      log(f'cache {path} unreadable ({type(e).__name__}: {e}); rebuilding')
  data = read()
  os.makedirs(cache_dir, exist_ok=True)
  tmp = path + '.tmp.npz'
  np.savez(tmp, **_flatten(data))
  os.replace(tmp, path)
  return data
