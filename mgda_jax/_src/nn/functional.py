"""From an architecture to the pure functions every method takes.

:func:`functional` splits an :class:`~mgda_jax.nn.MTLArchitecture` into
``(graphdef, params, state)`` and closes over it the functions of
:func:`mgda_jax.representation_grads` (MGDA-UB's input: ``encode`` and
``task_losses``) and of :func:`mgda_jax.per_task_grads` (MGDA's input:
``losses``), with the shared mask for ``shared=``. :func:`task_gradients`
runs either path and returns the model state (BatchNorm statistics, RNG
counts) updated once.
"""

from typing import Any, Callable, NamedTuple

from flax import nnx
import jax

from mgda_jax._src.core import inputs as inputs_lib
from mgda_jax._src.nn import base

REPRESENTATION = 'representation'
PER_TASK = 'per_task'


class Functional(NamedTuple):
  """An architecture as pure functions of ``(params, state, x, *batch)``.

  Attributes:
    graphdef: the model's static structure (``nnx.split``).
    params: the ``nnx.Param`` leaves, a pure ``nnx.State`` (plain arrays):
      what the optimizer and the method see.
    state: every other variable (BatchNorm statistics, RNG counts), pure.
    encode: ``encode(params, state, x, *batch) -> (Z, new_state)``: the
      ``encoder_fn`` of :func:`mgda_jax.representation_grads` with
      ``encoder_has_aux=True``; it reads only shared parameters.
    task_losses: ``task_losses(params, z, state, x, *batch) -> (losses,
      (outputs, new_state))``: its ``heads_fn`` with ``has_aux=True`` (and
      ``per_task_z=per_task_z, z_copies='tuple'``); it reads only
      task-specific parameters.
    losses: ``losses(params, state, x, *batch) -> (losses, (outputs,
      new_state))``: the ``loss_fn`` of :func:`mgda_jax.per_task_grads`
      with ``has_aux=True``.
    shared: ``params -> bool mask``, the ``shared=`` of full MGDA and every
      gradient method on parameter gradients.
    merge_state: ``(encoder_state, heads_state) -> state``: the shared
      variables from the first, the task-specific ones from the second.
    num_tasks: ``K``.
    per_task_z: ``K`` if ``task_losses`` expects ``K`` copies of ``Z``, a
      tuple (head ``t`` reads only copy ``t``: one backward pass through the
      heads gives every ``dL_t/dZ``), else None. Pass it on as
      ``representation_grads(..., per_task_z=fns.per_task_z,
      z_copies=fns.z_copies)``.
    representation: whether the representation path is exact for this
      model (``model.supports_representation``).
    z_copies: ``'tuple'``, the layout of the copies (see
      :func:`mgda_jax.representation_grads`): the heads are a loop over
      tasks, for which stacked copies would cost ``K^2`` times ``Z`` in
      their backward pass.
  """

  graphdef: Any
  params: Any
  state: Any
  encode: Callable[..., Any]
  task_losses: Callable[..., Any]
  losses: Callable[..., Any]
  shared: Callable[[Any], Any]
  merge_state: Callable[[Any, Any], Any]
  num_tasks: int
  per_task_z: int | None
  representation: bool
  z_copies: str = 'tuple'


