"""A jit-compiled solver for small non-negative quadratic programmes.

.. math::

  \\min_{x \\ge 0} \\; \\tfrac12 x^\\top G x + c^\\top x ,

with ``G`` a ``(K, K)`` positive semi-definite (Gram) matrix. This is the
inner problem of UPGrad and DualProj (Quinton & Rey 2024): projecting a
combination ``J^T u`` of task gradients onto the dual cone ``{v : J v >= 0}``
is ``v = J^T (u + x)`` with ``x`` solving the programme above for ``c = G
u``. The peers hand it to ``quadprog`` on the host; here it runs inside the
jitted step.

The method is Lawson & Hanson's (1974) active-set algorithm for non-negative
least squares, written on the Gram matrix (NNLS with ``A^T A = G`` and ``A^T b
= -c``). It adds the most violated variable to the passive set, solves the
equality-constrained problem on that set, and steps back towards feasibility
whenever a passive variable would turn negative. It terminates in finitely
many steps in exact arithmetic, at a point satisfying the KKT conditions

.. math::

  x \\ge 0, \\qquad \\nabla = G x + c \\ge 0, \\qquad x \\odot \\nabla = 0 .

Each equality solve is a masked dense ``K x K`` solve, so a step costs
``O(K^3)``; the programmes here have ``K`` = number of tasks. The variables
are Jacobi-scaled first (``x_t = y_t / sqrt(G_tt)``, so the scaled matrix has
a unit diagonal), and a ridge of ``100 eps`` keeps the masked solves defined
when the passive gradients are linearly dependent; one step of iterative
refinement removes its bias where they are not.

References:
  Lawson & Hanson, *Solving Least Squares Problems*, Prentice-Hall 1974,
  Chapter 23.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mgda_jax._src.core import dtypes
from mgda_jax._src.core import results


class NonnegQPSolution(NamedTuple):
  """Result of :func:`nonneg_qp`.

  Attributes:
    x: the minimiser, ``(K,)``, non-negative.
    num_steps: active-set (outer) iterations taken.
    converged: the KKT conditions hold to the tolerance.
    kkt_violation: ``max(-min(grad), max|y * grad| / s) / s`` on the
      Jacobi-scaled problem (variables ``y``, unit diagonal), with ``c``
      divided by its largest entry (so the measure is scale-free), where
      ``grad`` is its gradient and ``s = 1 + max|y| + max|c|`` the size of
      its terms.
    result: a :class:`mgda_jax.SolverResult` code.
  """

  x: jax.Array
  num_steps: jax.Array
  converged: jax.Array
  kkt_violation: jax.Array
  result: jax.Array


def default_qp_tol(dtype) -> float:
  """KKT tolerance on the scaled problem: ``1e-5`` (f32), ``1e-11`` (f64)."""
  return 1e-11 if jnp.dtype(dtype) == jnp.float64 else 1e-5


def nonneg_qp(gram: jax.Array, linear: jax.Array, *,
              max_steps: int | None = None,
              tol: float | None = None) -> NonnegQPSolution:
  """Solves ``min_{x >= 0} x^T G x / 2 + c^T x`` (Lawson-Hanson active set).

  Args:
    gram: ``(K, K)`` symmetric PSD matrix ``G``.
    linear: ``(K,)`` vector ``c``.
    max_steps: cap on active-set iterations (default ``4 K + 10``).
    tol: KKT tolerance on the scaled problem (default
      :func:`default_qp_tol`).

  Returns:
    A :class:`NonnegQPSolution`. Non-finite input gives a NaN ``x`` and
    ``converged=False``.

  Example:
    >>> import jax.numpy as jnp
    >>> from mgda_jax import nonneg_qp
    >>> sol = nonneg_qp(jnp.eye(2), jnp.array([-1.0, 2.0]))
    >>> print(sol.x, sol.converged)
    [1. 0.] True
  """
  gram = jnp.asarray(gram)
  linear = jnp.asarray(linear)
  if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or linear.shape != (
      gram.shape[0],):
    raise ValueError('nonneg_qp needs a (K, K) matrix and a (K,) vector; got '
                     f'{gram.shape} and {linear.shape}.')
  dtype = dtypes.solve_dtype(jnp.result_type(gram.dtype, linear.dtype))
  k = gram.shape[0]
  if k == 0:
    raise ValueError('nonneg_qp: zero variables.')
  gram = gram.astype(dtype)
  linear = linear.astype(dtype)
  finite = jnp.all(jnp.isfinite(gram)) & jnp.all(jnp.isfinite(linear))
  # Jacobi scaling, x = y / d with d = sqrt(diag(G)): the scaled G has a
  # unit diagonal, so the ridge and the tolerances mean the same for every
  # variable however the gradient norms are spread. It keeps x >= 0.
  d = jnp.sqrt(jnp.maximum(jnp.where(finite, jnp.diagonal(gram), 1.0), 0.0))
  inv_d = jnp.where(d > 0, 1.0 / jnp.where(d > 0, d, 1.0), 1.0)
  g = jnp.where(finite, gram, 0.0) * inv_d[:, None] * inv_d[None, :]
  c = jnp.where(finite, linear, 0.0) * inv_d
  # Scale-free: min x^T g x / 2 + c^T x with c -> c / m has the solution
  # x / m, so the tolerances mean the same for gradients of any size (an
  # absolute tolerance stopped early on small gradients, leaving a
  # conflicting direction that reported converged).
  c_scale = jnp.max(jnp.abs(c))
  c_scale = jnp.where(c_scale > 0, c_scale, 1.0)
  c = c / c_scale
  eps = jnp.finfo(dtype).eps
  ridge = 100 * eps
  tol = default_qp_tol(dtype) if tol is None else tol
  max_steps = 4 * k + 10 if max_steps is None else max_steps

  def solve_on(passive):
    both = passive[:, None] & passive[None, :]
    m = jnp.where(both, g, 0.0)
    regular = m + jnp.diag(jnp.where(passive, ridge, 1.0))
    rhs = jnp.where(passive, -c, 0.0)
    z = jnp.linalg.solve(regular, rhs)
    # One step of iterative refinement removes the ridge's bias (to first
    # order) where the passive block is well conditioned.
    z = z + jnp.linalg.solve(regular, rhs - m @ z)
    return jnp.where(passive, z, 0.0)

  def inner_cond(state):
    _, passive, z, n = state
    return jnp.any(passive & (z <= 0)) & (n < k)

  def inner_body(state):
    x, passive, z, n = state
    neg = passive & (z <= 0)
    denom = x - z
    ratio = jnp.where(neg, jnp.where(denom > 0, x / jnp.where(denom > 0, denom,
                                                              1.0), 0.0),
                      jnp.inf)
    a = jnp.clip(jnp.min(ratio), 0.0, 1.0)
    x = x + a * (z - x)
    passive = passive & (x > 0) & ~(neg & (ratio <= a))
    return x, passive, solve_on(passive), n + 1

  def outer_cond(state):
    _, _, it, done = state
    return (~done) & (it < max_steps)

  def outer_body(state):
    x, passive, it, _ = state
    w = -(g @ x + c)
    cand = jnp.where(passive, -jnp.inf, w)
    j = jnp.argmax(cand)
    enter = cand[j] > tol
    new_passive = passive | (enter & (jnp.arange(k) == j))
    z = solve_on(new_passive)
    x1, p1, z1, _ = jax.lax.while_loop(inner_cond, inner_body,
                                       (x, new_passive, z, 0))
    x1 = jnp.where(p1, jnp.maximum(z1, 0.0), 0.0)
    # The entering variable was dropped at once: no progress is possible.
    stalled = enter & ~p1[j]
    x_out = jnp.where(enter, x1, x)
    p_out = jnp.where(enter, p1, passive)
    return x_out, p_out, it + 1, (~enter) | stalled

  x, _, steps, _ = jax.lax.while_loop(
      outer_cond, outer_body,
      (jnp.zeros((k,), dtype), jnp.zeros((k,), bool), 0, False))
  grad = g @ x + c
  # Relative to the size of the terms of grad = G x + c.
  size = 1.0 + jnp.max(jnp.abs(x)) + jnp.max(jnp.abs(c))
  violation = jnp.maximum(-jnp.min(grad),
                          jnp.max(jnp.abs(x * grad)) / size) / size
  violation = jnp.maximum(violation, 0.0)
  x = jnp.where(finite, x * inv_d * c_scale, jnp.nan)
  converged = finite & (violation <= 10 * tol)
  return NonnegQPSolution(x, jnp.asarray(steps, jnp.int32), converged,
                          jnp.where(finite, violation, jnp.nan),
                          results.result_code(converged, finite))
