"""IMTL-G: impartial multi-task learning, gradient part (Liu et al. 2021).

IMTL-G finds the combination ``g = sum_t alpha_t g_t`` with ``sum_t alpha_t =
1`` whose projections onto the unit task gradients ``u_t = g_t / ||g_t||`` are
all equal, ``<g, u_t> = lambda`` for every ``t``: no task is favoured.

The paper solves it as a ``(K-1)``-dimensional linear system in the
differences ``g_1 - g_t`` and ``u_1 - u_t``. In Gram form the same conditions
read ``G alpha = lambda n`` with ``n_t = ||g_t|| = sqrt(G_tt)`` (since
``<g, g_t> = (G alpha)_t`` and ``<g, u_t> = (G alpha)_t / n_t``), so

.. math::

  \\alpha = \\frac{G^{+} n}{\\mathbf 1^\\top G^{+} n} ,

with ``G^+`` the pseudo-inverse. Two ways of computing it, selected per
problem:

* where ``G`` has full rank, ``G^-1 n = N^-1 C^-1 1`` with ``N = diag(n)``
  and the cosine matrix ``C = N^-1 G N^-1``: exactly the formula, and well
  conditioned when the gradient norms differ by orders of magnitude;
* where it is rank-deficient (fewer independent gradients than tasks), the
  formula itself, ``G^+ n`` by ``eigh`` with eigenvalues below ``10 K eps
  max(eig)`` dropped. (Applying the pseudo-inverse to ``C`` instead, as
  before version 0.2, is a different answer there: for ``J = [[1, 0], [0,
  1], [1, 1]]`` it gave ``d = (2/3, 2/3)``, the formula and TorchJD ``(3/4,
  3/4)``.)

A task with a zero gradient (``n_t = 0``) gets weight 0. Where ``G`` is
singular the conditions may have no exact solution, and ``alpha`` is the
least-squares one. ``1^T G^+ n = 0`` (no impartial direction exists) gives
zero weights.
"""

import jax
import jax.numpy as jnp
import optax

from mgda_jax._src import engine
from mgda_jax._src.core import checks
from mgda_jax._src.core import results
from mgda_jax._src.core import dtypes


def pinv_psd(gram: jax.Array) -> jax.Array:
  """Pseudo-inverse of a PSD matrix, by ``eigh`` with a relative cutoff."""
  lam, vecs = jnp.linalg.eigh(gram)
  k = gram.shape[0]
  cutoff = jnp.max(lam) * k * jnp.finfo(gram.dtype).eps * 10
  inv = jnp.where(lam > cutoff, 1.0 / jnp.where(lam > cutoff, lam, 1.0), 0.0)
  return (vecs * inv) @ vecs.T


def imtl_g_weights(gram: jax.Array) -> jax.Array:
  """IMTL-G's ``alpha = G^+ n / 1^T G^+ n`` (summing to 1) from the Gram."""
  dtype = dtypes.solve_dtype(gram.dtype)
  gram = gram.astype(dtype)
  k = gram.shape[0]
  eps = jnp.finfo(dtype).eps
  n = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
  live = n > 0
  inv_n = jnp.where(live, 1.0 / jnp.where(live, n, 1.0), 0.0)
  # Full rank: G^-1 n = N^-1 C^-1 1 on the cosine matrix (zero-gradient
  # tasks get a unit diagonal there and weight 0).
  cos = gram * inv_n[:, None] * inv_n[None, :] + jnp.diag(
      jnp.where(live, 0.0, 1.0))
  lam_c = jnp.linalg.eigvalsh(cos)
  full_rank = jnp.min(lam_c) > 10 * k * eps * jnp.max(lam_c)
  v_full = inv_n * jnp.linalg.solve(
      jnp.where(full_rank, cos, jnp.eye(k, dtype=dtype)), live.astype(dtype))
  # Rank-deficient: the formula, G^+ n, on G scaled to a unit max diagonal.
  scale = jnp.max(n) ** 2
  scale = jnp.where(scale > 0, scale, 1.0)
  v_pinv = pinv_psd(gram / scale) @ (n / jnp.sqrt(scale))
  v = jnp.where(full_rank, v_full, v_pinv)
  total = jnp.sum(v)
  ok = jnp.abs(total) > eps * jnp.sum(jnp.abs(v))
  return jnp.where(ok, v / jnp.where(ok, total, 1.0), 0.0)


def imtl_g(num_tasks: int, *, shared=None,
    axis_name=None) -> optax.GradientTransformationExtraArgs:
  """IMTL-G as an optax transform: equal projections on every unit gradient.

  Args:
    num_tasks: ``K`` (static).
    shared: which per-task-gradient leaves are shared (see
      :func:`mgda_jax.mgda`).
    axis_name: the data-parallel axis for an untyped ``jax.shard_map`` or
      ``jax.pmap`` (see the README's "Several devices").

  Returns:
    A ``GradientTransformationExtraArgs`` with state
    :class:`MethodState` (``inner`` is ``()``).

  References:
    Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, *Towards Impartial
    Multi-task Learning*, ICLR 2021, https://openreview.net/forum?id=IMPnRXEWpvr
  """
  num_tasks = checks.check_num_tasks(num_tasks, 'imtl_g')
  return engine.gram_method(
      'imtl_g', num_tasks, lambda gram, inner, losses: (imtl_g_weights(gram),
                                                        inner),
      lambda dtype: (), shared=shared, axis_name=axis_name)
