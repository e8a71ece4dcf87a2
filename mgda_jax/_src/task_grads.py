"""Per-task gradients w.r.t. the parameters, for full MGDA."""

from typing import Any, Callable

import jax
import jax.numpy as jnp


def per_task_grads(loss_fn: Callable[..., Any], params, *args,
                   has_aux: bool = False):
  """Task losses and their gradients, stacked on a leading task axis.

  One forward pass and ``K`` backward passes (the VJP ``vmap``-ed over one-hot
  cotangents, i.e. a reverse-mode Jacobian): the input of :func:`mgda_jax.mgda`
  and of other gradient aggregators. This costs ``K`` backward passes through
  the whole network; :func:`mgda_jax.representation_grads` (MGDA-UB) needs one
  through the encoder.

  Args:
    loss_fn: ``loss_fn(params, *args) -> losses`` of shape ``(K,)``, or
      ``(losses, aux)`` with ``has_aux``.
    params: the parameters, any pytree.
    *args: further arguments of ``loss_fn`` (batch, PRNG key, ...).
    has_aux: whether ``loss_fn`` returns ``(losses, aux)``.

  Returns:
    ``(losses, grads)`` or ``((losses, aux), grads)``; ``grads`` is shaped like
    ``params`` with a leading axis of size ``K`` on every leaf.

  Raises:
    ValueError: if the losses are not a vector of at least one task.

  Example:
    >>> import jax.numpy as jnp
    >>> import mgda_jax
    >>> losses, grads = mgda_jax.per_task_grads(
    ...     lambda w: jnp.stack([jnp.sum(w ** 2), -w[0]]), jnp.array([-1., 1.]))
    >>> grads  # the paper's 2-D example: (-2, 2) and (-1, 0)
    Array([[-2.,  2.],
           [-1.,  0.]], dtype=float32)
  """
  if has_aux:
    losses, vjp, aux = jax.vjp(lambda p: loss_fn(p, *args), params,
                               has_aux=True)
  else:
    losses, vjp = jax.vjp(lambda p: loss_fn(p, *args), params)
  if jnp.ndim(losses) != 1 or jnp.shape(losses)[0] == 0:
    raise ValueError('loss_fn must return a vector of K >= 1 task losses; got '
                     f'shape {jnp.shape(losses)}.')
  # + zeros_like: the cotangents take the losses' type, including varying
  # manual axes inside jax.shard_map.
  eye = jnp.eye(jnp.shape(losses)[0], dtype=losses.dtype) + jnp.zeros_like(
      losses)
  grads = jax.vmap(lambda e: vjp(e)[0])(eye)
  return ((losses, aux), grads) if has_aux else (losses, grads)
