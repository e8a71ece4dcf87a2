"""The two inputs every method takes: representation or parameter gradients.

* :func:`representation_grads` (MGDA-UB's input): one forward pass, the
  per-task gradients w.r.t. the shared representation ``Z`` (the full ``[K,
  B, ...]`` tensor), and the encoder's VJP, as a
  :class:`RepresentationGrads`.
* :func:`per_task_grads` (MGDA's input): the per-task gradients w.r.t. all
  the parameters, a pytree shaped like the parameters whose leaves have a
  leading task axis ``K``.

For an encoder ``Z = g(X; theta_sh)`` and task heads ``L_t(Z; theta_t)``, the
chain rule bounds the MGDA objective (Sener & Koltun 2018, Eq. 5-6):

.. math::

  \\Big\\|\\sum_t \\alpha_t \\nabla_{\\theta_{sh}} L_t\\Big\\|^2
  \\le \\Big\\|\\frac{\\partial Z}{\\partial \\theta_{sh}}\\Big\\|^2
  \\Big\\|\\sum_t \\alpha_t \\nabla_Z L_t\\Big\\|^2 ,

so a method may act on ``nabla_Z L_t`` and pull the combined cotangent back
through the encoder once.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp


class RepresentationGrads(NamedTuple):
  """Gradients at the shared representation, and how to pull them back.

  A pytree (the pullbacks are ``jax.tree_util.Partial`` objects over VJPs),
  so it can cross ``jax.jit`` boundaries.

  Attributes:
    rep_grads: per-task gradients w.r.t. the representation ``Z``: a pytree
      shaped like ``Z`` whose leaves have a leading task axis, ``[K, B, ...]``.
    pullback: maps a cotangent shaped like ``Z`` to gradients shaped like the
      parameters (the encoder's VJP; zero for parameters it does not use).
    head_grads: gradients shaped like the parameters of ``sum_t L_t`` through
      the heads only, i.e. each task-specific parameter's own task gradient
      (zero for parameters the heads do not use).
    heads_pullback: maps loss weights ``w`` (shape ``(K,)``) to ``(sum_t w_t
      dL_t/dZ, sum_t w_t dL_t/dtheta_heads)``: the heads' VJP, for methods
      that weight the losses (see :meth:`weighted_grads`).

  Inside one ``jax.jit`` program, whatever a transform does not read (e.g.
  ``rep_grads`` for a pure loss weighting) is never computed.
  """

  rep_grads: Any
  pullback: Callable[[Any], Any]
  head_grads: Any
  heads_pullback: Callable[[Any], Any]

  def weighted_grads(self, weights):
    """Gradient of ``sum_t weights[t] * L_t`` w.r.t. all the parameters.

    One backward pass through the heads and one through the encoder.
    """
    z_cotangent, head_grads = self.heads_pullback(weights)
    return jax.tree.map(jnp.add, self.pullback(z_cotangent), head_grads)


def _first(vjp_fn, cotangent):
  return vjp_fn(cotangent)[0]


def _heads_pullback_shared(heads_vjp, template, weights):
  # + template: the cotangent takes the losses' type (dtype, and the
  # varying mesh axes inside a typed jax.shard_map) whatever the weights'.
  return heads_vjp(jnp.asarray(weights).astype(template.dtype) + template)


def _heads_pullback_per_task(heads_vjp, template, weights):
  z_copies, head_grads = heads_vjp(
      jnp.asarray(weights).astype(template.dtype) + template)
  return jax.tree.map(lambda c: jnp.sum(c, axis=0), z_copies), head_grads


def _heads_pullback_tuple(heads_vjp, template, weights):
  copies, head_grads = heads_vjp(
      jnp.asarray(weights).astype(template.dtype) + template)
  return jax.tree.map(lambda *c: sum(c[1:], c[0]), *copies), head_grads


Z_COPIES = ('stacked', 'tuple')


def check_losses_output(losses, fn_name: str, has_aux: bool):
  """A clear error unless ``losses`` is a ``(K,)`` floating array, K >= 1."""
  hint_aux = (' If it returns (losses, aux), pass has_aux=True.'
              if not has_aux else '')
  if isinstance(losses, dict):
    raise ValueError(
        f'{fn_name} must return a (K,) array of task losses; got a dict with '
        f'keys {list(losses)}. Stack them in a fixed task order, e.g. '
        'jnp.stack([losses[t] for t in tasks]).')
  if isinstance(losses, (list, tuple)):
    raise ValueError(
        f'{fn_name} must return a (K,) array of task losses; got a '
        f'{type(losses).__name__} of length {len(losses)}. Stack a list of '
        f'scalar losses with jnp.stack(...).{hint_aux}')
  if not hasattr(losses, 'shape') or not hasattr(losses, 'dtype'):
    raise ValueError(f'{fn_name} must return a (K,) array of task losses; '
                     f'got {type(losses).__name__}.')
  if jnp.ndim(losses) != 1 or jnp.shape(losses)[0] == 0:
    raise ValueError(f'{fn_name} must return a vector of K >= 1 task losses; '
                     f'got shape {jnp.shape(losses)}.{hint_aux}')
  if not jnp.issubdtype(losses.dtype, jnp.floating):
    raise ValueError(f'{fn_name} must return floating losses; got dtype '
                     f'{losses.dtype}.')


def representation_grads(encoder_fn: Callable[..., Any],
                         heads_fn: Callable[..., Any], params, *args,
                         has_aux: bool = False,
                         encoder_has_aux: bool = False,
                         per_task_z: int | None = None,
                         z_copies: str = 'stacked'):
  """One forward pass, per-task gradients at ``Z``, and the encoder's VJP.

  Args:
    encoder_fn: ``encoder_fn(params, *args) -> Z`` (any pytree of arrays),
      or ``(Z, aux)`` with ``encoder_has_aux`` (e.g. updated BatchNorm
      statistics, which must be updated once per step: the encoder runs
      once). It should read only the shared parameters.
    heads_fn: ``heads_fn(params, Z, *args) -> losses`` with ``losses`` of
      shape ``(K,)`` (or ``(losses, aux)`` with ``has_aux``). It should read
      only task-specific parameters; any parameter it reads gets the
      unweighted sum of the task gradients.
    params: the parameters (any pytree), passed whole to both functions.
    *args: the batch, PRNG keys, ... passed to both functions.
    has_aux: whether ``heads_fn`` returns ``(losses, aux)``.
    encoder_has_aux: whether ``encoder_fn`` returns ``(Z, aux)``.
    per_task_z: ``K``, to call ``heads_fn`` with ``Z`` replicated on a
      leading task axis (every leaf ``(K, *leaf.shape)``), head ``t`` reading
      only its own copy ``[t]``. Then a single backward pass of ``sum_t L_t``
      through the heads yields every ``dL_t/dZ`` at once. With ``None`` (the
      default, which needs no cooperation from ``heads_fn``) the heads' VJP
      is ``vmap``-ed over ``K`` one-hot cotangents: ``K^2`` head backward
      passes, which dominates the step for many small heads (e.g. 40; see
      ``BENCHMARKS.md``). A head that reads another task's copy makes the
      result wrong, silently.
    z_copies: how ``heads_fn`` receives the copies under ``per_task_z``.
      ``'stacked'`` (the default): every leaf ``(K, *leaf.shape)``, for
      heads ``vmap``-ed over the task axis, which read all copies in one
      batched op. ``'tuple'``: a tuple of ``K`` pytrees shaped like ``Z``,
      head ``t`` reading ``z[t]``, for heads written as a loop over tasks
      (e.g. :mod:`mgda_jax.nn`). A loop's ``K`` reads ``l[t]`` of a stacked
      leaf transpose to ``K`` zero-padded ``(K, ...)`` cotangents, ``K^2``
      times the size of ``Z`` in memory traffic (6x a summed-loss backward
      at ``K = 10``, ``BENCHMARKS.md``); a tuple's reads transpose to the
      ``K`` cotangents themselves.

  Returns:
    ``(losses, grads)`` where ``grads`` is a :class:`RepresentationGrads`;
    with ``has_aux`` the first element is ``(losses, aux)``; with
    ``encoder_has_aux`` the result is ``(losses_or_pair, grads, encoder_aux)``.

  Raises:
    ValueError: if the losses are not a ``(K,)`` floating array (a dict, a
      list, or a tuple without ``has_aux`` get a message saying what to do),
      if ``per_task_z`` is not their ``K``, for an unknown ``z_copies``, or
      for ``z_copies='tuple'`` without ``per_task_z``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import mgda_jax
    >>> params = {'enc': jnp.ones((3, 4)), 'heads': jnp.ones((2, 4))}
    >>> x = jnp.ones((5, 3))
    >>> encode = lambda p, x: jnp.tanh(x @ p['enc'])              # Z: (5, 4)
    >>> heads = lambda p, z, x: jnp.mean((z @ p['heads'].T) ** 2, axis=0)
    >>> losses, grads = mgda_jax.representation_grads(encode, heads, params, x)
    >>> losses.shape, grads.rep_grads.shape                      # (K,), (K, B, D)
    ((2,), (2, 5, 4))
  """
  if z_copies not in Z_COPIES:
    raise ValueError(f'z_copies must be one of {Z_COPIES}; got {z_copies!r}.')
  if z_copies != 'stacked' and per_task_z is None:
    raise ValueError(f"z_copies={z_copies!r} lays out the copies of "
                     'per_task_z, which is None (heads_fn would get Z itself)'
                     '; pass per_task_z=K too.')
  if encoder_has_aux:
    z, enc_vjp, enc_aux = jax.vjp(lambda p: encoder_fn(p, *args), params,
                                  has_aux=True)
  else:
    z, enc_vjp = jax.vjp(lambda p: encoder_fn(p, *args), params)

  if per_task_z is not None and z_copies == 'tuple':
    z_arg = (z,) * per_task_z
  elif per_task_z is not None:
    z_arg = jax.tree.map(
        lambda l: jnp.broadcast_to(l, (per_task_z,) + jnp.shape(l)), z)
  else:
    z_arg = z

  def heads(z, p):
    return heads_fn(p, z, *args)

  if has_aux:
    losses, heads_vjp, aux = jax.vjp(heads, z_arg, params, has_aux=True)
  else:
    try:
      losses, heads_vjp = jax.vjp(heads, z_arg, params)
    except TypeError as e:
      raise ValueError(
          'heads_fn must return a (K,) array of task losses; jax.vjp could '
          f'not differentiate its output ({e}). If it returns (losses, '
          'aux), pass has_aux=True.') from e
  check_losses_output(losses, 'heads_fn', has_aux)
  k = jnp.shape(losses)[0]
  template = jnp.zeros_like(losses)
  ones = jnp.ones_like(losses)
  if per_task_z is not None:
    if per_task_z != k:
      raise ValueError(f'per_task_z={per_task_z} but heads_fn returned {k} '
                       'losses.')
    # One backward pass: the gradient w.r.t. copy t is dL_t/dZ.
    rep_grads, head_grads = heads_vjp(ones)
    if z_copies == 'tuple':
      rep_grads = jax.tree.map(lambda *c: jnp.stack(c), *rep_grads)
  else:
    # K backward passes through the heads, one per task.
    eye = jnp.eye(k, dtype=losses.dtype) + template
    rep_grads = jax.vmap(lambda e: heads_vjp(e)[0])(eye)
    head_grads = heads_vjp(ones)[1]
  grads = RepresentationGrads(
      rep_grads=rep_grads,
      pullback=jax.tree_util.Partial(_first, enc_vjp),
      head_grads=head_grads,
      heads_pullback=jax.tree_util.Partial(
          _heads_pullback_shared if per_task_z is None
          else _heads_pullback_tuple if z_copies == 'tuple'
          else _heads_pullback_per_task, heads_vjp, template))
  first = (losses, aux) if has_aux else losses
  if encoder_has_aux:
    return first, grads, enc_aux
  return first, grads


def per_task_grads(loss_fn: Callable[..., Any], params, *args,
                   has_aux: bool = False):
  """Task losses and their gradients, stacked on a leading task axis.

  One forward pass and ``K`` backward passes (the VJP ``vmap``-ed over one-hot
  cotangents, i.e. a reverse-mode Jacobian): the input of :func:`mgda_jax.mgda`
  and of every other method. This costs ``K`` backward passes through the
  whole network; :func:`mgda_jax.representation_grads` (MGDA-UB) needs one
  through the encoder.

  Args:
    loss_fn: ``loss_fn(params, *args) -> losses`` of shape ``(K,)``, or
      ``(losses, aux)`` with ``has_aux`` (e.g. updated BatchNorm statistics).
    params: the parameters, any pytree.
    *args: further arguments of ``loss_fn`` (batch, PRNG key, ...).
    has_aux: whether ``loss_fn`` returns ``(losses, aux)``.

  Returns:
    ``(losses, grads)`` or ``((losses, aux), grads)``; ``grads`` is shaped like
    ``params`` with a leading axis of size ``K`` on every leaf.

  Raises:
    ValueError: if the losses are not a ``(K,)`` floating array.

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
    try:
      losses, vjp = jax.vjp(lambda p: loss_fn(p, *args), params)
    except TypeError as e:
      raise ValueError(
          'loss_fn must return a (K,) array of task losses; jax.vjp could '
          f'not differentiate its output ({e}). If it returns (losses, '
          'aux), pass has_aux=True.') from e
  check_losses_output(losses, 'loss_fn', has_aux)
  # + zeros_like: the cotangents take the losses' type, including varying
  # manual axes inside jax.shard_map.
  eye = jnp.eye(jnp.shape(losses)[0], dtype=losses.dtype) + jnp.zeros_like(
      losses)
  grads = jax.vmap(lambda e: vjp(e)[0])(eye)
  return ((losses, aux), grads) if has_aux else (losses, grads)
