"""One result code and one diagnostics type for every inner solve.

Every solve in mgda_jax (the min-norm Frank-Wolfe, the non-negative QP of
UPGrad/DualProj, CAGrad's dual, Nash-MTL's Newton solve) reports the same
:class:`SolverResult` codes, and every method's state carries a
:class:`SolveInfo`, so a training loop logs and checks them the same way
whatever the method (optimistix's habit: one result type for every solve).
"""

import enum
from typing import NamedTuple

import jax
import jax.numpy as jnp


class SolverResult(enum.IntEnum):
  """Result codes, stored as int32 arrays.

  Attributes:
    CONVERGED: the solve met its tolerance (or was closed form).
    MAX_STEPS_REACHED: the step cap ran out first; the answer is the last
      iterate, feasible, and the certificate says how far from optimal.
    NONFINITE: an input (gradients, losses, a Gram matrix) held a NaN or an
      infinity; the weights are NaN and the method's state is not updated.
    INVALID_INPUT: the input is finite but outside the problem's domain
      (a Gram matrix that is not positive semi-definite, a traced
      hyperparameter out of range); the weights are NaN.
  """

  CONVERGED = 0
  MAX_STEPS_REACHED = 1
  NONFINITE = 2
  INVALID_INPUT = 3


class SolveInfo(NamedTuple):
  """Diagnostics of the last update, the same for every method.

  Attributes:
    num_steps: iterations of the inner solve (0 for a closed form or a
      method without one), int32.
    error: the solve's own certificate, in the units that its tolerance
      uses: the Frank-Wolfe duality gap (MGDA, CAGrad), the scaled KKT
      violation (UPGrad, DualProj), the squared Newton decrement (Nash-MTL);
      0 for closed forms; NaN for a non-finite step.
    converged: ``result == CONVERGED``, bool.
    result: a :class:`SolverResult` code, int32.
  """

  num_steps: jax.Array
  error: jax.Array
  converged: jax.Array
  result: jax.Array


def result_code(converged, finite=True, valid=True) -> jax.Array:
  """The :class:`SolverResult` code from the three flags (int32)."""
  code = jnp.where(converged, SolverResult.CONVERGED,
                   SolverResult.MAX_STEPS_REACHED)
  code = jnp.where(valid, code, SolverResult.INVALID_INPUT)
  code = jnp.where(finite, code, SolverResult.NONFINITE)
  return jnp.asarray(code, jnp.int32)


def make_info(num_steps, error, converged, finite=True, valid=True,
              dtype=jnp.float32) -> SolveInfo:
  """A :class:`SolveInfo` whose ``converged`` agrees with its ``result``."""
  code = result_code(converged, finite, valid)
  return SolveInfo(num_steps=jnp.asarray(num_steps, jnp.int32),
                   error=jnp.asarray(error).astype(dtype),
                   converged=code == SolverResult.CONVERGED,
                   result=code)


def closed_form_info(finite=True, dtype=jnp.float32) -> SolveInfo:
  """Diagnostics of a method without an iterative solve."""
  return make_info(0, jnp.where(finite, 0.0, jnp.nan), True, finite,
                   dtype=dtype)


def initial_info(dtype=jnp.float32) -> SolveInfo:
  """Placeholder before the first update: nothing solved yet."""
  return SolveInfo(num_steps=jnp.zeros((), jnp.int32),
                   error=jnp.full((), jnp.inf, dtype),
                   converged=jnp.zeros((), bool),
                   result=jnp.asarray(SolverResult.MAX_STEPS_REACHED,
                                      jnp.int32))
