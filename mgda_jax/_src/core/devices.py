"""Data parallelism: which values are per-device, and their global sums.

Four ways to run a step data-parallel are supported, and each gives the
one-device step on the whole batch:

* **jax.jit with a sharded batch** (on an ``Explicit`` mesh, the default of
  ``jax.make_mesh``, or an ``Auto`` one): values are global; XLA inserts the
  reductions. Only contractions over a sharded axis need an output sharding
  (:func:`contract_out_sharding`).
* **typed jax.shard_map** (``check_vma=True``, the default): a value's type
  records the mesh axes it varies over. Per-device quantities (the Gram
  blocks of representation gradients, the losses) vary and are summed over
  exactly those axes; gradients w.r.t. replicated parameters come back
  summed already (the transpose of the implicit broadcast is a ``psum``).
* **untyped shard_map** (``check_vma=False``) **and pmap**: types say
  nothing, so the method needs ``axis_name``; every per-device quantity is
  summed over it.

Per-device losses (and KPIs) must be each device's share of the global mean
(the local mean divided by the number of devices), so that their sum is the
global mean, just as for the gradients.
"""

from typing import Any

import jax
import jax.numpy as jnp


def _names(axis_name) -> tuple:
  if axis_name is None:
    return ()
  return (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)


def varying_axes(leaf) -> frozenset:
  """The manual mesh axes a value varies over (typed shard_map), else empty."""
  try:
    aval = jax.typeof(leaf)
  except TypeError:
    return frozenset()
  manual = getattr(aval, 'manual_axis_type', None)  # jax >= 0.9
  if manual is not None:
    return frozenset(getattr(manual, 'varying', ()) or ())
  return frozenset(getattr(aval, 'vma', ()) or ())  # older jax


def untyped_axis(axis_name) -> bool:
  """Whether ``axis_name`` is mapped but its values carry no varying type.

  True inside ``pmap`` or ``jax.shard_map(..., check_vma=False)``; False in
  typed ``shard_map`` (where ``axis_index`` itself is typed as varying) and
  when ``axis_name`` is None.

  Raises:
    ValueError: if ``axis_name`` is given but no such mapped axis is in
      scope (e.g. under plain ``jax.jit``).
  """
  if axis_name is None:
    return False
  try:
    index = jax.lax.axis_index(axis_name)
  except NameError as e:
    raise ValueError(
        f'axis_name={axis_name!r} is not a mapped axis here. Pass axis_name '
        'only inside jax.shard_map or jax.pmap; under jax.jit with a sharded '
        'batch leave it None (XLA inserts the reductions).') from e
  return not set(_names(axis_name)) <= varying_axes(index)


class Mode:
  """How the current trace is data-parallel: ``legacy`` (untyped) or not."""

  def __init__(self, axis_name):
    self.axis_name = axis_name
    self.legacy = untyped_axis(axis_name)

  def global_sum(self, tree: Any) -> Any:
    """Sum of a per-device quantity over the data-parallel devices.

    Typed: only leaves that vary are summed, over their varying axes (those
    in ``axis_name`` when it is given). Untyped: everything is summed over
    ``axis_name``. Outside any mapped axis: unchanged.
    """
    if self.legacy:
      return jax.lax.psum(tree, self.axis_name)
    names = set(_names(self.axis_name))

    def one(leaf):
      axes = set(varying_axes(leaf))
      if names:
        axes &= names
      return jax.lax.psum(leaf, tuple(sorted(axes))) if axes else leaf

    return jax.tree.map(one, tree)

  def shard_of(self, leaf):
    """``(index, count)`` of this device's shard of ``leaf``, or None.

    For a per-device leaf (varying in typed mode; every leaf in untyped
    mode), the position of this device along the data-parallel axes and
    their size, so that a random draw over the global shape can be sliced
    to the local one.
    """
    if self.legacy:
      axes = _names(self.axis_name)
    else:
      axes = tuple(sorted(varying_axes(leaf)))
      if self.axis_name is not None:
        axes = tuple(a for a in _names(self.axis_name) if a in axes)
    if not axes:
      return None
    return jax.lax.axis_index(axes), jax.lax.psum(1, axes)


def contract_out_sharding(*arrays):
  """``out_sharding`` for a contraction of these arrays to a small result.

  On an ``Explicit`` mesh, contracting a sharded axis must name the output
  sharding; the K x K Gram matrix and K-vectors are replicated (``P()``).
  None elsewhere (no mesh, ``Auto`` axes, inside shard_map).
  """
  for a in arrays:
    try:
      sharding = jax.typeof(a).sharding
    except (TypeError, AttributeError):
      continue
    mesh = getattr(sharding, 'mesh', None)
    if mesh is None or not getattr(mesh, 'axis_names', ()):
      continue
    types = getattr(mesh, 'axis_types', ())
    if any(str(t).endswith('Explicit') for t in types) and any(
        s is not None for s in getattr(sharding, 'spec', ())):
      return jax.sharding.PartitionSpec()
  return None


def tree_all_finite(tree) -> jax.Array:
  """Whether every floating leaf of ``tree`` is finite (a bool scalar)."""
  leaves = [l for l in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(l), jnp.inexact)]
  if not leaves:
    return jnp.ones((), bool)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(l)) for l in leaves]))
