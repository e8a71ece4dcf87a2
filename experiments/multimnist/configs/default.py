"""Default MultiMNIST configuration: the paper's setup, CPU-sized epochs."""

import dataclasses

# The paper's methods first, then every other method of the library.
METHODS = ('mgda_ub', 'mgda', 'uniform', 'kendall', 'gradnorm', 'single_task',
           'initial_loss', 'prior_loss', 'realtime_loss', 'dwa', 'dtp', 'lbtw',
           'rlw', 'famo', 'gradient_normalization', 'pcgrad', 'graddrop',
           'gradvac', 'cagrad', 'imtl_g', 'nash_mtl', 'aligned_mtl', 'upgrad',
           'dualproj')


@dataclasses.dataclass(frozen=True)
class Config:
  """One MultiMNIST training run.

  The optimisation follows Sener & Koltun's code: SGD with momentum 0.9,
  learning rate 0.05, batch 256, normaliser 'none' for MGDA-UB. They trained
  for 100 epochs; ``epochs`` defaults to 10 so the main job finishes in
  minutes on a CPU (see ``docs/RESULTS.md`` for what each figure used).
  """

  method: str = 'mgda_ub'
  epochs: int = 10
  batch_size: int = 256
  learning_rate: float = 0.05
  momentum: float = 0.9
  seed: int = 0                 # model initialisation, shuffling, dropout
  data_seed: int = 0            # MultiMNIST pairing and validation split
  normalizer: str = 'none'      # for mgda / mgda_ub
  gradnorm_alpha: float = 1.5
  gradnorm_lr: float = 0.025
  kendall_lr: float = 0.05
  # The other methods' hyperparameters: their papers' defaults.
  cagrad_c: float = 0.4         # Liu et al. 2021 (their MultiMNIST-style runs)
  gradvac_beta: float = 0.01    # Wang et al. 2021
  dwa_temperature: float = 2.0  # Liu et al. 2019
  dtp_gamma: float = 1.0
  lbtw_alpha: float = 0.5       # Liu et al. 2019
  famo_lr: float = 0.025        # Liu et al. 2023 (beta)
  famo_decay: float = 1e-3      # Liu et al. 2023 (gamma)
  # Data: a folder of MNIST IDX files, or a TFDS data dir (None: default).
  mnist_dir: str | None = None
  tfds_data_dir: str | None = None
  cache_dir: str = 'data/multimnist'
  # Training steps per compiled call (a lax.scan when > 1); the largest
  # divisor of the batches per epoch not above it is used. 0: automatic, 1 on
  # CPU (XLA:CPU runs this step ~6x slower inside a loop) and 15 elsewhere.
  chunk: int = 0
  eval_batch_size: int = 1000
  # Data parallelism: shard each batch over this many devices (a 'data' mesh
  # axis under jax.jit; parameters replicated). 1: one device; 0: all.
  # The Gram matrix and gradients are the global ones (XLA all-reduces).
  devices: int = 1
  # Train only these tasks (0: left, 1: right); single_task runs set it.
  tasks: tuple[int, ...] = (0, 1)
  # Stop after this many training examples (0: all); for tests.
  max_train_examples: int = 0

  def validate(self) -> 'Config':
    """Raises ValueError for a bad value; returns self."""
    if self.method not in METHODS:
      raise ValueError(f'method must be one of {METHODS}; got {self.method!r}')
    if self.devices < 0:
      raise ValueError(f'devices must be >= 0; got {self.devices}')
    if self.chunk < 0:
      raise ValueError(f'chunk must be >= 0; got {self.chunk}')
    for name in ('epochs', 'batch_size', 'eval_batch_size'):
      if getattr(self, name) < 1:
        raise ValueError(f'{name} must be >= 1; got {getattr(self, name)}')
    if self.learning_rate <= 0:
      raise ValueError(f'learning_rate must be > 0; got {self.learning_rate}')
    if not self.tasks or any(t not in (0, 1) for t in self.tasks):
      raise ValueError(f'tasks must be a non-empty subset of (0, 1); got '
                       f'{self.tasks}')
    if self.normalizer not in ('none', 'l2', 'loss', 'loss+'):
      raise ValueError(f'unknown normalizer {self.normalizer!r}')
    return self


def get_config(**overrides) -> Config:
  return Config(**overrides).validate()
