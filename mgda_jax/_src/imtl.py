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

with ``G^+`` the pseudo-inverse (eigenvalues below ``10 K eps max(eig)``
are dropped). It is computed as ``N^-1 C^+ 1`` with ``N = diag(n)`` and the
cosine matrix ``C = N^-1 G N^-1`` (the same thing for invertible ``G``, and
well conditioned when the gradient norms differ by orders of magnitude). This is symmetric in the tasks and defined for singular ``G``: a
task with a zero gradient (``n_t = 0``, a zero row of ``G``) gets weight 0,
and identical gradients get equal weights. Where ``G`` is singular the
conditions may have no exact solution, and ``alpha`` is their least-squares
solution. ``1^T G^+ n = 0`` (no impartial direction exists) gives zero
weights.
"""

import jax
import jax.numpy as jnp
import optax

from mgda_jax._src import aggregation
from mgda_jax._src import dtypes
from mgda_jax._src import mgda as mgda_lib


def pinv_psd(gram: jax.Array) -> jax.Array:
  """Pseudo-inverse of a PSD matrix, by ``eigh`` with a relative cutoff."""
  lam, vecs = jnp.linalg.eigh(gram)
  k = gram.shape[0]
  cutoff = jnp.max(lam) * k * jnp.finfo(gram.dtype).eps * 10
  inv = jnp.where(lam > cutoff, 1.0 / jnp.where(lam > cutoff, lam, 1.0), 0.0)
  return (vecs * inv) @ vecs.T


def imtl_g_weights(gram: jax.Array) -> jax.Array:
  """IMTL-G's ``alpha`` (summing to 1) from the Gram matrix."""
  dtype = dtypes.solve_dtype(gram.dtype)
  gram = gram.astype(dtype)
  # With N = diag(n), G alpha = lambda n reads C (N alpha) = lambda 1 for
  # the cosine matrix C = N^-1 G N^-1, which is far better conditioned than
  # G when the gradient norms differ by orders of magnitude.
  n = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
  inv_n = jnp.where(n > 0, 1.0 / jnp.where(n > 0, n, 1.0), 0.0)
  cos = gram * inv_n[:, None] * inv_n[None, :]
  v = inv_n * (pinv_psd(cos) @ (n > 0).astype(dtype))
  total = jnp.sum(v)
  ok = jnp.abs(total) > jnp.finfo(dtype).eps * jnp.sum(jnp.abs(v))
  return jnp.where(ok, v / jnp.where(ok, total, 1.0), 0.0)


def imtl_g(num_tasks: int, *, shared=None) -> optax.GradientTransformationExtraArgs:
  """IMTL-G as an optax transform: equal projections on every unit gradient.

  Args:
    num_tasks: ``K`` (static).
    shared: which per-task-gradient leaves are shared.

  Returns:
    A ``GradientTransformationExtraArgs`` with state
    :class:`GradientMethodState` (``inner`` is ``()``).

  References:
    Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, *Towards Impartial
    Multi-task Learning*, ICLR 2021, https://openreview.net/forum?id=IMPnRXEWpvr
  """
  num_tasks = mgda_lib.check_num_tasks(num_tasks, 'imtl_g')
  return aggregation.gram_method(
      'imtl_g', num_tasks, lambda gram, inner, losses: (imtl_g_weights(gram),
                                                        inner),
      lambda dtype: (), shared=shared)
