"""Dtype policy: which precision Gram matrices and solves accumulate in."""

import jax.numpy as jnp


def solve_dtype(dtype) -> jnp.dtype:
  """The dtype that Gram matrices and the min-norm solve are computed in.

  Half-precision inputs (bfloat16, float16) are promoted to float32, float32
  stays float32 and float64 stays float64 (it exists only under
  ``jax_enable_x64``).

  Args:
    dtype: the dtype of the gradients or of the Gram matrix.

  Returns:
    float32 or float64.

  Raises:
    ValueError: for a non-floating dtype (integers, booleans, complex).
  """
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
        f'Expected floating-point gradients or Gram matrix; got dtype {dtype}.')
  if dtype == jnp.float64:
    return jnp.dtype(jnp.float64)
  return jnp.dtype(jnp.float32)
