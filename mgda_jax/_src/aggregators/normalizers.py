"""Gradient normalisers of Sener & Koltun's code, applied to a Gram matrix.

Before the min-norm solve, the paper's code may divide each task gradient
``g_t`` by a normaliser ``n_t``:

=========  ==========================================  ==================
name       ``n_t``                                     needs
=========  ==========================================  ==================
``none``   ``1``                                       nothing
``l2``     ``||g_t||``                                 the gradients
``loss``   ``L_t``                                     the losses
``loss+``  ``L_t ||g_t||``                             both
=========  ==========================================  ==================

Dividing the gradients by ``n`` divides the Gram matrix entrywise by
``n n^T``, so normalisation is applied to ``G`` directly. The solve then gives
weights ``alpha`` for the *normalised* gradients, and, exactly as in the
paper's code, those ``alpha`` multiply the **raw** (un-normalised) gradients
and losses: the update is ``sum_t alpha_t g_t``, not ``sum_t alpha_t g_t /
n_t``. (The normaliser thus changes which trade-off is chosen, and the scale
of each task's contribution, without rescaling the update afterwards.)

A normaliser that is zero or negative (a zero gradient under ``l2``, a zero
or negative loss under ``loss``) cannot normalise anything; it is replaced by
1, so that task's gradient enters unchanged. The losses are expected to be
positive, as negative log-likelihoods are. A non-finite normaliser propagates
into the Gram matrix and is reported by the solver as non-finite.

References:
  Sener & Koltun, *Multi-Task Learning as Multi-Objective Optimization*,
  NeurIPS 2018, https://arxiv.org/abs/1810.04650, and its public code
  (``gradient_normalizers`` in ``min_norm_solvers.py``).
"""

import jax
import jax.numpy as jnp

NORMALIZERS = ('none', 'l2', 'loss', 'loss+')


def check_normalizer(normalizer: str) -> None:
  """Raises ValueError for an unknown normaliser name."""
  if normalizer not in NORMALIZERS:
    raise ValueError(f'Unknown normalizer {normalizer!r}; expected one of '
                     f'{NORMALIZERS}.')


def needs_losses(normalizer: str) -> bool:
  """Whether ``normalizer`` reads the task losses."""
  check_normalizer(normalizer)
  return normalizer in ('loss', 'loss+')


def gradient_normalizers(gram: jax.Array, normalizer: str,
                         losses: jax.Array | None = None) -> jax.Array:
  """The per-task normalisers ``n`` (shape ``(K,)``) for a Gram matrix.

  Args:
    gram: the ``(K, K)`` Gram matrix of the raw task gradients.
    normalizer: ``'none'``, ``'l2'``, ``'loss'`` or ``'loss+'``.
    losses: the ``K`` task losses; required by ``'loss'`` and ``'loss+'``.

  Returns:
    ``n``, with zero or negative entries replaced by 1.

  Raises:
    ValueError: for an unknown normaliser, missing losses, or losses whose
      shape is not ``(K,)``.
  """
  check_normalizer(normalizer)
  k = gram.shape[0]
  dtype = gram.dtype
  if normalizer == 'none':
    return jnp.ones((k,), dtype)
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
  if normalizer == 'l2':
    n = norms
  else:
    if losses is None:
      raise ValueError(
          f"normalizer {normalizer!r} needs the task losses: pass "
          "losses=<array of shape (K,)> as an extra argument to update.")
    losses = jnp.asarray(losses)
    if losses.shape != (k,):
      raise ValueError(f'losses must have shape ({k},) to match {k} tasks; '
                       f'got {losses.shape}.')
    losses = losses.astype(dtype)
    n = losses if normalizer == 'loss' else losses * norms
  return jnp.where(n > 0, n, jnp.where(jnp.isnan(n), n, 1.0))


def normalize_gram(gram: jax.Array, n: jax.Array) -> jax.Array:
  """``G / (n n^T)``: the Gram matrix of the gradients ``g_t / n_t``."""
  return gram / (n[:, None] * n[None, :])
