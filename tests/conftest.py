"""Shared fixtures: problem generators for the min-norm solver tests."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from hypothesis import settings  # pylint: disable=wrong-import-position

# CI has two cores: keep property tests modest and free of wall-clock limits
# (the first example of each test compiles).
settings.register_profile('ci', max_examples=40, deadline=None)
settings.load_profile('ci')


def degenerate_gradients(rng: np.random.Generator, k: int, dim: int = 64):
  """Named families of task gradients, shape (k, dim), float64.

  Covers the cases the solver must handle: independent and correlated
  gradients, rank deficiency, duplicates, exactly opposite gradients (optimum
  0), a zero gradient, and scale ratios of 1e8 between tasks.
  """
  out = {}
  out['iid'] = rng.normal(size=(k, dim))
  mu = rng.normal(size=dim)
  out['correlated'] = mu + rng.uniform(0.2, 1.5, size=(k, 1)) * rng.normal(
      size=(k, dim))
  out['rank3'] = rng.normal(size=(k, 3)) @ rng.normal(size=(3, dim))
  x = rng.normal(size=(k, dim))
  x[1 % k] = x[0]
  if k > 2:
    x[2] = -x[0]
  out['duplicate_and_opposite'] = x
  x = rng.normal(size=(k, dim))
  x[k // 2] = 0.0
  out['zero_gradient'] = x
  out['duplicates'] = np.repeat(rng.normal(size=(max(k // 4, 1), dim)), 4,
                                axis=0)[:k]
  # Gradient norms spread over 8 decades (Gram diagonal over 16).
  out['scale_1e8_correlated'] = out['correlated'] * np.logspace(
      -4, 4, k)[:, None]
  out['scale_1e8_iid'] = rng.normal(size=(k, dim)) * np.logspace(-4, 4,
                                                                 k)[:, None]
  # Two groups of tasks whose gradient norms differ by 1e8.
  out['two_scales_1e8'] = rng.normal(size=(k, dim)) * np.where(
      np.arange(k) % 2 == 0, 1e4, 1e-4)[:, None]
  # Spreads within the certified range (norms up to 1e4 apart): the optimum
  # sits on the short gradients, which a floor tied to the longest one
  # cannot resolve in float32.
  out['scale_1e4_iid'] = rng.normal(size=(k, dim)) * np.logspace(
      0, 4, k)[rng.permutation(k)][:, None]
  x = rng.normal(size=(k, dim))
  x[rng.integers(k)] *= 1e3
  out['one_long_1e3'] = x
  out['two_scales_1e4'] = (0.3 * rng.normal(size=dim) + rng.normal(
      size=(k, dim))) * np.where(np.arange(k) % 2 == 0, 1e4, 1.0)[:, None]
  return out


# Families where a solve may end MAX_STEPS_REACHED (honestly): norms 1e8
# apart, and long gradients active at the optimum with tiny weights (in
# float32 the duality gap is then linear in the rounding of those weights,
# about eps ||g_long|| / ||d|| relative, while the excess is quadratic).
# Where a solve says converged it must still meet the target.
UNCERTIFIED_FAMILIES = ('scale_1e8_correlated', 'scale_1e8_iid',
                        'two_scales_1e8', 'two_scales_1e4', 'scale_1e4_iid')
