"""CAGrad: conflict-averse gradient descent (Liu et al. 2021).

CAGrad looks for the update ``d`` within a ball around the average gradient
``g_0 = (1/K) sum_t g_t`` that maximises the worst task's improvement,

.. math::

  \\max_d \\min_t \\langle g_t, d \\rangle
  \\quad \\text{s.t.} \\quad \\|d - g_0\\| \\le c \\|g_0\\| ,

and solves it through its dual over the simplex (their Eq. 4): with ``g_w =
sum_t w_t g_t`` and ``r = c ||g_0||``,

.. math::

  w^\\star = \\operatorname*{argmin}_{w \\in \\Delta^K}
  F(w) = \\langle g_w, g_0 \\rangle + r \\|g_w\\| ,
  \\qquad d = g_0 + \\frac{r}{\\|g_w\\|} g_w .

``F`` only involves the Gram matrix: ``<g_w, g_0> = w^T G 1 / K`` and
``||g_w||^2 = w^T G w``. The reference code hands ``F`` to scipy's SLSQP on
the host; here it is minimised on the device by projected gradient descent
on the simplex (``optax.projections.projection_simplex``) with a
backtracking (Armijo) step, stopped by the Frank-Wolfe duality gap
``<grad F(w), w> - min_t grad F(w)_t``, which bounds ``F(w) - F(w*)`` because
``F`` is convex. ``||g_w||`` is smoothed as ``sqrt(w^T G w + eps^2 s)``
(``s`` the largest diagonal of ``G``, ``eps`` the dtype's machine epsilon)
only to keep the gradient defined at ``g_w = 0``. (The reference code adds
``1e-8``; relative to ``s`` that is as large as the optimal ``||g_w||^2``
when the task-gradient norms are spread over four decades, and it left
``d`` inside the ball while reporting convergence.)

With ``rescale=True`` (the reference code's default, ``rescale=1``) the
update is divided by ``1 + c^2``. At ``c = 0`` CAGrad is the average gradient
either way.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mgda_jax._src import engine
from mgda_jax._src.core import checks
from mgda_jax._src.core import results
from mgda_jax._src.core import dtypes


class CAGradInfo(NamedTuple):
  """Diagnostics of the CAGrad dual solve.

  Attributes:
    num_steps: projected-gradient steps taken.
    gap: the final Frank-Wolfe gap of the dual, in units of the largest
      squared gradient norm.
    converged: ``gap <= tol (|<g_w, g_0>| + r ||g_w||)`` (relative to the
      size of the dual objective's terms, in the same units).
    dual_weights: the dual solution ``w`` (on the simplex).
    result: a :class:`mgda_jax.SolverResult` code.
  """

  num_steps: jax.Array
  gap: jax.Array
  converged: jax.Array
  dual_weights: jax.Array
  result: jax.Array


def default_cagrad_tol(dtype) -> float:
  """Duality-gap tolerance (relative): ``1e-5`` (f32), ``1e-10`` (f64)."""
  return 1e-10 if jnp.dtype(dtype) == jnp.float64 else 1e-5


def cagrad_weights(gram: jax.Array, c, *, rescale: bool = True,
                   max_steps: int = 1000,
                   tol: float | None = None) -> tuple[jax.Array, CAGradInfo]:
  """CAGrad's task weights (``d = sum_t weights_t g_t``) from the Gram matrix.

  Args:
    gram: ``(K, K)`` Gram matrix of the task gradients.
    c: the radius factor (``c >= 0``; the paper's ``c``, 0.4 or 0.5 in its
      experiments).
    rescale: divide the update by ``1 + c^2`` (the reference default).
    max_steps: projected-gradient step cap.
    tol: duality-gap tolerance (default :func:`default_cagrad_tol`).

  Returns:
    ``(weights, info)``.
  """
  dtype = dtypes.solve_dtype(gram.dtype)
  gram = gram.astype(dtype)
  k = gram.shape[0]
  tol = default_cagrad_tol(dtype) if tol is None else tol
  finite = jnp.all(jnp.isfinite(gram))
  scale = jnp.max(jnp.diagonal(gram))
  scale = jnp.where(finite & (scale > 0), scale, 1.0)
  g = jnp.where(finite, gram / scale, 0.0)
  b = jnp.mean(g, axis=1)                        # G 1 / K
  r = c * jnp.sqrt(jnp.maximum(jnp.mean(g), 0.0))  # c ||g_0||
  smooth = jnp.finfo(dtype).eps ** 2

  def norm_w(w):
    return jnp.sqrt(jnp.maximum(w @ g @ w, 0.0) + smooth)

  def objective(w):
    return w @ b + r * norm_w(w)

  def gradient(w):
    return b + r * (g @ w) / norm_w(w)

  def gap_of(w, grad):
    return grad @ w - jnp.min(grad)

  def threshold(w):
    # Relative to the size of F's terms at w (not to the largest squared
    # norm: with norms spread, the optimum lives at the short gradients'
    # scale), plus the rounding level of the gap itself, whose terms are
    # w_t |grad F(w)_t| (small where the long gradients carry no weight).
    size = jnp.abs(w @ b) + r * norm_w(w)
    return tol * size + 16 * jnp.finfo(dtype).eps * (w @ jnp.abs(gradient(w)))

  def cond(state):
    w, _, it, gap = state
    return (it < max_steps) & (gap > threshold(w))

  def body(state):
    w, t, it, _ = state
    grad = gradient(w)
    f = objective(w)

    def ls_cond(ls):
      _, n, ok, _ = ls
      return (~ok) & (n < 60)

    def ls_body(ls):
      t, n, _, _ = ls
      w_new = optax.projections.projection_simplex(w - t * grad).astype(
          dtype)
      step = w_new - w
      ok = objective(w_new) <= f + grad @ step + (step @ step) / (2 * t)
      return jnp.where(ok, t, t / 2), n + 1, ok, w_new

    t, _, _, w_new = jax.lax.while_loop(
        ls_cond, ls_body, (t, 0, jnp.array(False), w))
    grad_new = gradient(w_new)
    return w_new, 2 * t, it + 1, gap_of(w_new, grad_new)

  w0 = jnp.full((k,), 1.0 / k, dtype)
  state = (w0, jnp.asarray(1.0, dtype), jnp.zeros((), jnp.int32),
           gap_of(w0, gradient(w0)))
  w, _, steps, gap = jax.lax.while_loop(cond, body, state)
  weights = 1.0 / k + (r / norm_w(w)) * w
  if rescale:
    weights = weights / (1.0 + c ** 2)
  weights = jnp.where(finite, weights, jnp.nan)
  converged = finite & (gap <= threshold(w))
  return weights, CAGradInfo(jnp.asarray(steps, jnp.int32), gap, converged,
                             w, results.result_code(converged, finite))


def cagrad(num_tasks: int, *, c: float = 0.4, rescale: bool = True,
           max_steps: int = 1000, tol: float = 1e-5,
           shared=None,
    axis_name=None) -> optax.GradientTransformationExtraArgs:
  """CAGrad as an optax transform (see the module docstring).

  Args:
    num_tasks: ``K`` (static).
    c: the radius factor, ``c >= 0`` (``inject_hyperparams``-able). ``c = 0``
      gives the average gradient.
    rescale: divide the update by ``1 + c^2`` (static).
    max_steps: the dual solver's step cap.
    tol: the dual solver's relative gap tolerance (``1e-10`` suits float64).
    shared: which per-task-gradient leaves are shared (see
      :func:`mgda_jax.mgda`).
    axis_name: the data-parallel axis for an untyped ``jax.shard_map`` or
      ``jax.pmap`` (see the README's "Several devices").

  Returns:
    A ``GradientTransformationExtraArgs`` with state
    :class:`mgda_jax.MethodState` (``info`` is the dual solve's).

  References:
    Liu, Liu, Jin, Stone & Liu, *Conflict-Averse Gradient Descent for
    Multi-task Learning*, NeurIPS 2021, https://arxiv.org/abs/2110.14048
  """
  num_tasks = checks.check_num_tasks(num_tasks, 'cagrad')
  checks.check_scalar('cagrad', 'c', c, low=0.0)
  checks.check_scalar('cagrad', 'max_steps', max_steps, low=1, integer=True)
  checks.check_scalar('cagrad', 'tol', tol, low=0.0)

  def weight_fn(gram, inner, losses):
    del losses
    weights, info = cagrad_weights(gram, c, rescale=rescale,
                                   max_steps=max_steps, tol=tol)
    return weights, inner, results.SolveInfo(info.num_steps, info.gap,
                                             info.converged, info.result)

  return engine.gram_method('cagrad', num_tasks, weight_fn, lambda dtype: (),
                            shared=shared, axis_name=axis_name)
