"""Static checks shared by every factory: clear errors at construction time.

Hyperparameters may be traced (``optax.inject_hyperparams`` turns every
numeric one into an array); a traced value cannot be checked while tracing,
so only concrete values are, and the solves treat an invalid traced value
as documented in their own docstrings.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SharedSpec = Any  # None | pytree (prefix) of bools | Callable[[params], ...]


def is_concrete(x) -> bool:
  """Whether ``x`` has a value now (not a tracer)."""
  return not isinstance(x, jax.core.Tracer) and not any(
      isinstance(l, jax.core.Tracer) for l in jax.tree.leaves(x))


def check_num_tasks(num_tasks, factory: str) -> int:
  """``num_tasks`` as a static Python int >= 1, or a clear error."""
  if isinstance(num_tasks, (bool, np.bool_)) or isinstance(
      num_tasks, jax.core.Tracer) or not (
          isinstance(num_tasks, (int, np.integer)) or (
              hasattr(num_tasks, 'ndim') and num_tasks.ndim == 0
              and jnp.issubdtype(num_tasks.dtype, jnp.integer))):
    raise ValueError(
        f'{factory}: num_tasks must be a static Python int (it sets the '
        f'shape of the optimizer state); got {num_tasks!r}. Under '
        "optax.inject_hyperparams pass static_args=('num_tasks',).")
  num_tasks = int(num_tasks)
  if num_tasks < 1:
    raise ValueError(f'{factory}: num_tasks must be >= 1; got {num_tasks}.')
  return num_tasks


def check_scalar(factory: str, name: str, value, *, low=None, high=None,
                 low_open: bool = False, allow_none: bool = False,
                 integer: bool = False):
  """Raises ValueError for a concrete ``value`` outside its range.

  ``low``/``high`` are inclusive bounds (``low_open``: exclusive low). NaN
  and infinities are rejected. Traced values pass (see the module
  docstring).
  """
  if value is None:
    if allow_none:
      return
    raise ValueError(f'{factory}: {name} must be a number; got None.')
  if not is_concrete(value):
    return
  arr = np.asarray(value)
  if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number)
                                 or arr.dtype == bool):
    raise ValueError(f'{factory}: {name} must be a number; got {value!r}.')
  if integer and not np.issubdtype(arr.dtype, np.integer):
    if not np.all(np.asarray(arr, np.float64) == np.round(arr)):
      raise ValueError(f'{factory}: {name} must be an integer; got {value!r}.')
  a = np.asarray(arr, np.float64)
  if not np.all(np.isfinite(a)):
    raise ValueError(f'{factory}: {name} must be finite; got {value!r}.')
  if low is not None and (np.any(a <= low) if low_open else np.any(a < low)):
    rel = '>' if low_open else '>='
    raise ValueError(f'{factory}: {name} must be {rel} {low}; got {value!r}.')
  if high is not None and np.any(a > high):
    raise ValueError(f'{factory}: {name} must be <= {high}; got {value!r}.')


def check_vector(factory: str, name: str, value, k: int, required: bool,
                 what: str):
  """``value`` as a ``(k,)`` floating array, None, or a clear error."""
  if value is None:
    if required:
      raise ValueError(f'{factory} needs the {what}: pass {name}=<array of '
                       f'shape ({k},)> to update.')
    return None
  if isinstance(value, dict):
    raise ValueError(f'{factory}: {name} must be a ({k},) array; got a dict. '
                     'Stack it in task order with jnp.stack(...).')
  value = jnp.asarray(value)
  if value.shape != (k,):
    raise ValueError(f'{factory}: {name} must have shape ({k},) to match '
                     f'{k} tasks; got {value.shape}.')
  if not jnp.issubdtype(value.dtype, jnp.floating):
    value = value.astype(jnp.float32)
  return value


def resolve_shared(shared: SharedSpec, tree, params, factory: str):
  """The boolean mask (a pytree of bools shaped like ``tree``) of shared leaves.

  ``shared`` is None (everything shared), a pytree of bools with the
  structure of the parameters or a prefix of it (as ``optax.masked``
  accepts: ``{'encoder': True, 'heads': False}`` marks whole subtrees), or a
  function of the parameters returning one.
  """
  if shared is None:
    return jax.tree.map(lambda _: True, tree)
  if callable(shared):
    shared = shared(params if params is not None else tree)
  try:
    mask = jax.tree.map(
        lambda m, sub: jax.tree.map(lambda _: m, sub), shared, tree,
        is_leaf=lambda x: isinstance(x, (bool, np.bool_)))
  except (ValueError, TypeError) as e:
    raise ValueError(
        f'{factory}: shared must be None, a pytree of bools with the '
        'structure of the parameters (or a prefix of it, as for '
        'optax.masked), or a function returning one; got structure '
        f'{jax.tree.structure(shared)} for parameters '
        f'{jax.tree.structure(tree)}.') from e
  leaves = jax.tree.leaves(mask)
  for m in leaves:
    if isinstance(m, jax.core.Tracer):
      raise ValueError(f'{factory}: shared must hold Python bools (it decides '
                       'the program structure); got a traced value.')
  return jax.tree.map(bool, mask)


def as_key(key) -> jax.Array:
  """A raw ``uint32[2]`` PRNG key from an int seed or a (typed or raw) key.

  Integer scalars (also traced ones, as ``optax.inject_hyperparams`` makes
  them) are seeds.
  """
  if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
    return jax.random.PRNGKey(key)
  key = key if isinstance(key, jax.Array) else jnp.asarray(key)
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key)
  if key.ndim == 0 and jnp.issubdtype(key.dtype, jnp.integer):
    return jax.random.PRNGKey(key)
  if key.shape != (2,) or key.dtype != jnp.uint32:
    raise ValueError('key must be an int seed or a PRNG key (jax.random.key '
                     f'or jax.random.PRNGKey); got {key.dtype}{key.shape}.')
  return key


def state_dtype(params):
  """float32, or float64 when a floating parameter is float64 (under x64).

  Non-floating leaves (PRNG keys, integer counters in an NNX state) are
  ignored.
  """
  dtype = jnp.float32
  for leaf in jax.tree.leaves(params):
    dt = getattr(leaf, 'dtype', None)
    if dt is None:
      continue
    try:
      if jnp.issubdtype(dt, jnp.floating):
        dtype = jnp.promote_types(dtype, dt)
    except TypeError:  # extended dtypes (PRNG keys, float0)
      continue
  return jnp.dtype(dtype)
