"""Sluice networks (Ruder et al. 2019): subspaces, alpha and beta units."""

from typing import Callable, Mapping, Sequence

from flax import nnx
import jax.numpy as jnp
import numpy as np

from mgda_jax._src.nn import base

Factory = Callable[[nnx.Rngs], nnx.Module]


def alpha_init(num_tasks: int, num_subspaces: int,
               scheme: str = 'imbalanced') -> np.ndarray:
  """The ``(K M, K M)`` initial alpha matrix (index ``t * M + m``).

  ``'balanced'``: every entry ``1 / (K M)``. ``'imbalanced'``: ``0.9 / M``
  between subspaces of the same task and ``0.1 / ((K - 1) M)`` across tasks
  (rows sum to one; for ``M = 1`` this is the reference code's 0.9 diagonal
  and ``0.1 / (K - 1)`` elsewhere).
  """
  k, m = num_tasks, num_subspaces
  if scheme == 'balanced' or k == 1:
    return np.full((k * m, k * m), 1.0 / (k * m), np.float32)
  if scheme != 'imbalanced':
    raise ValueError(f"alpha scheme must be 'balanced' or 'imbalanced'; got "
                     f'{scheme!r}.')
  same = np.kron(np.eye(k), np.ones((m, m)))
  return np.where(same > 0, 0.9 / m, 0.1 / ((k - 1) * m)).astype(np.float32)


def beta_init(num_layers: int, scheme: str = 'balanced') -> np.ndarray:
  """The ``(L,)`` initial beta of one task: ``'balanced'`` ``1 / L``;
  ``'imbalanced'`` 0.9 on the last layer and ``0.1 / (L - 1)`` on the others
  (the reference code's two schemes)."""
  if scheme == 'balanced' or num_layers == 1:
    return np.full((num_layers,), 1.0 / num_layers, np.float32)
  if scheme != 'imbalanced':
    raise ValueError(f"beta scheme must be 'balanced' or 'imbalanced'; got "
                     f'{scheme!r}.')
  b = np.full((num_layers,), 0.1 / (num_layers - 1), np.float32)
  b[-1] = 0.9
  return b


