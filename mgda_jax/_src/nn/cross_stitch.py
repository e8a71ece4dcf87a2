"""Cross-stitch networks (Misra et al. 2016): task columns mixed linearly."""

from typing import Callable, Mapping, Sequence

from flax import nnx
import jax.numpy as jnp
import numpy as np

from mgda_jax._src.nn import base

Factory = Callable[[nnx.Rngs], nnx.Module]


def stitch_init(num_tasks: int, alpha_same: float = 0.9,
                alpha_other: float | None = None) -> np.ndarray:
  """The ``(K, K)`` initial cross-stitch matrix: ``alpha_same`` on the
  diagonal, ``alpha_other`` (default ``(1 - alpha_same) / (K - 1)``, so rows
  sum to one) elsewhere."""
  if num_tasks == 1:
    return np.ones((1, 1), np.float32)
  if alpha_other is None:
    alpha_other = (1.0 - alpha_same) / (num_tasks - 1)
  a = np.full((num_tasks, num_tasks), alpha_other, np.float32)
  np.fill_diagonal(a, alpha_same)
  return a


def stitch(alpha, stacked):
  """``x~_t = sum_s alpha[t, s] x_s`` over the leading task axis.

  ``alpha`` is ``(K, K)`` or channel-wise ``(K, K, C)`` (``C`` the last axis
  of the features).
  """
  if alpha.ndim == 2:
    return jnp.einsum('ts,s...->t...', alpha, stacked)
  return jnp.einsum('tsc,s...c->t...c', alpha, stacked)


class CrossStitch(base.MTLArchitecture):
  """One network column per task, mixed by a cross-stitch unit after every
  block.

  For two tasks A, B and activations ``x_A, x_B`` of a layer, a cross-stitch
  unit computes, at every location (Misra et al. 2016, Eq. 1),

  .. math::

    \\begin{bmatrix} \\tilde x_A \\\\ \\tilde x_B \\end{bmatrix} =
    \\begin{bmatrix} \\alpha_{AA} & \\alpha_{AB} \\\\
                     \\alpha_{BA} & \\alpha_{BB} \\end{bmatrix}
    \\begin{bmatrix} x_A \\\\ x_B \\end{bmatrix};

  for ``K`` tasks ``x~_t = sum_s alpha_ts x_s`` with a learned ``(K, K)``
  matrix per unit (or ``(K, K, C)``, one per channel, with
  ``channel_wise``). Here block ``l`` of column ``t`` is ``blocks[l](rngs)``,
  a unit follows every block, and **the decoder goes after the last unit**:
  ``decoders[t]`` maps column ``t``'s stitched output to task ``t``'s
  prediction (put non-stitched task layers there).

  Initialisation: ``alpha_same = 0.9`` on the diagonal and ``0.1 / (K -
  1)`` elsewhere, as in the reference cross-stitch layer of Ruder et al.'s
  sluice-network code (``predictors.py``, ``CrossStitchLayer``, 'imbalanced'
  scheme, whose rows sum to one). Misra et al. study initialisations of the
  same-task and different-task weights ``(alpha_S, alpha_D)`` in ``[0, 1]``
  (their Sec. 4, "Design decisions for cross-stitching"); pass
  ``alpha_same``/``alpha_other`` for another pair. (LibMTL's
  ``Cross_stitch`` and the MTAN repository's cross-stitch baseline start
  from all ones.) With ``alpha = I`` the columns are independent networks.

  **Shared parameters.** No layer is shared by weights, but every block and
  every unit reaches every task's loss through the units' off-diagonal
  entries, so in the MGDA sense all of them are *shared*: ``is_shared`` is
  True for ``columns`` and ``units``, False for ``decoders``. The
  representation ``Z`` is the last unit's output, per task, ``(K, B, ...)``;
  decoder ``t`` reads ``Z[t]``. Both paths apply: MGDA-UB on
  ``dL_t/dZ`` (``Z`` per task: the bound holds as for any ``Z``), and full
  MGDA on the parameter gradients of the columns and units. Since
  ``dL_t/dZ`` is non-zero in slot ``t`` only, the Gram matrix at ``Z`` is
  diagonal and MGDA-UB's weights are the closed form ``alpha_t proportional
  to 1 / ||dL_t/dZ||^2`` (the min-norm point of orthogonal vectors): the
  upper bound ignores how the columns interact through the units. Full
  MGDA, on the parameter gradients, sees that interaction. At ``alpha = I``
  task ``s``'s gradient of column ``t != s`` is zero, and MGDA reduces to
  independent training.

  Args:
    blocks: one factory ``rngs -> module`` per layer; each task's column
      calls it once, so all columns have the same shapes.
    decoders: one module per task (list, or dict task name -> module).
    rngs: passed to the factories.
    alpha_same: the initial diagonal.
    alpha_other: the initial off-diagonal (default ``(1 - alpha_same) / (K -
      1)``).
    channel_wise: one ``(K, K)`` matrix per channel, so ``channels`` is
      needed.
    channels: the output channels (last axis) of each block, for
      ``channel_wise``.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import mgda_jax.nn
    >>> rngs = nnx.Rngs(0)
    >>> model = mgda_jax.nn.CrossStitch(
    ...     blocks=[lambda rngs: nnx.Linear(3, 8, rngs=rngs),
    ...             lambda rngs: nnx.Linear(8, 8, rngs=rngs)],
    ...     decoders=[nnx.Linear(8, 1, rngs=rngs) for _ in range(2)],
    ...     rngs=rngs)
    >>> [o.shape for o in model(jnp.ones((5, 3)))]
    [(5, 1), (5, 1)]
    >>> model.units[0][...]
    Array([[0.9, 0.1],
           [0.1, 0.9]], dtype=float32)

  References:
    Misra, Shrivastava, Gupta, Hebert, Cross-stitch Networks for Multi-task
    Learning, CVPR 2016, arXiv:1604.03539.
  """

  def __init__(self, blocks: Sequence[Factory],
               decoders: Sequence[nnx.Module] | Mapping[str, nnx.Module], *,
               rngs: nnx.Rngs, alpha_same: float = 0.9,
               alpha_other: float | None = None, channel_wise: bool = False,
               channels: Sequence[int] | None = None):
    self.decoders, self.task_names, self.as_dict = base.task_container(
        decoders, 'CrossStitch decoders')
    blocks = list(blocks)
    if not blocks:
      raise ValueError('CrossStitch needs at least one block.')
    k = len(self.task_names)
    self.columns = nnx.List([nnx.List([b(rngs) for _ in range(k)])
                             for b in blocks])
    a = stitch_init(k, alpha_same, alpha_other)
    if channel_wise:
      if channels is None or len(channels) != len(blocks):
        raise ValueError('CrossStitch(channel_wise=True) needs channels, one '
                         f'per block ({len(blocks)}); got {channels}.')
      units = [np.repeat(a[:, :, None], c, axis=2) for c in channels]
    else:
      units = [a] * len(blocks)
    self.units = nnx.List([nnx.Param(jnp.asarray(u)) for u in units])

  def represent(self, x):
    h = [x] * self.num_tasks
    for column, unit in zip(self.columns, self.units):
      out = stitch(unit[...], jnp.stack([column[t](h[t])
                                         for t in range(self.num_tasks)]))
      h = list(out)
    return out

  def decode_task(self, task, z, x):
    del x
    return base.task_part(self.decoders, self.task_names, self.as_dict,
                          task)(z[task])

  def is_shared(self, path):
    return path[:1] in (('columns',), ('units',))
