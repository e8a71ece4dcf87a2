"""Nash-MTL: the Nash bargaining solution among tasks (Navon et al. 2022).

The update ``d = sum_t alpha_t g_t`` maximises ``sum_t log <d, g_t>`` within
a ball; its weights solve (their Eq. 2 / Claim 3.1)

.. math::

  G \\alpha = 1 / \\alpha \\quad (\\text{elementwise}), \\qquad \\alpha > 0 .

That is exactly the stationarity condition of the strictly convex function
``phi(alpha) = alpha^T G alpha / 2 - sum_t log alpha_t`` on the positive
orthant, so the solution is unique and Newton's method on ``phi`` finds it:
``phi`` is self-concordant, and damped Newton steps (kept inside the orthant,
with backtracking) converge quadratically near the solution. The authors'
code approximates the same solution by a sequence of convex programmes in
cvxpy on the host; here it is a ``lax.while_loop`` on the device.

Consequences worth knowing: ``||d||^2 = alpha^T G alpha = K`` whatever the
scale of the gradients, and ``alpha`` scales as ``1/||g||``. The solve runs on
the cosine matrix ``C = N^-1 G N^-1`` (``N`` the diagonal of gradient norms)
for ``beta = N alpha``, which satisfies ``C beta = 1/beta``: its conditioning
does not depend on how the norms are spread. A task with a zero gradient
cannot satisfy the equation (its row of ``G`` is zero); it gets weight 0
and the others solve the equation among themselves. Where a non-negative
combination of gradients vanishes (two opposite gradients) the equation has
no solution at all; a ridge of ``1e-6`` (float32) or ``1e-10`` (float64) on
the cosine matrix keeps the solve finite there (the update is then about
zero) and perturbs ordinary solutions by that relative amount.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mgda_jax._src import engine
from mgda_jax._src.core import checks
from mgda_jax._src.core import results
from mgda_jax._src.core import dtypes


class NashMTLInfo(NamedTuple):
  """Diagnostics of the Nash-MTL solve.

  Attributes:
    num_steps: Newton steps taken.
    residual: ``max_t |alpha_t (G alpha)_t - 1|`` over tasks with a
      non-zero gradient.
    converged: the Newton decrement fell below the tolerance.
    decrement: the final squared Newton decrement (the certificate).
    result: a :class:`mgda_jax.SolverResult` code.
  """

  num_steps: jax.Array
  residual: jax.Array
  converged: jax.Array
  decrement: jax.Array
  result: jax.Array


def nash_mtl_weights(gram: jax.Array, *, max_steps: int = 100,
                     tol: float | None = None
                     ) -> tuple[jax.Array, NashMTLInfo]:
  """Solves ``G alpha = 1/alpha``, ``alpha > 0`` by damped Newton steps.

  Args:
    gram: ``(K, K)`` Gram matrix.
    max_steps: Newton step cap.
    tol: tolerance on the squared Newton decrement (default ``1e-10``
      (f32) / ``1e-20`` (f64)).

  Returns:
    ``(alpha, info)``.
  """
  dtype = dtypes.solve_dtype(gram.dtype)
  gram = gram.astype(dtype)
  k = gram.shape[0]
  f64 = dtype == jnp.float64
  tol = (1e-20 if f64 else 1e-10) if tol is None else tol
  finite = jnp.all(jnp.isfinite(gram))
  # Solve on the cosine matrix C = N^-1 G N^-1 (N = diag of the norms): with
  # beta = N alpha the equation G alpha = 1/alpha reads C beta = 1/beta,
  # whose conditioning does not depend on the spread of the norms.
  n = jnp.sqrt(jnp.maximum(jnp.where(finite, jnp.diagonal(gram), 0.0), 0.0))
  live = n > 0
  inv_n = jnp.where(live, 1.0 / jnp.where(live, n, 1.0), 0.0)
  g = jnp.where(finite, gram, 0.0) * inv_n[:, None] * inv_n[None, :]
  g = g + jnp.diag(jnp.where(live, 0.0, 1.0))  # zero gradients: beta_t = 1
  # A ridge keeps a minimiser when a non-negative combination of the
  # gradients vanishes (e.g. two opposite gradients), where the equation
  # itself has no solution and Newton's iterates would grow without bound.
  g = g + (1e-10 if f64 else 1e-6) * jnp.eye(k, dtype=dtype)
  def phi(a):
    return 0.5 * a @ g @ a - jnp.sum(jnp.log(a))

  def newton(a):
    grad = g @ a - 1.0 / a
    hess = g + jnp.diag(1.0 / a ** 2)
    step = -jnp.linalg.solve(hess, grad)
    return grad, step, -(grad @ step)

  def cond(state):
    _, it, dec = state
    return (it < max_steps) & (dec > tol)

  def body(state):
    a, it, _ = state
    grad, step, dec = newton(a)
    # Largest step keeping a > 0, then backtracking (Armijo, 1/4). Near the
    # solution (Newton decrement below 1/2, i.e. dec < 1/4) the full step is
    # safe for this self-concordant function and converges quadratically;
    # a line search there would only fight rounding in phi.
    shrink = jnp.where(step < 0, -a / jnp.where(step < 0, step, -1.0), jnp.inf)
    t0 = jnp.minimum(1.0, 0.99 * jnp.min(shrink))
    f0 = phi(a)
    slope = grad @ step

    def ls_cond(t):
      a_new = a + t * step
      bad = jnp.any(a_new <= 0) | (phi(a_new) > f0 + 0.25 * t * slope)
      return bad & (t > 1e-12) & (dec >= 0.25)

    t = jax.lax.while_loop(ls_cond, lambda t: t / 2, t0)
    a = a + t * step
    return a, it + 1, newton(a)[2]

  a0 = jnp.full((k,), 1.0 / jnp.sqrt(k), dtype)
  a, steps, dec = jax.lax.while_loop(
      cond, body, (a0, jnp.zeros((), jnp.int32), newton(a0)[2]))
  residual = jnp.max(jnp.where(live, jnp.abs(a * (g @ a) - 1.0), 0.0))
  ok = finite & jnp.all(jnp.isfinite(a))
  alpha = jnp.where(ok, a * inv_n, jnp.where(finite, 0.0, jnp.nan))
  converged = finite & (dec <= tol)
  return alpha, NashMTLInfo(jnp.asarray(steps, jnp.int32),
                            jnp.where(finite, residual, jnp.nan), converged,
                            jnp.where(finite, dec, jnp.nan),
                            results.result_code(converged, finite))


def nash_mtl(num_tasks: int, *, normalize: bool = False,
             max_steps: int = 100, tol: float = 1e-10,
             shared=None,
             axis_name=None) -> optax.GradientTransformationExtraArgs:
  """Nash-MTL as an optax transform: ``d = sum_t alpha_t g_t``, ``G alpha = 1/alpha``.

  By default (``normalize=False``) this is the paper's equation on the raw
  Gram matrix, as the authors' code (and TorchJD's port of it) solves it:
  for ``G = 100 I``, ``alpha = 0.1``. The update then has the constant norm
  ``||d|| = sqrt(K)`` whatever the scale of the gradients (the authors clip
  it with ``max_norm``; use ``optax.clip_by_global_norm``), so Nash-MTL is
  not scale-equivariant. ``normalize=True`` solves the equation for ``G /
  ||G||_F`` instead, i.e. ``alpha`` is the paper's solution times
  ``sqrt(||G||_F)``: the update then scales like the gradients (``||d||^2 =
  K ||G||_F``), which a fixed learning rate can anneal.

  The reference implementation may re-solve only every few steps; that is
  left to the user's schedule.

  Args:
    num_tasks: ``K`` (static).
    normalize: solve on the Frobenius-normalised Gram matrix (static).
    max_steps: Newton step cap.
    tol: tolerance on the squared Newton decrement (``1e-20`` suits
      float64).
    shared: which per-task-gradient leaves are shared (see
      :func:`mgda_jax.mgda`).
    axis_name: the data-parallel axis for an untyped ``jax.shard_map`` or
      ``jax.pmap`` (see the README's "Several devices").

  Returns:
    A ``GradientTransformationExtraArgs`` with state
    :class:`mgda_jax.MethodState`.

  References:
    Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya,
    *Multi-Task Learning as a Bargaining Game*, ICML 2022,
    https://arxiv.org/abs/2202.01017
  """
  num_tasks = checks.check_num_tasks(num_tasks, 'nash_mtl')
  checks.check_scalar('nash_mtl', 'max_steps', max_steps, low=1, integer=True)
  checks.check_scalar('nash_mtl', 'tol', tol, low=0.0)

  def weight_fn(gram, inner, losses):
    del losses
    alpha, info = nash_mtl_weights(gram, max_steps=max_steps, tol=tol)
    if normalize:  # the solution for G / ||G||_F (computed without overflow)
      m = jnp.max(jnp.abs(gram))
      m = jnp.where(m > 0, m, 1.0)
      frob = m * jnp.sqrt(jnp.sum((gram / m) ** 2))
      alpha = alpha * jnp.sqrt(frob)
    return alpha, inner, results.SolveInfo(info.num_steps, info.decrement,
                                           info.converged, info.result)

  return engine.gram_method('nash_mtl', num_tasks, weight_fn,
                            lambda dtype: (), shared=shared,
                            axis_name=axis_name)