def functional(model: base.MTLArchitecture,
               loss_fn: Callable[..., jax.Array], *,
               per_task_z: bool = True) -> Functional:
  """Splits ``model`` into pure functions for the gradient methods.

  Args:
    model: an architecture of :mod:`mgda_jax.nn`.
    loss_fn: ``loss_fn(outputs, *batch) -> (K,)`` task losses, where
      ``outputs`` is ``model(x)`` (a tuple in task order, or a dict) and
      ``batch`` the further arguments (labels, ...). It must not read
      another task's output for task ``t``'s loss.
    per_task_z: see :attr:`Functional.per_task_z` (default True: one
      backward pass through the heads instead of ``K``).

  Returns:
    A :class:`Functional`.

  Raises:
    ValueError: if ``model`` is not an :class:`MTLArchitecture`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import mgda_jax, mgda_jax.nn
    >>> rngs = nnx.Rngs(0)
    >>> model = mgda_jax.nn.HardSharing(
    ...     encoder=nnx.Linear(3, 8, rngs=rngs),              # x -> Z
    ...     decoders=[nnx.Linear(8, 1, rngs=rngs) for _ in range(2)])
    >>> def loss_fn(outputs, y):                           # (K,) losses
    ...   return jnp.stack([jnp.mean((o[:, 0] - y[:, t]) ** 2)
    ...                     for t, o in enumerate(outputs)])
    >>> fns = mgda_jax.nn.functional(model, loss_fn)
    >>> x, y = jnp.ones((4, 3)), jnp.zeros((4, 2))
    >>> tx = mgda_jax.mgda_ub(2)
    >>> losses, grads, state, _ = mgda_jax.nn.task_gradients(
    ...     fns, 'representation', fns.params, fns.state, x, y)
    >>> update, _ = tx.update(grads, tx.init(fns.params), fns.params,
    ...                       losses=losses)
    >>> jax.tree.structure(update) == jax.tree.structure(fns.params)
    True
  """
  if not isinstance(model, base.MTLArchitecture):
    raise ValueError('functional expects an mgda_jax.nn architecture (an '
                     f'MTLArchitecture); got {type(model).__name__}. Wrap '
                     'your encoder and heads in mgda_jax.nn.HardSharing.')
  graphdef, params, state = nnx.split(model, nnx.Param, ...)
  params, state = nnx.as_pure(params), nnx.as_pure(state)
  k = model.num_tasks
  is_shared = model.is_shared

  def merge_state(enc_state, head_state):
    return jax.tree_util.tree_map_with_path(
        lambda p, e, h: e if is_shared(base.path_keys(p)) else h,
        enc_state, head_state)

  def shared(params):
    return model.shared_mask(params)

  def encode(params, state, x, *batch):
    del batch
    m = nnx.merge(graphdef, params, state)
    z = m.represent(x)
    return z, nnx.as_pure(nnx.state(m, nnx.Not(nnx.Param)))

  def task_losses(params, z, state, x, *batch):
    m = nnx.merge(graphdef, params, state)
    if per_task_z:
      if not isinstance(z, tuple) or len(z) != k:
        raise ValueError(
            f'task_losses expects a tuple of {k} copies of Z '
            f"(representation_grads(..., per_task_z={k}, z_copies='tuple'))"
            f'; got {type(z).__name__}'
            + (f' of length {len(z)}.' if isinstance(z, tuple) else '.'))
      outs = [m.decode_task(t, z[t], x) for t in range(k)]
    else:
      outs = [m.decode_task(t, z, x) for t in range(k)]
    outputs = m.pack(outs)
    losses = loss_fn(outputs, *batch)
    return losses, (outputs, nnx.as_pure(nnx.state(m, nnx.Not(nnx.Param))))

  def losses(params, state, x, *batch):
    m = nnx.merge(graphdef, params, state)
    outputs = m(x)
    return loss_fn(outputs, *batch), (
        outputs, nnx.as_pure(nnx.state(m, nnx.Not(nnx.Param))))

  return Functional(graphdef, params, state, encode, task_losses, losses,
                    shared, merge_state, k, k if per_task_z else None,
                    bool(model.supports_representation))


def task_gradients(fns: Functional, kind: str, params, state, x, *batch):
  """The input of a method by either path, and the state updated once.

  Args:
    fns: from :func:`functional`.
    kind: ``'representation'`` (:func:`mgda_jax.representation_grads`: one
      forward pass, per-task gradients at ``Z``, one pullback; MGDA-UB and
      every method that accepts it) or ``'per_task'``
      (:func:`mgda_jax.per_task_grads`: per-task gradients of every
      parameter; full MGDA, with ``shared=fns.shared``).
    params: the parameters (``fns.params`` or later values).
    state: the other variables (``fns.state`` or later values).
    x: the input.
    *batch: the further arguments of ``loss_fn`` (labels, ...).

  Returns:
    ``(losses, grads, new_state, outputs)``; ``grads`` is the method's input
    ``updates``.

  Raises:
    ValueError: for an unknown ``kind``, or ``'representation'`` on a model
      whose representation path is not exact.
  """
  if kind == REPRESENTATION:
    if not fns.representation:
      raise ValueError(
          'this model has shared parameters acting after task-specific ones '
          '(e.g. MTAN with share_extractor=True), so no representation Z '
          "separates them; use kind='per_task' with shared=fns.shared.")
    (losses, (outputs, head_state)), grads, enc_state = (
        inputs_lib.representation_grads(
            fns.encode, fns.task_losses, params, state, x, *batch,
            has_aux=True, encoder_has_aux=True, per_task_z=fns.per_task_z,
            z_copies=fns.z_copies))
    return losses, grads, fns.merge_state(enc_state, head_state), outputs
  if kind == PER_TASK:
    (losses, (outputs, new_state)), grads = inputs_lib.per_task_grads(
        fns.losses, params, state, x, *batch, has_aux=True)
    return losses, grads, new_state, outputs
  raise ValueError(f"kind must be 'representation' or 'per_task'; got "
                   f'{kind!r}.')
