"""MGDA-UB: MGDA on gradients w.r.t. the shared representation.

For an encoder ``Z = g(X; theta_sh)`` and task heads ``L_t(Z; theta_t)``, the
chain rule bounds the MGDA objective (Sener & Koltun 2018, Eq. 5-6):

.. math::

  \\Big\\|\\sum_t \\alpha_t \\nabla_{\\theta_{sh}} L_t\\Big\\|^2
  \\le \\Big\\|\\frac{\\partial Z}{\\partial \\theta_{sh}}\\Big\\|^2
  \\Big\\|\\sum_t \\alpha_t \\nabla_Z L_t\\Big\\|^2 ,

so MGDA-UB solves the min-norm problem on ``nabla_Z L_t`` (the full ``[B,
...]`` tensor per task, not its batch sum) and needs one backward pass through
the encoder: the combined cotangent ``sum_t alpha_t nabla_Z L_t`` is pulled
back once. Task heads get their own gradients, unscaled (Algorithm 2).

:func:`representation_grads` does the forward pass: ``jax.vjp`` at ``Z``,
the heads' VJP ``vmap``-ed over one-hot cotangents (cheap: heads only), and
keeps the encoder's VJP for :func:`mgda_ub` to apply.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mgda_jax._src import gram as gram_lib
from mgda_jax._src import mgda as mgda_lib


class RepresentationGrads(NamedTuple):
  """Input of :func:`mgda_ub`: everything needed after the forward pass.

  A pytree (the pullback is a ``jax.tree_util.Partial`` over the encoder's
  VJP), so it can cross ``jax.jit`` boundaries.

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


def _heads_pullback_shared(heads_vjp, weights):
  return heads_vjp(weights)


def _heads_pullback_per_task(heads_vjp, weights):
  z_copies, head_grads = heads_vjp(weights)
  return jax.tree.map(lambda c: jnp.sum(c, axis=0), z_copies), head_grads


def representation_grads(encoder_fn: Callable[..., Any],
                         heads_fn: Callable[..., Any], params, *args,
                         has_aux: bool = False,
                         per_task_z: int | None = None):
  """One forward pass, per-task gradients at ``Z``, and the encoder's VJP.

  Args:
    encoder_fn: ``encoder_fn(params, *args) -> Z`` (any pytree of arrays).
      It should read only the shared parameters.
    heads_fn: ``heads_fn(params, Z, *args) -> losses`` with ``losses`` of
      shape ``(K,)`` (or ``(losses, aux)`` with ``has_aux``). It should read
      only task-specific parameters; any parameter it reads gets the
      unweighted sum of the task gradients.
    params: the parameters (any pytree), passed whole to both functions.
    *args: the batch, PRNG keys, ... passed to both functions.
    has_aux: whether ``heads_fn`` returns ``(losses, aux)``.
    per_task_z: ``K``, to call ``heads_fn`` with ``Z`` replicated on a
      leading task axis (every leaf ``(K, *leaf.shape)``), head ``t`` reading
      only its own copy ``[t]``. Then a single backward pass of ``sum_t L_t``
      through the heads yields every ``dL_t/dZ`` at once (the gradient w.r.t.
      copy ``t`` is ``dL_t/dZ``). With ``None`` (the default, which needs no
      cooperation from ``heads_fn``) the heads' VJP is ``vmap``-ed over ``K``
      one-hot cotangents, and each of those ``K`` backward passes runs
      through all ``K`` heads: ``K^2`` head backward passes, which dominates
      the step for many small heads (e.g. 40; see ``BENCHMARKS.md``). A head
      that reads another task's copy makes the result wrong, silently.

  Returns:
    ``(losses, grads)``, or ``((losses, aux), grads)`` with ``has_aux``, where
    ``grads`` is a :class:`RepresentationGrads` for :func:`mgda_ub`.

  Raises:
    ValueError: if the losses are not a vector of at least one task.
  """
  z, enc_vjp = jax.vjp(lambda p: encoder_fn(p, *args), params)

  if per_task_z is not None:
    z_arg = jax.tree.map(
        lambda l: jnp.broadcast_to(l, (per_task_z,) + jnp.shape(l)), z)
  else:
    z_arg = z

  def heads(z, p):
    return heads_fn(p, z, *args)

  if has_aux:
    losses, heads_vjp, aux = jax.vjp(heads, z_arg, params, has_aux=True)
  else:
    losses, heads_vjp = jax.vjp(heads, z_arg, params)
  if jnp.ndim(losses) != 1 or jnp.shape(losses)[0] == 0:
    raise ValueError('heads_fn must return a vector of K >= 1 task losses; '
                     f'got shape {jnp.shape(losses)}.')
  k = jnp.shape(losses)[0]
  # *_like keeps the losses' type, including its varying manual axes inside
  # jax.shard_map, which a VJP cotangent must match.
  ones = jnp.ones_like(losses)
  if per_task_z is not None:
    if per_task_z != k:
      raise ValueError(f'per_task_z={per_task_z} but heads_fn returned {k} '
                       'losses.')
    # One backward pass: the gradient w.r.t. copy t is dL_t/dZ.
    rep_grads, head_grads = heads_vjp(ones)
  else:
    # K backward passes through the heads, one per task.
    eye = jnp.eye(k, dtype=losses.dtype) + jnp.zeros_like(losses)
    rep_grads = jax.vmap(lambda e: heads_vjp(e)[0])(eye)
    head_grads = heads_vjp(ones)[1]
  grads = RepresentationGrads(
      rep_grads=rep_grads,
      pullback=jax.tree_util.Partial(_first, enc_vjp),
      head_grads=head_grads,
      heads_pullback=jax.tree_util.Partial(
          _heads_pullback_shared if per_task_z is None
          else _heads_pullback_per_task, heads_vjp))
  return ((losses, aux), grads) if has_aux else (losses, grads)


