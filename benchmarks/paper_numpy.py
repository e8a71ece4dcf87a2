"""The paper's closed forms in plain numpy (no framework), shared by the
solver benchmark and the PyTorch peer step."""

import numpy as np


def two_point(v1v1, v1v2, v2v2):
  """Eq. 4 of Sener & Koltun: argmin_g ||g v1 + (1-g) v2||^2 on [0, 1]."""
  if v1v2 >= v1v1:
    return 1.0
  if v1v2 >= v2v2:
    return 0.0
  return (v2v2 - v1v2) / (v1v1 + v2v2 - 2 * v1v2)


def best_pair_start(g):
  """The paper's starting point: the best two-task solution, in closed form.

  ``g`` is a ``(K, K)`` array or a list of rows; returns a numpy ``(K,)``.
  """
  k = len(g)
  if k == 1:
    return np.ones(1)
  best, alpha = np.inf, None
  for i in range(k):
    for j in range(i + 1, k):
      gam = two_point(g[i][i], g[i][j], g[j][j])
      cost = (gam * gam * g[i][i] + 2 * gam * (1 - gam) * g[i][j]
              + (1 - gam) ** 2 * g[j][j])
      if cost < best:
        best = cost
        alpha = np.zeros(k)
        alpha[i], alpha[j] = gam, 1 - gam
  return alpha
