"""Gram matrices of per-task gradients, and the task-axis check."""

import jax
import jax.numpy as jnp

from mgda_jax._src.core import devices
from mgda_jax._src.core import dtypes


def num_tasks(task_tree, name: str = 'task_grads') -> int:
  """The size ``K`` of the leading task axis shared by every leaf.

  Args:
    task_tree: a pytree whose array leaves all have a leading axis of size K.
    name: what to call the tree in error messages.

  Returns:
    ``K``, a Python int (static).

  Raises:
    ValueError: at trace time, if the tree has no leaves, a leaf is a scalar
      or not an array, the leading axes disagree, or ``K == 0``.
  """
  leaves = jax.tree_util.tree_leaves_with_path(task_tree)
  if not leaves:
    raise ValueError(f'{name} has no array leaves; expected a pytree whose '
                     'leaves have a leading task axis.')
  sizes = {}
  for path, leaf in leaves:
    if not hasattr(leaf, 'shape'):
      raise ValueError(
          f'{name} leaf {jax.tree_util.keystr(path)} is a '
          f'{type(leaf).__name__}, not an array; every leaf must be an array '
          'with a leading task axis of size K.')
    shape = jnp.shape(leaf)
    if not shape:
      raise ValueError(
          f'{name} leaf {jax.tree_util.keystr(path)} is a scalar; every leaf '
          'needs a leading task axis of size K.')
    sizes[jax.tree_util.keystr(path)] = shape[0]
  distinct = set(sizes.values())
  if len(distinct) != 1:
    raise ValueError(
        f'{name} leaves disagree on the leading task axis: {sizes}. Every '
        'leaf must be stacked over the same K tasks.')
  k = distinct.pop()
  if k == 0:
    raise ValueError(f'{name} has zero tasks (leading axis of size 0).')
  return k


def gram_matrix(task_grads) -> jax.Array:
  """The ``(K, K)`` Gram matrix of per-task gradients.

  .. math::

    G_{st} = \\langle g_s, g_t \\rangle = \\sum_{\\text{leaves}}
    \\operatorname{vec}(g_s^{leaf}) \\cdot \\operatorname{vec}(g_t^{leaf})

  Each leaf contributes one contraction over all its non-task axes,
  accumulated in float32 (float64 for float64 leaves) at the highest matmul
  precision, so bfloat16 gradients and TF32-capable GPUs do not degrade the
  Gram matrix. With a batch sharded over an ``Explicit`` mesh the result is
  replicated (XLA all-reduces the per-device blocks).

  Args:
    task_grads: a pytree whose leaves have a leading task axis ``K`` (the
      same for all leaves), e.g. ``jax.jacrev`` of a vector of ``K`` losses,
      or per-task gradients w.r.t. a representation of shape ``(K, B, ...)``.

  Returns:
    The symmetric positive semi-definite Gram matrix, float32 or float64.

  Raises:
    ValueError: at trace time, for an empty tree, mismatched leading axes,
      zero tasks or non-floating leaves.

  Example:
    >>> import jax.numpy as jnp
    >>> import mgda_jax
    >>> grads = {'w': jnp.array([[1.0, 0.0], [1.0, 1.0]]),
    ...          'b': jnp.array([[2.0], [0.0]])}
    >>> mgda_jax.gram_matrix(grads)
    Array([[5., 1.],
           [1., 2.]], dtype=float32)
  """
  k = num_tasks(task_grads)
  leaves = jax.tree_util.tree_leaves(task_grads)
  for leaf in leaves:
    dtypes.solve_dtype(leaf.dtype)  # rejects integer leaves with a message
  dtype = dtypes.solve_dtype(jnp.result_type(*[leaf.dtype for leaf in leaves]))
  gram = jnp.zeros((k, k), dtype)
  for leaf in leaves:
    out_sharding = devices.contract_out_sharding(leaf)
    if leaf.ndim != 2 and out_sharding is None:
      # One (K, n) x (n, K) matrix product: a reshape of a row-major leaf is
      # free, and XLA:CPU runs a product contracting several axes at once
      # 1.3-2.6x slower (BENCHMARKS.md, "Where MGDA-UB's time goes at
      # K = 256"). A leaf sharded on an Explicit mesh keeps its axes, so
      # that its sharding needs no reshape rule.
      leaf = leaf.reshape(k, -1)
    axes = tuple(range(1, leaf.ndim))
    gram = gram + jax.lax.dot_general(
        leaf, leaf, ((axes, axes), ((), ())),
        precision=jax.lax.Precision.HIGHEST, preferred_element_type=dtype,
        out_sharding=out_sharding)
  return gram
