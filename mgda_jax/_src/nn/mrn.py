"""Multilinear Relationship Networks (Long et al. 2017): a tensor-normal prior.

MRN is hard sharing whose task-specific layers are coupled by a prior: the
weights ``W_t`` (``D1 x D2``, input features by output features) of one layer
of every task, stacked into ``W`` of shape ``(D1, D2, K)``, follow a tensor
normal distribution (Long et al. 2017, Eq. 4-5),

.. math::

  \\mathrm{vec}(W) \\sim \\mathcal N\\big(0,\\;
  \\Sigma_1 \\otimes \\Sigma_2 \\otimes \\Sigma_3\\big),

with ``Sigma_1`` the feature covariance (``D1 x D1``), ``Sigma_2`` the class
covariance (``D2 x D2``) and ``Sigma_3`` the task covariance (``K x K``). The
MAP objective adds, per regularised layer, the penalty

.. math::

  R(W) = \\mathrm{vec}(W)^\\top (\\Omega_1 \\otimes \\Omega_2 \\otimes \\Omega_3)
  \\mathrm{vec}(W) = \\sum W_{abc}\\,(\\Omega_1)_{aa'}(\\Omega_2)_{bb'}
  (\\Omega_3)_{cc'}\\,W_{a'b'c'}, \\qquad \\Omega_i = \\Sigma_i^{-1},

(``vec`` in row-major order of ``(D1, D2, K)``), computed as three mode
products, never as the ``D1 D2 K``-square Kronecker matrix. Between gradient
steps the covariances are re-estimated in closed form by the alternating
("flip-flop") maximum likelihood of Long et al. (Eq. 10), e.g. for the
feature mode

.. math::

  \\Sigma_1 = \\frac{1}{D_2 K} \\sum W_{abc} (\\Omega_2)_{bb'} (\\Omega_3)_{cc'}
  W_{a'b'c'} + \\epsilon I_{D_1},

then ``Sigma_2`` with the new ``Omega_1``, then ``Sigma_3``. A mode's
estimate has full rank only when its size is at most the product of the
other two (``D1 <= D2 K``, ...); otherwise ``epsilon`` sets its null space
(the official last layer, ``256 x 31 x 4``, is such a case). Each precision
is rescaled to unit trace after its inversion, as the official PyTorch code
(``thuml/MTlearn``, ``src/model_multi_task.py``) does: the scale of a
Kronecker product is shared between its factors, so only the product's scale
(set by ``weight``) is meaningful. That code regularises the last layer only
(``fc``, ``256 x classes x K``), adds ``R`` with weight 1, uses ``epsilon =
1e-5``, and re-estimates all three covariances after every step, each from
the previous two (we use the newest, the paper's alternation); ``every``
spaces the updates out.

**Cost** (per regularised layer, ``P = D1 D2 K``): the penalty and its
gradient are three mode products, ``2 P (D1 + D2 + K)`` flops per step, and
the state is ``D1^2 + D2^2 + K^2`` floats. A covariance update costs about
``2 P (D1 + D2 + K)`` flops for the three Gram contractions (each against the
other two precisions: ``4 P (D1 + D2 + K)``) plus three ``d^3`` inversions,
``D1^3 + D2^3 + K^3``; :func:`tensor_normal_cost` gives the figures. For the
official last layer (``256 x 31 x 4``) this is negligible; on a ``4096 x
4096`` layer one update inverts two ``4096 x 4096`` matrices (about
``1.4e11`` flops): regularise small layers, or update every few hundred
steps.

**With the gradient methods.** ``R`` reads only task-specific parameters (the
decoders), so it changes neither ``Z`` nor any shared gradient: MGDA-UB,
MGDA and every other method see the task losses exactly as without the
prior. :func:`tensor_normal_prior` is an optax transformation that adds
``weight * grad R`` to the method's update before the optimizer:
``optax.chain(method, model.prior(...), optax.adam(lr))``.

References:
  Long, Cao, Wang, Yu, Learning Multiple Tasks with Multilinear
  Relationship Networks, NeurIPS 2017, arXiv:1506.02117.
"""

from typing import Any, Callable, Mapping, NamedTuple, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import optax

from mgda_jax._src.nn import base
from mgda_jax._src.nn import hard_sharing

Precisions = tuple[jax.Array, jax.Array, jax.Array]


def _check(w):
  if w.ndim != 3:
    raise ValueError('a tensor-normal prior acts on a (D1, D2, K) tensor '
                     f'(features, outputs, tasks); got shape {w.shape}.')


def tensor_normal_penalty(w: jax.Array, precisions: Precisions) -> jax.Array:
  """``vec(W)^T (Omega_1 kron Omega_2 kron Omega_3) vec(W)`` for ``W`` of
  shape ``(D1, D2, K)``, by three mode products.

  Example:
    >>> import numpy as np
    >>> w = np.arange(12.0).reshape(2, 3, 2)
    >>> om = (np.eye(2), np.eye(3), np.eye(2))
    >>> float(tensor_normal_penalty(w, om)) == float((w ** 2).sum())
    True
  """
  _check(w)
  o1, o2, o3 = precisions
  v = jnp.einsum('ad,dbc->abc', o1, w)
  v = jnp.einsum('be,aec->abc', o2, v)
  v = jnp.einsum('cf,abf->abc', o3, v)
  return jnp.vdot(w, v)