def subspace_penalty(g: jnp.ndarray, num_subspaces: int) -> jnp.ndarray:
  """``sum_{m < n} ||G_m^T G_n||_F^2`` of one layer's output ``(B, ..., d)``:
  ``G_m`` is subspace ``m`` (the ``m``-th block of ``d / M`` features) with
  every leading axis flattened into rows."""
  d = g.shape[-1]
  gs = g.reshape(-1, num_subspaces, d // num_subspaces)
  total = 0.0
  for a in range(num_subspaces):
    for b in range(a + 1, num_subspaces):
      total = total + jnp.sum((gs[:, a].T @ gs[:, b]) ** 2)
  return total


class Sluice(base.MTLArchitecture):
  """Sluice network: task columns whose subspaces are mixed by alpha, and
  per-task mixtures of the layers by beta (Ruder et al. 2019).

  Column ``t``'s layer ``l`` output ``h_{t,l}`` is split into ``M`` subspaces
  ``h_{t,l,1..M}`` (blocks of the last axis); an alpha unit mixes all tasks'
  subspaces,

  .. math::

    [\\tilde h_{1,l,1}, \\dots, \\tilde h_{K,l,M}]^\\top
    = \\alpha_l \\, [h_{1,l,1}, \\dots, h_{K,l,M}]^\\top, \\qquad
    \\alpha_l \\in \\mathbb{R}^{KM \\times KM},

  and the next layer of column ``t`` reads ``h~_{t,l}``. A beta unit per
  task mixes the (stitched) layer outputs, ``h~_t = sum_l beta_{t,l}
  h~_{t,l}``, and **the decoder goes after it**: ``decoders[t]`` maps
  ``h~_t`` to task ``t``'s prediction. Every layer output must have the same
  shape (beta sums them). :meth:`orthogonality_penalty` is the subspace
  constraint ``L_c = sum_t sum_l ||G_{t,l,1}^T G_{t,l,2}||_F^2`` (all pairs of
  subspaces for ``M > 2``), to be added to the training loss with a weight.

  Initialisation, as in the reference code (sebastianruder/sluice-networks,
  ``predictors.py``): alpha 'imbalanced' (see :func:`alpha_init`; the code's
  default for its cross-stitch layers) and beta 'balanced' ``1 / L`` (its
  default for layer-stitch units).

  **Shared parameters.** Every column layer and every alpha reaches every
  task through alpha's cross-task entries, so ``is_shared`` is True for
  ``columns`` and ``alphas``; task-specific are ``betas[t]`` and
  ``decoders``. The representation ``Z`` is the tuple over layers of the
  stitched outputs, each per task ``(K, B, ..., d)``; decoder ``t`` reads
  ``Z[l][t]`` for every ``l`` through its own beta. Both paths apply
  (MGDA-UB on ``dL_t/dZ``, full MGDA on the columns' and alphas' parameter
  gradients). As for cross-stitch, ``dL_t/dZ`` lives in task ``t``'s slots
  only, so the Gram matrix at ``Z`` is diagonal and MGDA-UB weights
  ``alpha_t proportional to 1 / ||dL_t/dZ||^2``; full MGDA sees how the
  columns interact.

  The penalty: the paper constrains the subspaces to be orthogonal; the
  reference code evaluates it on two of each LSTM layer's weight matrices,
  split into subspaces by rows. Blocks here are arbitrary modules, so the
  penalty is evaluated on the layers' outputs before alpha mixing (``G``:
  the batch (and any further leading axes) by ``d / M`` features).

  Args:
    blocks: one factory ``rngs -> module`` per layer (each column calls it
      once); every output has the same shape, last axis divisible by
      ``num_subspaces``.
    decoders: one module per task (list, or dict task name -> module).
    rngs: passed to the factories.
    num_subspaces: ``M`` (the paper uses 2).
    alpha: ``'imbalanced'``, ``'balanced'``, or an explicit ``(K M, K M)``
      array for every layer.
    beta: ``'balanced'``, ``'imbalanced'``, or an explicit ``(L,)`` array for
      every task.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import mgda_jax.nn
    >>> rngs = nnx.Rngs(0)
    >>> model = mgda_jax.nn.Sluice(
    ...     blocks=[lambda rngs: nnx.Linear(4, 4, rngs=rngs)] * 2,
    ...     decoders=[nnx.Linear(4, 1, rngs=rngs) for _ in range(2)],
    ...     rngs=rngs)
    >>> x = jnp.ones((5, 4))
    >>> [o.shape for o in model(x)], model.orthogonality_penalty(x).shape
    ([(5, 1), (5, 1)], ())

  References:
    Ruder, Bingel, Augenstein, Sogaard, Latent Multi-task Architecture
    Learning, AAAI 2019, arXiv:1705.08142 (first titled "Sluice networks:
    Learning what to share between loosely related tasks").
  """

  def __init__(self, blocks: Sequence[Factory],
               decoders: Sequence[nnx.Module] | Mapping[str, nnx.Module], *,
               rngs: nnx.Rngs, num_subspaces: int = 2,
               alpha='imbalanced', beta='balanced'):
    self.decoders, self.task_names, self.as_dict = base.task_container(
        decoders, 'Sluice decoders')
    blocks = list(blocks)
    if not blocks:
      raise ValueError('Sluice needs at least one block.')
    if num_subspaces < 1:
      raise ValueError(f'num_subspaces must be >= 1; got {num_subspaces}.')
    k, n_layers = len(self.task_names), len(blocks)
    self.num_subspaces = num_subspaces
    self.columns = nnx.List([nnx.List([b(rngs) for _ in range(k)])
                             for b in blocks])
    a = (alpha_init(k, num_subspaces, alpha) if isinstance(alpha, str)
         else np.asarray(alpha, np.float32))
    if a.shape != (k * num_subspaces,) * 2:
      raise ValueError(f'alpha must be ({k * num_subspaces}, '
                       f'{k * num_subspaces}); got {a.shape}.')
    b = (beta_init(n_layers, beta) if isinstance(beta, str)
         else np.asarray(beta, np.float32))
    if b.shape != (n_layers,):
      raise ValueError(f'beta must be ({n_layers},); got {b.shape}.')
    self.alphas = nnx.List([nnx.Param(jnp.asarray(a))
                            for _ in range(n_layers)])
    self.betas = nnx.List([nnx.Param(jnp.asarray(b)) for _ in range(k)])

  def _mix(self, alpha, stacked):
    """alpha over the (task, subspace) pairs of ``(K, ..., d)``."""
    k, m, d = self.num_tasks, self.num_subspaces, stacked.shape[-1]
    if d % m:
      raise ValueError(f'Sluice: the layer width {d} is not divisible by '
                       f'num_subspaces={m}.')
    s = stacked.reshape(stacked.shape[:-1] + (m, d // m))     # (K,...,M,d/M)
    s = jnp.moveaxis(s, -2, 1)                                # (K,M,...,d/M)
    s = s.reshape((k * m,) + s.shape[2:])
    out = jnp.einsum('ij,j...->i...', alpha, s)
    out = jnp.moveaxis(out.reshape((k, m) + out.shape[1:]), 1, -2)
    return out.reshape(stacked.shape)

  def _forward(self, x):
    h = [x] * self.num_tasks
    raw, mixed = [], []
    for column, alpha in zip(self.columns, self.alphas):
      out = jnp.stack([column[t](h[t]) for t in range(self.num_tasks)])
      raw.append(out)
      out = self._mix(alpha[...], out)
      mixed.append(out)
      h = list(out)
    shapes = {m.shape for m in mixed}
    if len(shapes) > 1:
      raise ValueError('Sluice: beta sums the layer outputs, so every block '
                       f'must give the same shape; got {sorted(shapes)}.')
    return raw, tuple(mixed)

  def represent(self, x):
    return self._forward(x)[1]

  def decode_task(self, task, z, x):
    del x
    beta = self.betas[task][...]
    h = sum(beta[l] * z[l][task] for l in range(len(z)))
    return base.task_part(self.decoders, self.task_names, self.as_dict,
                          task)(h)

  def orthogonality_penalty(self, x):
    """``sum_{t, l} sum_{m < n} ||G_{t,l,m}^T G_{t,l,n}||_F^2`` on the column
    outputs (before alpha) for input ``x``; a scalar."""
    raw, _ = self._forward(x)
    return sum(subspace_penalty(out[t], self.num_subspaces)
               for out in raw for t in range(self.num_tasks))

  def is_shared(self, path):
    return path[:1] in (('columns',), ('alphas',))
