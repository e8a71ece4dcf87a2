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

  S_1 = \\frac{1}{D_2 K} \\sum W_{abc} (\\Omega_2)_{bb'} (\\Omega_3)_{cc'}
  W_{a'b'c'}, \\qquad
  \\Sigma_1 = S_1 + \\epsilon \\frac{\\operatorname{tr} S_1}{D_1} I_{D_1},

then ``Sigma_2`` with the new ``Omega_1``, then ``Sigma_3`` (the ridge is
relative to the estimate's scale, so ``epsilon`` means the same on every
layer). A mode's estimate has full rank only when its size is at most the
product of the other two (``D1 <= D2 K``, ...); a mode larger than that
(the features of a last layer: ``50 x 10 x 2`` on MultiMNIST) would be set
by the ridge in its null space, where ``W`` has no energy, and its precision
would put almost all its weight there, switching the prior off. So by
default only the well-posed modes are re-estimated (``modes='well_posed'``);
the others keep ``Omega = I``. Each re-estimated precision is rescaled to
trace ``D_i`` (mean eigenvalue 1): the scale of a Kronecker product is shared
between its factors, so only the product's scale, set by ``weight``, is
meaningful, and at the identity start ``R = ||W||^2``.

The official code (``thuml/MTlearn``, ``src/model_multi_task.py``) exists in
two versions. An early one re-estimates all three covariances after every
step (each from the previous two, with an absolute ``1e-5`` ridge and no
``1 / (D2 K)`` factor) and divides each precision by its trace. The later
one regularises the last layer (``networks[i].module[-1]``) with weight
``trade_off``, starts from identities, and re-estimates **only the task
covariance**, every ``cov_update_freq`` iterations, through an SVD that
thresholds the singular values and caps the trace at 3000; the class and
feature updates are commented out. ``modes=(2,)`` with ``every=100`` is
closest to that version.

**Cost** (per regularised layer, ``P = D1 D2 K``): the penalty is three
mode products, ``v = W x_1 Omega_1 x_2 Omega_2 x_3 Omega_3``, ``2 P (D1 +
D2 + K)`` flops, and its gradient ``2 v`` comes with it (symmetric
precisions), plus ``2 P`` for ``<W, v>``; the state is ``D1^2 + D2^2 +
K^2`` floats. One re-estimation of mode ``i`` costs a contraction against the
other two precisions and the Gram of the result, ``2 P (D_j + D_k) + 2 P
D_i`` flops, and a ``D_i x D_i`` inversion, ``~D_i^3``;
:func:`tensor_normal_cost` gives the figures. For a last layer (``50 x 10 x
2``, ``256 x 31 x 4``) this is negligible; on a ``4096 x 4096`` layer one
update of a feature mode inverts a ``4096 x 4096`` matrix (about ``7e10``
flops): regularise small layers, or update every few hundred steps.

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
import numpy as np
import optax

from mgda_jax._src.nn import base
from mgda_jax._src.nn import hard_sharing

Precisions = tuple[jax.Array, jax.Array, jax.Array]


def _check(w):
  if w.ndim != 3:
    raise ValueError('a tensor-normal prior acts on a (D1, D2, K) tensor '
                     f'(features, outputs, tasks); got shape {w.shape}.')


def _contract(w, precisions):
  """``W x_1 Omega_1 x_2 Omega_2 x_3 Omega_3``."""
  o1, o2, o3 = precisions
  v = jnp.einsum('ad,dbc->abc', o1, w)
  v = jnp.einsum('be,aec->abc', o2, v)
  return jnp.einsum('cf,abf->abc', o3, v)


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
  return jnp.vdot(w, _contract(w, precisions))


def tensor_normal_value_and_grad(w: jax.Array, precisions: Precisions):
  """``(R(W), dR/dW)``: one contraction ``v``, ``R = <W, v>``, ``dR/dW = 2
  v`` (the precisions are symmetric)."""
  _check(w)
  v = _contract(w, precisions)
  return jnp.vdot(w, v), 2.0 * v


def _normalized_inverse(sigma):
  d = sigma.shape[0]
  omega = jnp.linalg.inv(sigma)
  omega = 0.5 * (omega + omega.T)
  return omega * (d / jnp.trace(omega))


MODES = ('features', 'classes', 'tasks')


def well_posed_modes(shape: Sequence[int]) -> tuple[int, ...]:
  """The modes whose size is at most the product of the other two."""
  d = [int(x) for x in shape]
  return tuple(i for i in range(3)
               if d[i] <= int(np.prod([d[j] for j in range(3) if j != i])))


def _resolve_modes(modes, shape):
  if modes == 'well_posed':
    return well_posed_modes(shape)
  if modes == 'all':
    return (0, 1, 2)
  modes = tuple(sorted({int(m) for m in modes}))
  if any(m not in (0, 1, 2) for m in modes):
    raise ValueError("modes must be 'well_posed', 'all' or a subset of (0, "
                     f'1, 2) (features, classes, tasks); got {modes}.')
  return modes


def tensor_normal_update(w: jax.Array, precisions: Precisions,
                         eps: float = 1e-5,
                         modes: str | Sequence[int] = 'well_posed'
                         ) -> Precisions:
  """One alternating maximum-likelihood pass over the chosen covariances.

  For each mode ``i`` in ``modes`` (features 0, classes 1, tasks 2), in
  order: ``S_i`` = the mode-``i`` Gram of ``W`` against the other two
  current precisions, divided by their sizes' product; ``Sigma_i = S_i +
  eps tr(S_i) / D_i I``; ``Omega_i = Sigma_i^{-1}`` rescaled to trace
  ``D_i``. Other modes keep their precision. ``W`` is treated as a constant
  (``stop_gradient``). See the module docstring for ``'well_posed'``.
  """
  _check(w)
  w = jax.lax.stop_gradient(w)
  d1, d2, k = w.shape
  om = list(precisions)
  specs = ('abc,bB,cC,ABC->aA', 'abc,aA,cC,ABC->bB', 'abc,aA,bB,ABC->cC')
  for i in _resolve_modes(modes, w.shape):
    others = [om[j] for j in range(3) if j != i]
    n = (d1 * d2 * k) // w.shape[i]
    s = jnp.einsum(specs[i], w, *others, w) / n
    d = w.shape[i]
    ridge = eps * jnp.trace(s) / d + jnp.finfo(w.dtype).tiny
    om[i] = _normalized_inverse(s + ridge * jnp.eye(d, dtype=w.dtype))
  return tuple(om)


def tensor_normal_init(shape: Sequence[int], dtype=jnp.float32) -> Precisions:
  """Identity precisions for a ``(D1, D2, K)`` layer (the official code's
  start; trace ``D_i``, as every re-estimated precision)."""
  return tuple(jnp.eye(d, dtype=dtype) for d in shape)


def tensor_normal_cost(shape: Sequence[int],
                       modes: str | Sequence[int] = 'well_posed') -> dict:
  """The prior's cost for one ``(D1, D2, K)`` layer, as counted in the
  module docstring: ``step_flops`` (penalty and gradient, every step),
  ``update_flops`` (one re-estimation of ``modes``), ``state_floats``."""
  d = [int(x) for x in shape]
  p = d[0] * d[1] * d[2]
  update = 0
  for i in _resolve_modes(modes, d):
    update += 2 * p * (sum(d) - d[i]) + 2 * p * d[i] + d[i] ** 3
  return {'step_flops': 2 * p * sum(d) + 2 * p, 'update_flops': update,
          'state_floats': sum(x * x for x in d)}


class TensorNormalPriorState(NamedTuple):
  """``count``: steps taken; ``precisions``: one ``(Omega_1, Omega_2,
  Omega_3)`` per regularised layer; ``penalty``: ``weight * sum R`` at the
  last step's parameters (for logging)."""

  count: jax.Array
  precisions: tuple
  penalty: jax.Array


def tensor_normal_prior(
    select: Callable[[Any], Sequence[jax.Array]], weight: float = 1.0,
    every: int = 1, eps: float = 1e-5,
    modes: str | Sequence[int] = 'well_posed'
) -> optax.GradientTransformation:
  """Adds ``weight * grad sum_l R(W_l)`` to the updates; re-estimates the
  covariances every ``every`` steps.

  Args:
    select: ``params -> [W_l]``, the regularised layers as ``(D1, D2, K)``
      tensors (differentiable in ``params``); :meth:`MRN.task_weights`.
    weight: the prior's weight ``lambda`` (the official code's
      ``trade_off``); must be ``>= 0``.
    every: re-estimate the covariances after every ``every``-th step (static;
      the official code's ``cov_update_freq``). The estimate reads the
      parameters the update is given (before this step's change: a one-step
      lag against the official code, which reads them after the optimizer
      step).
    eps: the relative ridge (``epsilon tr(S) / D``).
    modes: which covariances to re-estimate (:func:`tensor_normal_update`):
      ``'well_posed'`` (default), ``'all'``, or indices (2: tasks only, the
      later official code).

  Returns:
    An ``optax.GradientTransformation``; ``update`` needs ``params``.

  Raises:
    ValueError: for ``every < 1``, a negative ``weight`` (a concrete one),
      unknown ``modes``, or ``update`` without ``params``.
  """
  every = int(every)
  if every < 1:
    raise ValueError(f'every must be a positive integer; got {every}.')
  if isinstance(weight, (int, float)) and not weight >= 0:
    raise ValueError(f'weight must be >= 0; got {weight}.')
  if modes not in ('well_posed', 'all'):
    _resolve_modes(modes, (1, 1, 1))

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
    ws, pullback = jax.vjp(select, params)
    pairs = [tensor_normal_value_and_grad(w, om)
             for w, om in zip(ws, state.precisions)]
    value = sum(v for v, _ in pairs)
    grads, = pullback([g for _, g in pairs])
    updates = jax.tree.map(lambda u, g: u + weight * g.astype(u.dtype),
                           updates, grads)
    count = state.count + 1

    def refit(precisions):
      return tuple(tensor_normal_update(w, om, eps, modes)
                   for w, om in zip(ws, precisions))

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
      ``nnx.Sequential``; default: the decoder's only ``kernel``, or the
      last layer's of an ``nnx.Sequential`` (the official code's choice);
      otherwise name it.

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
      if len(names) > 1 and all(
          len(p) >= 3 and p[0] == 'layers' and isinstance(p[1], int)
          for p in names):
        names = [max(names, key=lambda p: p[1])]   # an nnx.Sequential
      if len(names) != 1:
        raise ValueError(
            "MRN: cannot tell which decoder kernel is the last layer (found "
            f'{names}); name the regularised layers with layers=.')
      layers = names
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

  def prior(self, weight: float = 1.0, every: int = 1, eps: float = 1e-5,
            modes: str | Sequence[int] = 'well_posed'
            ) -> optax.GradientTransformation:
    """:func:`tensor_normal_prior` over :meth:`task_weights`."""
    return tensor_normal_prior(self.task_weights, weight, every, eps, modes)