def _normalized_inverse(sigma):
  omega = jnp.linalg.inv(sigma)
  omega = 0.5 * (omega + omega.T)
  return omega / jnp.trace(omega)


def tensor_normal_update(w: jax.Array, precisions: Precisions,
                         eps: float = 1e-5) -> Precisions:
  """One alternating maximum-likelihood pass over the three covariances.

  ``Sigma_1 = W_(1) (Omega_2 kron Omega_3) W_(1)^T / (D2 K) + eps I``, then
  ``Sigma_2`` with the new ``Omega_1``, then ``Sigma_3``; each precision
  ``Omega_i = Sigma_i^{-1}`` is returned rescaled to unit trace (see the
  module docstring). ``W`` is treated as a constant (``stop_gradient``).
  """
  _check(w)
  w = jax.lax.stop_gradient(w)
  d1, d2, k = w.shape
  o1, o2, o3 = precisions
  s1 = jnp.einsum('abc,bB,cC,ABC->aA', w, o2, o3, w) / (d2 * k)
  o1 = _normalized_inverse(s1 + eps * jnp.eye(d1, dtype=w.dtype))
  s2 = jnp.einsum('abc,aA,cC,ABC->bB', w, o1, o3, w) / (d1 * k)
  o2 = _normalized_inverse(s2 + eps * jnp.eye(d2, dtype=w.dtype))
  s3 = jnp.einsum('abc,aA,bB,ABC->cC', w, o1, o2, w) / (d1 * d2)
  o3 = _normalized_inverse(s3 + eps * jnp.eye(k, dtype=w.dtype))
  return o1, o2, o3


def tensor_normal_init(shape: Sequence[int], dtype=jnp.float32) -> Precisions:
  """Unit-trace identity precisions ``I / D`` for a ``(D1, D2, K)`` layer
  (the official code starts from ``I``; unit trace keeps ``weight``'s meaning
  the same before and after the first update)."""
  return tuple(jnp.eye(d, dtype=dtype) / d for d in shape)


def tensor_normal_cost(shape: Sequence[int]) -> dict:
  """The prior's cost for one ``(D1, D2, K)`` layer, as counted in the
  module docstring: ``step_flops`` (penalty and gradient, every step),
  ``update_flops`` (one covariance re-estimation), ``state_floats``."""
  d1, d2, k = (int(d) for d in shape)
  p = d1 * d2 * k
  return {'step_flops': 2 * p * (d1 + d2 + k),
          'update_flops': 4 * p * (d1 + d2 + k) + d1 ** 3 + d2 ** 3 + k ** 3,
          'state_floats': d1 * d1 + d2 * d2 + k * k}


class TensorNormalPriorState(NamedTuple):
  """``count``: steps taken; ``precisions``: one ``(Omega_1, Omega_2,
  Omega_3)`` per regularised layer; ``penalty``: ``weight * sum R`` at the
  last step's parameters (for logging)."""

  count: jax.Array
  precisions: tuple
  penalty: jax.Array