def mgda_ub(
    num_tasks: int,
    *,
    normalizer: str = 'none',
    max_steps: int | None = None,
    tol: float | None = None,
    method: str = 'pairwise',
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """MGDA-UB: the min-norm solve on representation gradients, one pullback.

  The input ``updates`` is a :class:`RepresentationGrads` (from
  :func:`representation_grads`). The update:

  1. ``G = gram_matrix(rep_grads)`` over the whole ``[B, ...]`` tensor of
     each task, normalised as asked;
  2. ``alpha = min_norm_element(G).weights`` (stopped gradient);
  3. the cotangent ``sum_t alpha_t nabla_Z L_t`` (raw gradients) is pulled
     back through the encoder once;
  4. plus ``head_grads``: each task head's own gradient, unscaled.

  The output is shaped like the parameters, ready for the next transform in
  an ``optax.chain``. Non-finite representation gradients give NaN weights
  and a NaN update, with ``state.info.result == SolverResult.NONFINITE``. To
  skip such steps wrap the transforms that follow in ``optax.apply_if_finite``
  (it cannot wrap ``mgda_ub`` itself, whose input is not parameter-shaped):
  ``optax.chain(mgda_ub(K), optax.apply_if_finite(optax.sgd(lr), 10))``.

  Args:
    num_tasks: ``K``, a static int (under ``optax.inject_hyperparams`` list it
      in ``static_args``).
    normalizer: ``'none'`` (the paper's choice for MultiMNIST), ``'l2'``,
      ``'loss'`` or ``'loss+'``; the loss normalisers need ``losses=``.
    max_steps: solver iteration cap (``None``: the dtype's default).
    tol: solver relative tolerance (``None``: the dtype's default).
    method: Frank-Wolfe variant, see :func:`mgda_jax.min_norm_element`.
    axis_name: data parallelism inside ``jax.shard_map``, where each
      device holds ``rep_grads`` for its shard of the batch. The Gram matrix
      is ``psum``-med over the devices (the global one: its batch sum splits
      into per-device blocks), so every device solves the same problem and
      gets the same ``alpha``. With shard_map's type checks on (the default)
      this happens without ``axis_name`` (the per-device values' types say
      which axes they vary over, and gradients w.r.t. replicated parameters
      come back summed already); ``axis_name`` restricts the sums to that
      axis, and is required with ``check_vma=False`` or ``pmap``, where the
      update is ``psum``-med too. Per-device losses should be each device's
      share of the global mean (local mean / number of devices), so that
      the sums are the global quantities. Under plain ``jax.jit`` with
      sharded inputs nothing is needed: XLA inserts the same reductions.

  Returns:
    A ``GradientTransformationExtraArgs`` with state :class:`MGDAState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import mgda_jax
    >>> params = {'enc': jnp.ones((3, 4)), 'heads': jnp.ones((2, 4))}
    >>> x = jnp.arange(6.0).reshape(2, 3) / 6
    >>> encode = lambda p, x: jnp.tanh(x @ p['enc'])            # Z: (B, 4)
    >>> heads = lambda p, z, x: jnp.mean((z @ p['heads'].T - 1) ** 2, 0)
    >>> tx = optax.chain(mgda_jax.mgda_ub(2), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> losses, grads = mgda_jax.representation_grads(encode, heads, params, x)
    >>> updates, state = tx.update(grads, state, params, losses=losses)
    >>> jax.tree.map(jnp.shape, updates)
    {'enc': (3, 4), 'heads': (2, 4)}

  References:
    Sener & Koltun, *Multi-Task Learning as Multi-Objective Optimization*,
    NeurIPS 2018, https://arxiv.org/abs/1810.04650 (Section 3.3, Algorithm 2).
  """
  num_tasks = mgda_lib.check_options('mgda_ub', num_tasks, normalizer, method)

  def init_fn(params):
    return mgda_lib.init_state(num_tasks, params)

  def update_fn(updates, state, params=None, *, losses=None, **extra_args):
    del params, extra_args
    if not isinstance(updates, RepresentationGrads):
      raise ValueError(
          'mgda_ub expects a RepresentationGrads (from '
          'mgda_jax.representation_grads) as its input updates; got '
          f'{type(updates).__name__}. For gradients w.r.t. the parameters '
          'use mgda_jax.mgda.')
    k = gram_lib.num_tasks(updates.rep_grads, 'rep_grads')
    if k != num_tasks:
      raise ValueError(f'mgda_ub was built for num_tasks={num_tasks} but the '
                       f'representation gradients have a leading axis of {k}.')
    gram = gram_lib.gram_matrix(updates.rep_grads)
    # Data parallelism: typed shard_map tells which values are per-device.
    legacy = gram_lib.untyped_axis(axis_name)
    gram = gram_lib.sum_over_devices(gram, axis_name, legacy=legacy)
    if losses is not None:
      losses = gram_lib.sum_over_devices(losses, axis_name, legacy=legacy)
    info = mgda_lib.solve_weights(gram, normalizer=normalizer, losses=losses,
                                  max_steps=max_steps, tol=tol, method=method,
                                  dtype=state.info.weights.dtype)
    weights = jax.lax.stop_gradient(info.weights)
    cotangent = mgda_lib.combine(weights, updates.rep_grads)
    encoder_grads = updates.pullback(cotangent)
    new_updates = jax.tree.map(jnp.add, encoder_grads, updates.head_grads)
    new_updates = gram_lib.sum_over_devices(new_updates, axis_name,
                                            legacy=legacy)
    return new_updates, mgda_lib.MGDAState(
        count=optax.safe_increment(state.count), info=info)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
