"""Inter-task affinity by lookahead (TAG), and the cosine-similarity baseline.

Fifty et al. (2021) measure how a step on one task's gradient changes every
other task's loss, on the same batch. With shared parameters
``theta_s``, task parameters ``theta_j`` and the optimiser's update ``u_i``
for task ``i``'s gradient alone (at the current optimiser state, not
committed), the lookahead affinity of task ``i`` onto task ``j`` is

.. math::

  Z_{i \\to j} = 1 - \\frac{L_j(\\theta_s + u_i, \\theta_j)}
                         {L_j(\\theta_s, \\theta_j)} ,
  \\qquad u_i = \\operatorname{update}(\\nabla_{\\theta_s} L_i,
                                     \\text{opt\\_state}) ,

(for plain SGD ``u_i = -eta grad_s L_i``). Only the shared parameters move;
the heads keep their values. ``Z > 0``: task ``i``'s step lowers task
``j``'s loss.

Cost of one affinity step, as computed here: the ``K`` source gradients
(``K`` backward passes, or ``K`` encoder pullbacks of the gradients at the
shared representation when the training step already has them, see
``grads``), then ``K`` lookahead forward passes, ``vmap``-ed (or in chunks of
``batch_size``, or unrolled), all inside the caller's ``jax.jit``. ``linearize=True``
replaces the forward passes by the first-order expansion
``Z_ij ~ -<grad_s L_j, u_i> / L_j``: ``K^2`` inner products of gradients the
step already holds, exact as the step size goes to zero and biased by
``O(|u|^2)`` otherwise.

The official code divides ``Z`` by the learning rate. Here that is the
``step_size`` option, off by default: undivided, ``Z`` is the paper's
definition (Eq. 1), a dimensionless relative change in loss, and its average
over training weighs each step by what it actually did to the losses. Under
a constant learning rate the two differ by a constant factor and select the
same groups; after a decay, dividing re-weights the later epochs upwards.

References:
  Fifty, Amid, Zhao, Yu, Anil, Finn, "Efficiently Identifying Task Groupings
  for Multi-Task Learning", NeurIPS 2021, https://arxiv.org/abs/2109.04617.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mgda_jax._src.core import checks
from mgda_jax._src.core import gram as gram_lib
from mgda_jax._src.core import inputs


class Affinity(NamedTuple):
  """One batch's lookahead affinity.

  Attributes:
    affinity: ``(K, K)``, ``[i, j] = Z_{i->j}``: row ``i`` is the source
      task whose step is taken, column ``j`` the task whose loss is read.
      NaN where it is undefined (see :func:`lookahead_affinity`).
    losses: ``(K,)``, ``L_j`` at the current parameters.
    lookahead_losses: ``(K, K)``, ``[i, j] = L_j`` after task ``i``'s step
      (NaN with ``linearize``: no forward pass is taken).
    finite: whether every entry of ``affinity`` is finite.
  """

  affinity: jax.Array
  losses: jax.Array
  lookahead_losses: jax.Array
  finite: jax.Array


def _tree_inner(a, b) -> jax.Array:
  """``[i, j] = <a_i, b_j>`` over pytrees with a leading task axis."""
  out = 0.0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    out = out + jnp.einsum('i...,j...->ij', x.reshape(x.shape[0], -1),
                           y.reshape(y.shape[0], -1),
                           precision=jax.lax.Precision.HIGHEST)
  return out


def shared_task_grads(grads, params, shared) -> Any:
  """Each task's gradient on the shared parameters (zero elsewhere).

  Args:
    grads: per-task gradients shaped like ``params`` with a leading task
      axis (:func:`mgda_jax.per_task_grads`, ``jax.jacrev``), or a
      :class:`mgda_jax.RepresentationGrads`, whose per-task gradients at
      ``Z`` are pulled back through the encoder (``K`` encoder VJPs, no
      forward pass: exactly the parameter gradients of the parameters that
      reach the losses only through ``Z``).
    params: the parameters.
    shared: the shared parameters: None (all), a pytree (prefix) of bools,
      or ``params -> mask``, as :func:`mgda_jax.mgda`'s ``shared``.

  Returns:
    A pytree shaped like ``params`` with a leading task axis.
  """
  if isinstance(grads, inputs.RepresentationGrads):
    grads = jax.vmap(grads.pullback)(grads.rep_grads)
  mask = checks.resolve_shared(shared, params, params, 'shared_task_grads')
  return jax.tree.map(lambda g, m: g if m else jnp.zeros_like(g), grads,
                      _expand_mask(mask, grads))


def _expand_mask(mask, tree):
  return jax.tree.map(lambda m, _: m, mask, tree)


def lookahead_affinity(loss_fn: Callable[..., Any], params, *args,
                       optimizer: optax.GradientTransformation, opt_state,
                       shared=None, grads=None, losses=None,
                       step_size=None, linearize: bool = False,
                       has_aux: bool = False,
                       batch_size: int | None = None,
                       unroll: bool = False) -> Affinity:
  """The ``(K, K)`` lookahead affinity of one batch (Fifty et al. 2021).

  A pure function: jit it, or call it inside a jitted training step (see
  :func:`affinity_average` for the running average over training).

  Args:
    loss_fn: ``loss_fn(params, *args) -> (K,)`` task losses (or ``(losses,
      aux)`` with ``has_aux``). It is called on the lookahead parameters with
      the same ``args``, so a dropout key in ``args`` gives the lookahead the
      same masks, and BatchNorm in training mode the lookahead's own batch
      statistics (as the official code does).
    params: the parameters.
    *args: the batch (and keys), passed to ``loss_fn``.
    optimizer: the optimiser whose update ``u_i`` is taken for each task's
      gradient alone, e.g. the training run's ``optax.sgd(lr, momentum)``
      (``u_i = -lr (g_i + mu m)``). Use the bare optimiser, not one wrapped
      in ``optax.apply_if_finite``: that would turn a non-finite gradient
      into a zero update and so into a finite affinity.
    opt_state: its current state (read, never updated).
    shared: which parameters take the lookahead step: None (all), a pytree
      (prefix) of bools, or ``params -> mask``. The others keep their values.
    grads: the per-task gradients if the training step has them already:
      a pytree with a leading task axis, or a
      :class:`mgda_jax.RepresentationGrads` (MGDA-UB's input; see
      :func:`shared_task_grads`). Default: computed here with
      :func:`mgda_jax.per_task_grads` (one forward, ``K`` backward passes).
    losses: the ``(K,)`` losses at ``params`` (required with ``grads``).
    step_size: divide ``Z`` by this (the official code's division by the
      learning rate); default None, the paper's undivided ``Z``.
    linearize: the first-order expansion instead of the forward passes.
    has_aux: whether ``loss_fn`` returns ``(losses, aux)``.
    batch_size: run the ``K`` lookahead forward passes this many at a time
      (``jax.lax.map``) to bound memory; default all ``K`` at once
      (``vmap``).
    unroll: one forward pass per task, unrolled in the program (the
      official code's structure). ``vmap`` over the parameters turns each
      convolution into a grouped one, which XLA:CPU runs slowly: a
      MultiLeNet training step with the affinity at K = 9 took 596 ms
      vmapped and 450 ms unrolled on CPU (``BENCHMARKS.md``).

  Returns:
    An :class:`Affinity`. ``Z_{i->j}`` is NaN where ``L_j`` is not finite or
    not positive at ``params`` (the ratio is undefined; task losses such as
    cross-entropy and squared error are positive), or where ``L_j`` after
    task ``i``'s step is not finite (a NaN gradient of task ``i`` gives a
    NaN row): never a silently finite value. ``finite`` says whether all
    ``K^2`` entries are finite.

  Raises:
    ValueError: if ``grads`` is given without ``losses``, or the losses are
      not a ``(K,)`` floating vector.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from mgda_jax import tag
    >>> # Two quadratic tasks on one shared vector: L_j = |w - c_j|^2 + 1.
    >>> c = jnp.array([[1., 0.], [1., 1.]])
    >>> loss = lambda w: jnp.sum((w - c) ** 2, axis=1) + 1.0
    >>> opt = optax.sgd(0.1)
    >>> w = jnp.zeros(2)
    >>> out = tag.lookahead_affinity(loss, w, optimizer=opt,
    ...                              opt_state=opt.init(w))
    >>> # [i, j]: task i's step onto task j's loss
    >>> [[round(float(v), 4) for v in row] for row in out.affinity]
    [[0.18, 0.12], [0.16, 0.24]]
  """
  if grads is None:
    if losses is not None:
      raise ValueError('lookahead_affinity: losses is given without grads; '
                       'pass both or neither.')
    losses, grads = inputs.per_task_grads(loss_fn, params, *args,
                                          has_aux=has_aux)
    if has_aux:
      losses = losses[0]
  elif losses is None:
    raise ValueError('lookahead_affinity: grads is given without losses; '
                     'pass the (K,) losses at params too.')
  inputs.check_losses_output(losses, 'lookahead_affinity losses', False)
  k = losses.shape[0]
  task_grads = shared_task_grads(grads, params, shared)
  kg = gram_lib.num_tasks(task_grads, 'grads')
  if kg != k:
    raise ValueError(f'lookahead_affinity: grads hold {kg} tasks but losses '
                     f'{k}.')
  mask = checks.resolve_shared(shared, params, params, 'lookahead_affinity')

  def update(g):
    u, _ = optimizer.update(g, opt_state, params)
    # Only the shared parameters step (the optimiser may move others, e.g.
    # by momentum, even at a zero gradient).
    return jax.tree.map(lambda x, m: x if m else jnp.zeros_like(x), u,
                        _expand_mask(mask, u))

  updates = jax.vmap(update)(task_grads)
  valid = jnp.isfinite(losses) & (losses > 0)
  safe = jnp.where(valid, losses, 1.0)
  if linearize:
    # 1 - L_j(theta + u_i) / L_j = -<grad L_j, u_i> / L_j + O(|u_i|^2).
    z = -_tree_inner(updates, task_grads) / safe[None, :]
    after = jnp.full((k, k), jnp.nan, losses.dtype)
  else:
    def look(u):
      out = loss_fn(optax.apply_updates(params, u), *args)
      return out[0] if has_aux else out

    if unroll:
      after = jnp.stack([look(jax.tree.map(lambda u: u[i], updates))
                         for i in range(k)])
    elif batch_size is None:
      after = jax.vmap(look)(updates)
    else:
      after = jax.lax.map(look, updates, batch_size=batch_size)
    z = 1.0 - after / safe[None, :]
  ok = valid[None, :] & jnp.isfinite(z)
  z = jnp.where(ok, z, jnp.nan).astype(losses.dtype)
  if step_size is not None:
    z = z / step_size
  return Affinity(affinity=z, losses=losses, lookahead_losses=after,
                  finite=jnp.all(jnp.isfinite(z)))


def representation_affinity(grads, losses) -> jax.Array:
  """TAG's affinity from the gradients at the shared representation alone.

  MGDA-UB's trick applied to TAG: the first-order affinity is
  ``Z_ij ~ -<grad_s L_j, u_i> / L_j``, and for plain SGD
  ``<grad_s L_j, grad_s L_i> = <r_j, J J^T r_i>`` with ``r_t = dL_t/dZ`` and
  ``J = dZ/dtheta_s``. Replacing ``J J^T`` by a multiple of the identity
  (exact when the encoder's Jacobian has orthonormal rows) gives

  .. math::

    \\tilde Z_{ij} = \\frac{\\langle r_i, r_j \\rangle}{L_j} ,

  the affinity up to the positive factor ``eta c``, from the Gram matrix at
  Z that MGDA-UB computes anyway: no pullback, no forward pass. A clearly
  approximate route, for the selection only (which a global positive scale
  does not change). A momentum term ``mu <grad_s L_j, m>`` would add a
  constant to column ``j``, the same for every source, which does not change
  which multi-task group serves ``j`` best either.

  Args:
    grads: a :class:`mgda_jax.RepresentationGrads`, or per-task gradients
      at Z (a pytree with a leading task axis).
    losses: the ``(K,)`` losses.

  Returns:
    ``(K, K)``; NaN in the column of a loss that is not finite or not
    positive, and wherever the gradients are not finite.
  """
  if isinstance(grads, inputs.RepresentationGrads):
    grads = grads.rep_grads
  g = gram_lib.gram_matrix(grads)
  losses = jnp.asarray(losses)
  valid = jnp.isfinite(losses) & (losses > 0)
  z = g / jnp.where(valid, losses, 1.0)[None, :]
  return jnp.where(valid[None, :] & jnp.isfinite(z), z, jnp.nan)


def cosine_affinity(grads, params=None, shared=None) -> jax.Array:
  """The cosine similarity of the task gradients on the shared parameters.

  .. math::

    C_{ij} = \\frac{\\langle g_i, g_j \\rangle}{\\|g_i\\| \\, \\|g_j\\|}

  TAG's "CS" baseline. (The official CelebA code keeps only the kernels,
  leaves with more than one axis; this uses every shared leaf.)

  Args:
    grads: per-task gradients (a pytree with a leading task axis) or a
      :class:`mgda_jax.RepresentationGrads` (pulled back to the parameters).
    params: the parameters (needed with ``shared`` or ``RepresentationGrads``
      only to resolve the mask; default: the structure of ``grads``).
    shared: the shared parameters, as for :func:`lookahead_affinity`.

  Returns:
    ``(K, K)``, symmetric, ones on the diagonal; NaN in the row and column
    of a task whose gradient is zero or not finite.

  Example:
    >>> import jax.numpy as jnp
    >>> from mgda_jax import tag
    >>> tag.cosine_affinity(jnp.array([[1., 0.], [1., 1.]])).round(4)
    Array([[1.    , 0.7071],
           [0.7071, 1.    ]], dtype=float32)
  """
  if isinstance(grads, inputs.RepresentationGrads):
    if params is None:
      raise ValueError('cosine_affinity: pass params with RepresentationGrads.')
    grads = jax.vmap(grads.pullback)(grads.rep_grads)
  if params is None:
    params = jax.tree.map(lambda g: g[0], grads)
  task_grads = shared_task_grads(grads, params, shared)
  g = gram_lib.gram_matrix(task_grads)
  norms = jnp.sqrt(jnp.diag(g))
  ok = (norms > 0) & jnp.isfinite(norms)
  safe = jnp.where(ok, norms, 1.0)
  c = g / (safe[:, None] * safe[None, :])
  return jnp.where(ok[:, None] & ok[None, :], c, jnp.nan)


class AffinityAverageState(NamedTuple):
  """The running sums of :func:`affinity_average` (optimizer-state style).

  Attributes:
    step: training steps seen (recorded or not), int32.
    total: ``(K, K)`` sum of the finite affinities recorded this epoch.
    count: affinities recorded this epoch, int32.
    skipped: affinity steps skipped this epoch because some entry was not
      finite, int32.
  """

  step: jax.Array
  total: jax.Array
  count: jax.Array
  skipped: jax.Array


class AffinityAverage(NamedTuple):
  """The running average of :func:`affinity_average`.

  Attributes:
    init: ``init(num_tasks, dtype=float32) -> state``.
    update: ``update(state, affinity_fn) -> state``: computes and records
      ``affinity_fn()`` on due steps (under ``jax.lax.cond`` when
      ``every > 1``), and advances the step.
    add: ``add(state, affinity) -> state``: records ``affinity`` (if finite)
      and advances the step; for a schedule kept on the host.
    skip: ``skip(state) -> state``: advances the step only.
    due: ``due(state) -> bool``: whether the current step is due.
  """

  init: Callable[..., AffinityAverageState]
  update: Callable[[AffinityAverageState, Callable[[], jax.Array]],
                   AffinityAverageState]
  add: Callable[[AffinityAverageState, jax.Array], AffinityAverageState]
  skip: Callable[[AffinityAverageState], AffinityAverageState]
  due: Callable[[AffinityAverageState], jax.Array]


def affinity_average(every: int = 1) -> AffinityAverage:
  """A running average of the affinity, computed every ``every`` steps.

  ``update(state, affinity_fn)`` calls ``affinity_fn()`` (a ``(K, K)``
  affinity, e.g. ``lambda: lookahead_affinity(...).affinity``) on steps
  ``0, every, 2 every, ...``. With ``every > 1`` it does so under
  ``jax.lax.cond``, so that the other steps do not compute it. On XLA:CPU a
  computation inside ``lax.cond`` (as inside ``lax.scan``) can run several
  times slower than at the top level (8x for a MultiLeNet lookahead whose
  convolution gradients XLA:CPU did not bring into its fast layout inside
  the branch; ``BENCHMARKS.md``). For such a model keep the schedule on the
  host: compile one step that calls ``add(state, affinity)`` and one that
  calls ``skip(state)``, and pick by the step number (or ``due(state)``).

  An affinity with a non-finite entry is not added; it is counted in
  ``skipped``. Read the epoch's mean with :func:`epoch_affinity`, then
  start the next epoch with :func:`reset_epoch`; :func:`average_affinity`
  averages the epoch means (TAG's averaging: per epoch, then over epochs).

  Args:
    every: the period, in steps (1 for TAG's CelebA code, 10 for its
      Taskonomy code).

  Returns:
    An :class:`AffinityAverage`.

  Example:
    >>> import jax.numpy as jnp
    >>> from mgda_jax import tag
    >>> avg = tag.affinity_average(every=2)
    >>> s = avg.init(2)
    >>> for v in (1., 5., 3.):   # steps 0, 1, 2: steps 0 and 2 are recorded
    ...   s = avg.update(s, lambda: jnp.full((2, 2), v))
    >>> tag.epoch_affinity(s)
    Array([[2., 2.],
           [2., 2.]], dtype=float32)
  """
  if not isinstance(every, int) or every < 1:
    raise ValueError(f'affinity_average: every must be an int >= 1; got '
                     f'{every!r}.')

  def init(num_tasks: int, dtype=jnp.float32) -> AffinityAverageState:
    checks.check_num_tasks(num_tasks, 'affinity_average')
    zero = jnp.zeros((), jnp.int32)
    return AffinityAverageState(step=zero,
                                total=jnp.zeros((num_tasks, num_tasks), dtype),
                                count=zero, skipped=zero)

  def checked(state, z):
    z = jnp.asarray(z)
    if z.shape != state.total.shape:
      raise ValueError(f'affinity_average: the affinity has shape {z.shape}; '
                       f'the state holds {state.total.shape}.')
    return z.astype(state.total.dtype)

  def record(state, z, is_due):
    finite = jnp.all(jnp.isfinite(z))
    ok = is_due & finite
    return AffinityAverageState(
        step=state.step + 1,
        total=state.total + jnp.where(ok, z, 0.0),
        count=state.count + ok.astype(jnp.int32),
        skipped=state.skipped + (is_due & ~finite).astype(jnp.int32))

  def due(state):
    return state.step % every == 0

  def add(state, affinity):
    return record(state, checked(state, affinity), jnp.asarray(True))

  def skip(state):
    return state._replace(step=state.step + 1)

  def update(state, affinity_fn):
    if every == 1:
      return add(state, affinity_fn())
    shape, dtype = state.total.shape, state.total.dtype
    is_due = due(state)
    z = jax.lax.cond(is_due, lambda: checked(state, affinity_fn()),
                     lambda: jnp.zeros(shape, dtype))
    return record(state, z, is_due)

  return AffinityAverage(init, update, add, skip, due)


def epoch_affinity(state: AffinityAverageState) -> jax.Array:
  """The mean recorded affinity since the last reset; NaN if none was."""
  return jnp.where(state.count > 0, state.total / jnp.maximum(state.count, 1),
                   jnp.nan)


def reset_epoch(state: AffinityAverageState) -> AffinityAverageState:
  """Zeroes the sums for the next epoch; the step count (the schedule) goes
  on."""
  zero = jnp.zeros_like(state.count)
  return state._replace(total=jnp.zeros_like(state.total), count=zero,
                        skipped=zero)


def average_affinity(epoch_means, drop_last: int = 0) -> jax.Array:
  """TAG's training-averaged affinity: the mean of the per-epoch means.

  Args:
    epoch_means: ``(E, K, K)``, one :func:`epoch_affinity` per epoch.
    drop_last: leave out the last epochs (the official CelebA code drops the
      10 epochs of its early-stopping window).

  Returns:
    ``(K, K)``. Epochs with no recorded step (all NaN) are left out.

  Raises:
    ValueError: if no epoch is left with a recorded affinity.
  """
  z = jnp.asarray(epoch_means)
  if z.ndim != 3 or z.shape[1] != z.shape[2]:
    raise ValueError(f'average_affinity: epoch_means must be (E, K, K); got '
                     f'{z.shape}.')
  if drop_last:
    z = z[:-drop_last] if drop_last < z.shape[0] else z[:0]
  kept = jnp.all(jnp.isfinite(z), axis=(1, 2))
  if not bool(jnp.any(kept)):
    raise ValueError('average_affinity: no epoch with a finite affinity is '
                     f'left (epochs: {jnp.asarray(epoch_means).shape[0]}, '
                     f'drop_last={drop_last}).')
  return jnp.mean(z[kept], axis=0)