def tensor_normal_prior(
    select: Callable[[Any], Sequence[jax.Array]], weight: float = 1.0,
    every: int = 1, eps: float = 1e-5) -> optax.GradientTransformation:
  """Adds ``weight * grad sum_l R(W_l)`` to the updates; re-estimates the
  covariances every ``every`` steps.

  Args:
    select: ``params -> [W_l]``, the regularised layers as ``(D1, D2, K)``
      tensors (differentiable in ``params``); :meth:`MRN.task_weights`.
    weight: the prior's weight ``lambda`` (1 in the official code).
    every: re-estimate the covariances after every ``every``-th step (static;
      1 as in the official code). The estimate reads the parameters the
      update is given (before this step's change: a one-step lag against the
      official code, which reads them after the optimizer step).
    eps: the ridge ``epsilon`` added to each covariance before inverting.

  Returns:
    An ``optax.GradientTransformation``; ``update`` needs ``params``.

  Raises:
    ValueError: if ``every < 1`` or ``update`` gets no ``params``.
  """
  every = int(every)
  if every < 1:
    raise ValueError(f'every must be a positive integer; got {every}.')

  def total(params, precisions):
    return sum(tensor_normal_penalty(w, om)
               for w, om in zip(select(params), precisions))

  def init_fn(params):
    ws = select(params)
    for w in ws:
      _check(w)
    return TensorNormalPriorState(
        jnp.zeros([], jnp.int32),
        tuple(tensor_normal_init(w.shape, w.dtype) for w in ws),
        jnp.zeros([], jnp.float32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('tensor_normal_prior needs params: pass them to '
                       'update (optax.chain forwards them).')
    value, grads = jax.value_and_grad(total)(params, state.precisions)
    updates = jax.tree.map(lambda u, g: u + weight * g.astype(u.dtype),
                           updates, grads)
    count = state.count + 1

    def refit(precisions):
      return tuple(tensor_normal_update(w, om, eps)
                   for w, om in zip(select(params), precisions))

    if every == 1:   # static: no lax.cond (slow on XLA:CPU)
      precisions = refit(state.precisions)
    else:
      precisions = jax.lax.cond(count % every == 0, refit, lambda p: p,
                                state.precisions)
    return updates, TensorNormalPriorState(
        count, precisions, (weight * value).astype(jnp.float32))

  return optax.GradientTransformation(init_fn, update_fn)


class MRN(hard_sharing.HardSharing):
  """Hard sharing with a tensor-normal prior over task-specific layers
  (Multilinear Relationship Network, Long et al. 2017).

  The forward pass, the shared parameters and the representation ``Z`` are
  those of :class:`~mgda_jax.nn.HardSharing` (the prior adds no parameter:
  its precisions live in the optimizer state). ``layers`` names, inside each
  decoder, the kernels the prior couples across tasks (the same paths and
  shapes in every decoder); a kernel of shape ``(..., D2)`` (a Linear's
  ``(D1, D2)``, a Conv's ``(kh, kw, C, D2)``) is read as ``(prod(...), D2)``.
  See the module docstring for the maths, the covariance updates and the
  cost.

  Args:
    encoder: ``x -> Z``.
    decoders: one module per task (a list or a dict).
    layers: paths inside a decoder, e.g. ``[('kernel',)]`` for a Linear
      decoder or ``[('layers', 2, 'kernel')]`` for the last Linear of an
      ``nnx.Sequential``; default: the decoder's last parameter named
      ``kernel`` (the official code's choice, the last layer).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> import mgda_jax, mgda_jax.nn
    >>> rngs = nnx.Rngs(0)
    >>> model = mgda_jax.nn.MRN(nnx.Linear(3, 8, rngs=rngs),
    ...                         [nnx.Linear(8, 2, rngs=rngs) for _ in range(3)])
    >>> params = nnx.as_pure(nnx.state(model, nnx.Param))
    >>> [w.shape for w in model.task_weights(params)]
    [(8, 2, 3)]
    >>> tx = optax.chain(mgda_jax.uniform_weighting(3),
    ...                  model.prior(weight=0.1), optax.sgd(0.1))
    >>> state = tx.init(params)
  """

  def __init__(self, encoder: nnx.Module,
               decoders: Sequence[nnx.Module] | Mapping[str, nnx.Module],
               layers: Sequence[tuple] | None = None):
    super().__init__(encoder, decoders)
    kernels = []
    for t in range(self.num_tasks):
      part = base.task_part(self.decoders, self.task_names, self.as_dict, t)
      flat = jax.tree_util.tree_flatten_with_path(
          nnx.as_pure(nnx.state(part, nnx.Param)))[0]
      kernels.append({base.path_keys(p): tuple(leaf.shape)
                      for p, leaf in flat})
    if layers is None:
      names = [p for p in kernels[0] if p and p[-1] == 'kernel']
      if not names:
        raise ValueError('MRN: the decoders have no parameter named '
                         "'kernel'; name the regularised layers with layers=.")
      layers = [names[-1]]
    layers = [tuple(p) for p in layers]
    if not layers:
      raise ValueError('MRN: layers= names no layer to regularise.')
    for path in layers:
      shapes = {kernels[t].get(path) for t in range(self.num_tasks)}
      if None in shapes:
        raise ValueError(f'MRN: no parameter at {path} in every decoder; the '
                         f'first decoder has {sorted(kernels[0])}.')
      if len(shapes) != 1:
        raise ValueError(f'MRN: the kernels at {path} differ in shape across '
                         f'tasks ({sorted(shapes)}); the prior stacks them.')
      if len(next(iter(shapes))) < 2:
        raise ValueError(f'MRN: the parameter at {path} is not a kernel '
                         f'(shape {next(iter(shapes))}).')
    self.prior_layers = tuple(layers)

  def task_weights(self, params) -> list:
    """The regularised layers of ``params`` (this model's ``nnx.Param``
    state, pure or not), each as a ``(D1, D2, K)`` tensor."""
    found = {base.path_keys(p): leaf for p, leaf in
             jax.tree_util.tree_flatten_with_path(params)[0]}
    keys = [self.task_names[t] if self.as_dict else t
            for t in range(self.num_tasks)]
    out = []
    for path in self.prior_layers:
      ws = []
      for key in keys:
        w = found[('decoders', key) + path]
        ws.append(jnp.reshape(w, (-1, w.shape[-1])))
      out.append(jnp.stack(ws, axis=-1))
    return out

  def prior(self, weight: float = 1.0, every: int = 1,
            eps: float = 1e-5) -> optax.GradientTransformation:
    """:func:`tensor_normal_prior` over :meth:`task_weights`."""
    return tensor_normal_prior(self.task_weights, weight, every, eps)

