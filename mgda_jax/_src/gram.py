"""Gram matrices of per-task gradients, and task-axis checks."""

import jax
import jax.numpy as jnp

from mgda_jax._src import dtypes


def num_tasks(task_tree, name: str = 'task_grads') -> int:
  """The size ``K`` of the leading task axis shared by every leaf.

  Args:
    task_tree: a pytree whose array leaves all have a leading axis of size K.
    name: what to call the tree in error messages.

  Returns:
    ``K``, a Python int (static).

  Raises:
    ValueError: at trace time, if the tree has no leaves, a leaf is a scalar,
      the leading axes disagree, or ``K == 0``.
  """
  leaves = jax.tree_util.tree_leaves_with_path(task_tree)
  if not leaves:
    raise ValueError(f'{name} has no array leaves; expected a pytree whose '
                     'leaves have a leading task axis.')
  sizes = {}
  for path, leaf in leaves:
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

  Each leaf is flattened to ``(K, -1)`` and contributes one matrix product,
  accumulated in float32 (float64 for float64 leaves) at the highest matmul
  precision, so bfloat16 gradients and TF32-capable GPUs do not degrade the
  Gram matrix.

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
  dtype = dtypes.solve_dtype(jnp.result_type(*[leaf.dtype for leaf in leaves]))
  gram = jnp.zeros((k, k), dtype)
  for leaf in leaves:
    dtypes.solve_dtype(leaf.dtype)  # rejects integer leaves with a message
    flat = jnp.reshape(leaf, (k, -1))
    gram = gram + jax.lax.dot_general(
        flat, flat, (((1,), (1,)), ((), ())),
        precision=jax.lax.Precision.HIGHEST, preferred_element_type=dtype)
  return gram


def _leaf_varying(leaf) -> frozenset:
  aval = jax.typeof(leaf)
  manual = getattr(aval, 'manual_axis_type', None)  # jax >= 0.9
  if manual is not None:
    return frozenset(getattr(manual, 'varying', ()) or ())
  return frozenset(getattr(aval, 'vma', ()) or ())  # older jax


def untyped_axis(axis_name) -> bool:
  """Whether ``axis_name`` is a mapped axis whose values carry no varying type.

  True inside ``pmap`` or ``jax.shard_map(..., check_vma=False)``; False in
  typed ``shard_map`` (where ``axis_index`` itself is typed as varying) and
  when ``axis_name`` is None.
  """
  if axis_name is None:
    return False
  names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
  return not set(names) <= _leaf_varying(jax.lax.axis_index(axis_name))


def sum_over_devices(tree, axis_name, *, legacy: bool):
  """``psum`` of a per-device quantity over the data-parallel axis.

  Inside ``jax.shard_map`` with its type checks on (the default), a value's
  type records the axes it varies over, and a gradient w.r.t. replicated
  parameters comes back already summed (the transpose of the implicit
  broadcast is a ``psum``): only values that still vary are summed, over
  exactly those axes (restricted to ``axis_name`` when given). With
  ``legacy=True`` (``check_vma=False``, or ``pmap``) types say nothing, and
  everything is summed over ``axis_name``.
  """
  if legacy:
    return jax.lax.psum(tree, axis_name) if axis_name is not None else tree

  def one(leaf):
    axes = set(_leaf_varying(leaf))
    if axis_name is not None:
      names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
      axes &= set(names)
    return jax.lax.psum(leaf, tuple(sorted(axes))) if axes else leaf

  return jax.tree.map(one, tree)
