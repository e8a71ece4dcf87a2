"""Exact references for the simplex-constrained QP, in numpy float64.

``min_a a^T G a`` subject to ``a >= 0``, ``sum(a) = 1``.

Two independent solvers, written for the tests and sharing nothing with
``mgda_jax``:

* :func:`enumerate_qp`: brute force over every support. For each non-empty
  subset ``S`` the minimiser of ``a^T G a`` on the affine hull
  ``{sum a = 1, a_i = 0 off S}`` is found with a least-squares (pseudo-inverse)
  solve of the KKT system; the best one that is non-negative is the optimum.
  Exact but O(2^K): used for K <= 12.
* :func:`active_set_qp`: a primal active-set method (Goldfarb-Idnani style
  moves on the face, at most one vertex added or dropped per iteration), with
  least-squares KKT solves and a final certificate: the Frank-Wolfe duality gap
  ``2 (f - min_t (G a)_t)`` in float64, which bounds its own error.

Both work on ``G / max(diag(G))`` internally (the minimiser is unchanged by
scaling) and report ``f`` in the original units.
"""

import itertools

import numpy as np


def _face_solve(g: np.ndarray, support: np.ndarray,
                lu_first: bool = False) -> np.ndarray:
  """Minimiser of a^T G a on {sum a = 1, a = 0 off support} (least squares).

  Solved in Jacobi-scaled variables ``y = a * sqrt(diag G)`` (unit diagonal),
  so that gradients whose norms differ by many orders of magnitude do not
  fall below the least-squares cut-off. With ``lu_first`` an LU solve is
  tried first and kept when its residual is at rounding level (the active
  set's iterations, whose end point is certified by its duality gap).
  """
  k = g.shape[0]
  idx = np.flatnonzero(support)
  m = len(idx)
  diag = np.diag(g)[idx]
  d = np.where(diag > 0, 1.0 / np.sqrt(np.where(diag > 0, diag, 1.0)), 1.0)
  kkt = np.zeros((m + 1, m + 1))
  kkt[:m, :m] = 2.0 * g[np.ix_(idx, idx)] * d[:, None] * d[None, :]
  kkt[:m, m] = d
  kkt[m, :m] = d
  rhs = np.zeros(m + 1)
  rhs[m] = 1.0
  sol = None
  if lu_first:
    # An LU solve where the KKT matrix is regular (a quarter of the SVD's
    # cost at K = 256); least squares where it is singular or ill-posed.
    try:
      sol = np.linalg.solve(kkt, rhs)
    except np.linalg.LinAlgError:
      sol = None
    if sol is not None and not (
        np.all(np.isfinite(sol)) and np.linalg.norm(sol) < 1e8
        and np.linalg.norm(kkt @ sol - rhs) <= 1e-12 * (
            1.0 + np.linalg.norm(sol))):
      sol = None
  if sol is None:
    sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
  a = np.zeros(k)
  a[idx] = sol[:m] * d
  return a


def _normalise(gram):
  g = np.asarray(gram, np.float64)
  g = 0.5 * (g + g.T)
  scale = np.max(np.diag(g))
  scale = scale if scale > 0 else 1.0
  return g / scale, scale


def enumerate_qp(gram) -> tuple[np.ndarray, float]:
  """Exact optimum by enumerating supports. Returns (weights, f*)."""
  g, scale = _normalise(gram)
  k = g.shape[0]
  if k > 12:
    raise ValueError('enumerate_qp is exponential; use K <= 12.')
  best_a, best_f = None, np.inf
  for size in range(1, k + 1):
    for subset in itertools.combinations(range(k), size):
      support = np.zeros(k, bool)
      support[list(subset)] = True
      a = _face_solve(g, support)
      if np.any(a < -1e-12) or abs(a.sum() - 1) > 1e-9:
        continue
      a = np.maximum(a, 0.0)
      a /= a.sum()
      f = a @ g @ a
      if f < best_f:
        best_a, best_f = a, f
  return best_a, best_f * scale


def active_set_qp(gram, max_iter: int | None = None) -> tuple[np.ndarray,
                                                              float, float]:
  """Primal active-set solve. Returns (weights, f*, certified gap).

  The gap is the float64 Frank-Wolfe duality gap of the returned weights, in
  the original units: ``f - f_true <= gap``.
  """
  g, scale = _normalise(gram)
  k = g.shape[0]
  max_iter = 20 * k + 100 if max_iter is None else max_iter
  a = np.zeros(k)
  a[np.argmin(np.diag(g))] = 1.0
  support = a > 0
  for _ in range(max_iter):
    w = _face_solve(g, support, lu_first=True)
    if np.all(w[support] > 0):
      a = np.where(support, w, 0.0)
      a /= a.sum()
      grad = g @ a
      f = a @ grad
      t = int(np.argmin(grad))
      # Optimal when no vertex outside the face is a descent direction.
      if grad[t] >= f - 1e-14 * abs(f) or support[t]:
        break
      support[t] = True
    else:
      blocking = support & (w <= 0)
      ratios = np.where(blocking, a / np.where(blocking, a - w, 1.0), np.inf)
      j = int(np.argmin(ratios))
      theta = min(1.0, ratios[j])
      a = a + theta * (w - a)
      a[j] = 0.0
      a = np.maximum(a, 0.0)
      a /= a.sum()
      support = a > 0
  grad = g @ a
  f = a @ grad
  gap = max(2.0 * (f - grad.min()), 0.0)
  return a, f * scale, gap * scale
