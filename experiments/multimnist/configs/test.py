"""A tiny configuration for tests: two short epochs on a data subset."""

from experiments.multimnist.configs import default


def get_config(**overrides) -> default.Config:
  base = dict(epochs=2, batch_size=32, chunk=2, eval_batch_size=50,
              max_train_examples=256)
  base.update(overrides)
  return default.get_config(**base)
