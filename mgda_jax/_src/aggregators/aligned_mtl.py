"""Aligned-MTL: align the task gradients by a condition-number-one transform.

Senushkin et al. (2023) replace the task gradients ``J = [g_1 ... g_K]`` by
``J B``, where ``B`` makes the Gram matrix of the new gradients a multiple
of the identity on the span of the old ones: with ``G = V Lambda V^T``
(positive eigenvalues only),

.. math::

  B = \\sqrt{\\lambda_{min}} \\, V \\Lambda^{-1/2} V^\\top ,
  \\qquad B^\\top G B = \\lambda_{min} \\, V V^\\top ,

so the aligned gradients are orthogonal, with the common norm
``sqrt(lambda_min)`` (the smallest non-zero singular value of ``J``): the
linear system has condition number 1. The update is ``J B w`` for task
preferences ``w`` (default all ones, as in LibMTL and the authors' code),
i.e. weights ``alpha = B w`` on the original gradients. TorchJD's
``AlignedMTL`` uses ``w = 1/K`` by default, so its update is this one
divided by ``K``; pass ``preferences=jnp.full(K, 1 / K)`` to match it. Eigenvalues below ``K eps max(eig)`` count
as zero (the rank cutoff of the reference code). ``B`` does not depend on the
scale of ``G``.
"""

import jax
import jax.numpy as jnp
import optax

from mgda_jax._src import engine
from mgda_jax._src.core import checks
from mgda_jax._src.core import results
from mgda_jax._src.core import dtypes


def aligned_mtl_matrix(gram: jax.Array) -> jax.Array:
  """The ``(K, K)`` alignment matrix ``B`` (see the module docstring)."""
  dtype = dtypes.solve_dtype(gram.dtype)
  gram = gram.astype(dtype)
  k = gram.shape[0]
  scale = jnp.max(jnp.diagonal(gram))
  g = gram / jnp.where(scale > 0, scale, 1.0)
  lam, vecs = jnp.linalg.eigh(g)
  cutoff = jnp.max(lam) * k * jnp.finfo(dtype).eps
  pos = lam > jnp.maximum(cutoff, 0.0)
  lam_min = jnp.min(jnp.where(pos, lam, jnp.inf))
  lam_min = jnp.where(jnp.any(pos), lam_min, 0.0)
  inv_sqrt = jnp.where(pos, jax.lax.rsqrt(jnp.where(pos, lam, 1.0)), 0.0)
  return jnp.sqrt(lam_min) * (vecs * inv_sqrt) @ vecs.T


def aligned_mtl_weights(gram: jax.Array, preferences=None) -> jax.Array:
  """Aligned-MTL's weights ``B w`` on the original task gradients."""
  b = aligned_mtl_matrix(gram)
  w = jnp.ones((gram.shape[0],), b.dtype) if preferences is None else (
      jnp.asarray(preferences, b.dtype))
  return b @ w


def aligned_mtl(num_tasks: int, *, preferences=None,
                shared=None,
    axis_name=None) -> optax.GradientTransformationExtraArgs:
  """Aligned-MTL as an optax transform.

  Args:
    num_tasks: ``K`` (static).
    preferences: the task preferences ``w`` (default ones: ``K`` times
      TorchJD's default scale, see the module docstring).
    shared: which per-task-gradient leaves are shared (see
      :func:`mgda_jax.mgda`).
    axis_name: the data-parallel axis for an untyped ``jax.shard_map`` or
      ``jax.pmap`` (see the README's "Several devices").

  Returns:
    A ``GradientTransformationExtraArgs`` with state
    :class:`MethodState` (``inner`` is ``()``).

  References:
    Senushkin, Patakin, Kuznetsov & Konushin, *Independent Component
    Alignment for Multi-Task Learning*, CVPR 2023,
    https://arxiv.org/abs/2305.19000
  """
  num_tasks = checks.check_num_tasks(num_tasks, 'aligned_mtl')
  return engine.gram_method(
      'aligned_mtl', num_tasks,
      lambda gram, inner, losses: (aligned_mtl_weights(gram, preferences),
                                   inner),
      lambda dtype: (), shared=shared, axis_name=axis_name)
