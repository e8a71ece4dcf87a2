"""Cityscapes in MTAN/LibMTL's preprocessed ``.npy`` format (128x256).

Two tasks, semantic segmentation (7 classes in ``label_7/``, LibMTL's
default; 19 in ``label_19/``) and depth (abs and relative error); no
instance task in that format. Otherwise the paper's setup
(:mod:`.default`).
"""

from experiments.cityscapes.configs import default


def get_config():
  c = default.get_config()
  c.data.layout = 'preprocessed'
  c.data.height, c.data.width = 128, 256
  c.data.num_classes = 7
  c.data.cache_dir = 'data/cityscapes-npy'
  return c
