"""The minimum-norm point in the convex hull of task gradients.

Given a symmetric positive semi-definite Gram matrix ``G`` of ``K`` task
gradients (``G[s, t] = <g_s, g_t>``), this module solves the quadratic
programme on the probability simplex

.. math::

  \\min_{\\alpha \\in \\Delta^K} f(\\alpha) = \\alpha^\\top G \\alpha
  = \\Big\\| \\sum_t \\alpha_t g_t \\Big\\|^2,
  \\qquad \\Delta^K = \\{\\alpha \\ge 0,\\ \\textstyle\\sum_t \\alpha_t = 1\\},

which is the MGDA sub-problem of Sener & Koltun (2018), their Eq. (3).

The solver is a Frank-Wolfe method written with ``jax.lax.while_loop``: a
pure function that compiles once, runs under ``jax.jit`` and ``jax.vmap``,
and needs no host round-trip. Three step variants are offered:

* ``'frank_wolfe'``: the paper's Algorithm 1. Each step moves towards the
  vertex ``e_s`` with ``s = argmin_t (G alpha)_t`` with the exact line search
  of the paper's Eq. (4). It converges sublinearly, O(1/k).
* ``'away_steps'``: Frank-Wolfe with away steps (Guelat & Marcotte 1986). A
  step either moves towards ``e_s`` or away from the worst vertex ``e_v`` of
  the current support, whichever promises more decrease.
* ``'pairwise'`` (default): pairwise Frank-Wolfe. A step moves mass from
  ``e_v`` to ``e_s`` directly.

Away-step and pairwise Frank-Wolfe converge linearly on polytopes for
objectives of the form ``h(A alpha)`` with ``h`` strongly convex, which covers
``||A alpha||^2`` even when ``G`` is singular (Lacoste-Julien & Jaggi 2015).
The linear rate can still be very slow: on degenerate problems (e.g. 100
gradients in a 64-dimensional space, a support of ~65 tasks) pairwise steps
alone stall at a few per cent above the optimum after thousands of steps.

**Corrective steps** (``corrective=True``, the default) fix that. Every
``2 K`` steps, if the gap is not yet small enough, the solver takes one of
Wolfe's (1976) *minor cycles*: it computes the affine minimiser of ``f`` on the
face spanned by the current support (projected conjugate gradients, O(K^2)
per iteration, in Jacobi-scaled variables) and moves towards it as far as the
simplex allows, dropping a vertex if one hits zero. Kept only if it lowers
``f``, it never hurts; on an identified support it lands on the optimum. Cheap
Frank-Wolfe steps find the support, corrective steps finish the job.
``benchmarks/bench_solver.py --variants`` compares all six combinations;
pairwise with corrective steps reaches the accuracy target on every problem
family tried, with the fewest steps, so it is the default.

Every line search is the exact minimiser of a quadratic on a segment: the
closed form of the paper's Eq. (4) for ``min_{gamma in [0, 1]} ||gamma a +
(1 - gamma) b||^2``, applied to the two ends of the segment being searched.
With two tasks the whole problem is that line search, so ``K = 2`` is solved
in closed form, without a loop; ``K = 1`` is decided statically.

**Stopping rule.** The loop stops when the Frank-Wolfe duality gap

.. math::

  \\mathrm{gap}(\\alpha) = \\langle \\nabla f(\\alpha), \\alpha - e_s \\rangle
  = 2\\,\\big(\\alpha^\\top G \\alpha - \\min_t (G\\alpha)_t\\big)

falls below ``tol * f(alpha) + floor``. Because ``f`` is convex, the gap bounds
the excess ``f(alpha) - f*`` (it is a certificate), so this controls the
relative error of ``sq_norm``. ``floor = 4 eps (sum_t alpha_t sqrt(G_tt))^2``
is the rounding level of ``f`` itself, set by the gradients in the
solution's *support*: an optimum on short gradients is resolved at their own
scale however long the other gradients are. (Before version 0.2 the floor
was tied to the largest diagonal entry, and float32 solves with norms spread
over a few decades reported ``converged`` several per cent above the
optimum.)

**Exact certificate.** In float32, ``(G alpha)_t`` computed plainly is wrong
by about ``eps sqrt(G_tt) sum_s alpha_s sqrt(G_ss)``, far above that floor
for a long gradient ``g_t``. The gap is therefore recomputed after every
round of steps, and at the end, by :func:`accurate_matvec`, which is exact
to about one rounding of the result (error-free products and sums). The loop
itself updates ``G alpha`` incrementally, in O(K) a step.

**Accuracy statement.** Where ``converged`` is True, ``sq_norm`` exceeds the
exact optimum of the given ``G`` by at most ``tol`` relative plus the floor
above (``tol`` defaults to ``2e-5`` in float32 and ``1e-9`` in float64, so
``1e-4`` and ``1e-8`` relative with margin). The tests check this against an
exact QP for K from 1 to 256 with norms spread up to ``1e4``. Otherwise the
result says ``MAX_STEPS_REACHED``: in float32 a few per cent of problems
with norms spread over more than three decades cannot be certified even at
the optimum (the gap is linear in the rounding of ``alpha`` while the excess
is quadratic), and end so, with their last, feasible iterate. K = 2 is the
closed form and always converged.

**Scale.** ``G`` is divided by its largest diagonal entry before the solve
(``alpha`` is invariant to that), so tolerances are scale-free.

**Input outside the domain.** ``G`` is symmetrised as ``(G + G^T) / 2``. A
NaN or an infinity gives NaN ``weights``, ``sq_norm`` and ``gap`` and
``result = NONFINITE``. A matrix that is not positive semi-definite by an
O(K^2) necessary test (a negative diagonal entry, an entry with ``|G_st| >
(1 + 1e-3) sqrt(G_ss G_tt)``, or a negative objective at the answer) gives
NaN weights and ``result = INVALID_INPUT``; so does a traced ``tol`` that is
NaN or negative, or a traced ``max_steps < 1`` (concrete ones raise
``ValueError``). NaN weights make any update built from them NaN, so
``optax.apply_if_finite`` (or a check of the result code) can skip the
step; nothing looks converged.

References:
  Sener & Koltun, *Multi-Task Learning as Multi-Objective Optimization*,
  NeurIPS 2018. https://arxiv.org/abs/1810.04650

  Jaggi, *Revisiting Frank-Wolfe: Projection-Free Sparse Convex
  Optimization*, ICML 2013.

  Lacoste-Julien & Jaggi, *On the Global Linear Convergence of Frank-Wolfe
  Optimization Variants*, NeurIPS 2015. https://arxiv.org/abs/1511.05932

  Guelat & Marcotte, *Some comments on Wolfe's 'away step'*, Mathematical
  Programming 35, 1986.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mgda_jax._src.core import checks
from mgda_jax._src.core import dtypes
from mgda_jax._src.core.results import SolverResult

METHODS = ('pairwise', 'away_steps', 'frank_wolfe')


def check_method(method: str) -> None:
  """Raises ValueError for an unknown Frank-Wolfe variant."""
  if method not in METHODS:
    raise ValueError(f'Unknown method {method!r}; expected one of {METHODS}.')


class MinNormSolution(NamedTuple):
  """The solution of :func:`min_norm_element` and its diagnostics.

  Attributes:
    weights: ``alpha``, shape ``(K,)``, on the simplex (NaN if non-finite).
    sq_norm: ``alpha^T G alpha = ||sum_t alpha_t g_t||^2``, shape ``()``.
    gap: the Frank-Wolfe duality gap ``2 (alpha^T G alpha - min_t (G
      alpha)_t)`` at ``weights``, shape ``()``. It bounds ``sq_norm`` minus
      the optimum.
    num_steps: iterations run, int32, shape ``()``.
    converged: whether ``gap`` met the tolerance, bool, shape ``()``.
    result: a :class:`SolverResult` code, int32, shape ``()``.
  """

  weights: jax.Array
  sq_norm: jax.Array
  gap: jax.Array
  num_steps: jax.Array
  converged: jax.Array
  result: jax.Array


def default_tol(dtype) -> float:
  """The default relative tolerance on the duality gap for ``dtype``.

  ``2e-5`` in float32 (and narrower inputs, which are solved in float32) and
  ``1e-9`` in float64: five and ten times tighter than the accuracy targets
  of ``1e-4`` and ``1e-8`` relative, to absorb rounding in the gap itself.

  Args:
    dtype: the dtype of the Gram matrix.

  Returns:
    The tolerance, a Python float.
  """
  return 1e-9 if dtypes.solve_dtype(dtype) == jnp.float64 else 2e-5


def default_max_steps(num_tasks: int, dtype) -> int:
  """The default iteration cap for ``num_tasks`` tasks and ``dtype``.

  A Frank-Wolfe step adds or drops one vertex at most, so the cap grows with
  ``K``: ``1000 + 100 K`` for every dtype (one number, so that the transforms
  can take it as a plain, ``inject_hyperparams``-able default). Typical
  problems stop far earlier (K = 40: ~80 steps). The slowest cases in the
  tests, 256 gradients with norms spread over 4 (float32) to 8 (float64)
  decades, use up to about 26,000 steps; such problems may end
  ``MAX_STEPS_REACHED``.

  Args:
    num_tasks: ``K``.
    dtype: the dtype of the Gram matrix.

  Returns:
    The cap, a Python int.
  """
  del dtype  # the same cap for every dtype (see above)
  return 1000 + 100 * int(num_tasks)


# The stopping rule's absolute floor, in ulps of the support's scale
# (sum_t alpha_t sqrt(G_tt))^2, the rounding level of f itself.
FLOOR_ULPS = 4.0


def cg_iterations(num_tasks: int, dtype) -> int:
  """Conjugate-gradient iterations allowed per corrective step.

  ``K`` in float64, ``min(K, 16)`` in float32. Float32 CG stagnates after a
  few iterations on the singular faces of rank-deficient problems, where more
  iterations only cost time: when tuning on the benchmark's rank-deficient
  K = 40 family, a cap of 16 instead of 40 cut the vmapped time per problem
  from about 260 to 140-170 us at the same accuracy. Float64 needs the full
  count: with a cap of 8, a K = 100 degenerate test case no longer converged.
  """
  if dtypes.solve_dtype(dtype) == jnp.float64:
    return num_tasks
  return min(num_tasks, 16)


def correction_period(num_tasks: int) -> int:
  """Frank-Wolfe steps between two corrective steps: ``2 K``.

  A corrective step costs O(K^2) per conjugate-gradient iteration, a pairwise
  step O(K). When tuning, periods of K and 4K were no faster than 2K at K = 40;
  after a corrective step that drops a vertex the next one follows at once.
  """
  return 2 * num_tasks


def _threshold(f, alpha, root_diag, tol, support=None):
  """Stop when ``gap <= tol * f + FLOOR_ULPS * eps * (sum_t alpha_t sqrt(G_tt))^2``.

  The floor is the rounding level of ``f = alpha^T G alpha`` computed from
  entries ``|G_st| <= sqrt(G_ss G_tt)`` weighted by ``alpha``: it follows the
  gradients in the support, not the longest gradient of the problem (an
  optimum on short gradients is resolved at their own scale).
  """
  eps = jnp.finfo(f.dtype).eps
  if support is None:
    support = jnp.dot(alpha, root_diag)
  support_scale = support ** 2
  return tol * jnp.maximum(f, 0.0) + FLOOR_ULPS * eps * support_scale


def line_search(slope: jax.Array, curvature: jax.Array, max_step):
  """Exact minimiser of ``slope * t + curvature * t**2 / 2`` on ``[0, max_step]``.

  This is the paper's Eq. (4) in the form used inside the solver. For two
  points ``a`` and ``b``, ``min_{gamma in [0,1]} ||gamma a + (1-gamma) b||^2``
  has ``slope = 2 <b, a - b>`` and ``curvature = 2 ||a - b||^2``, and the
  closed form is ``gamma = <b, b - a> / ||a - b||^2`` clipped to ``[0, 1]``.
  A segment without curvature (``a == b``) along which ``f`` decreases is
  walked to its end.

  Args:
    slope: directional derivative at ``t = 0``.
    curvature: second derivative along the segment (``>= 0`` for PSD ``G``).
    max_step: length of the segment.

  Returns:
    The optimal step ``t``.
  """
  safe = jnp.where(curvature > 0, curvature, 1.0)
  unconstrained = jnp.where(curvature > 0, -slope / safe,
                            jnp.where(slope < 0, jnp.inf, 0.0))
  return jnp.clip(unconstrained, 0.0, max_step)


def _two_task(gram: jax.Array):
  """Closed form for K = 2: Eq. (4) between g_1 and g_2.

  ``alpha = (G_22 - G_12, G_11 - G_12) / ||g_1 - g_2||^2``, clipped to the
  simplex. Each weight is computed from its own numerator (not as ``1 -
  gamma``), so a small weight on a long gradient keeps its relative
  precision; the weights sum to one up to rounding.
  """
  g11, g12, g22 = gram[0, 0], gram[0, 1], gram[1, 1]
  denom = g11 + g22 - 2.0 * g12
  safe = jnp.where(denom > 0, denom, 1.0)
  a1 = (g22 - g12) / safe
  a2 = (g11 - g12) / safe
  weights = jnp.where(a1 <= 0, jnp.array([0.0, 1.0], gram.dtype),
                      jnp.where(a2 <= 0, jnp.array([1.0, 0.0], gram.dtype),
                                jnp.stack([a1, a2])))
  # When g_1 == g_2 every gamma is optimal; keep the symmetric point.
  return jnp.where(denom > 0, weights, jnp.full((2,), 0.5, gram.dtype))


def _argmin(x: jax.Array) -> jax.Array:
  """First index of the minimum of a vector, as a tournament of halves.

  Same result as ``jnp.argmin`` (ties go to the lower index), but built from
  elementwise compare-and-select on halves, log2(K) levels deep. Under
  ``jax.vmap`` on CPU this is about 3x faster than XLA's variadic argmin
  reduction, and it runs twice per Frank-Wolfe step.
  """
  n = x.shape[0]
  size = 1 << max(n - 1, 0).bit_length()
  vals = jnp.concatenate([x, jnp.full((size - n,), jnp.inf, x.dtype)])
  idx = jnp.arange(size, dtype=jnp.int32)
  while size > 1:
    size //= 2
    take_hi = vals[size:2 * size] < vals[:size]
    vals = jnp.where(take_hi, vals[size:2 * size], vals[:size])
    idx = jnp.where(take_hi, idx[size:2 * size], idx[:size])
  return idx[0]


def _split(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``x = hi + lo`` exactly, each with at most 12 significant bits (float32).

  Products of two such halves are exact in float32 (24-bit significands).
  """
  hi = jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=11)
  return hi, x - hi


def _two_sum(a, b):
  """Knuth's error-free sum: ``a + b = s + e`` exactly."""
  s = a + b
  bb = s - a
  return s, (a - (s - bb)) + (b - bb)


def _split_gram(gram: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The 12-bit halves of ``G^T`` for :func:`_accurate_matvec`, once per solve."""
  return _split(gram.T)


def _accurate_matvec(split: tuple[jax.Array, jax.Array],
                     alpha: jax.Array) -> jax.Array:
  """:func:`accurate_matvec` from a :func:`_split_gram` of ``G``."""
  hi_t, lo_t = split
  a_hi, a_lo = _split(alpha)
  s = hi_t * a_hi[:, None]             # exact products, row j: G[:, j] a_j
  e = jnp.zeros_like(s)
  while s.shape[0] > 1:                # a pairwise tree of error-free sums
    if s.shape[0] % 2:                 # an odd level gets one zero row
      s = jnp.concatenate([s, jnp.zeros_like(s[:1])])
      e = jnp.concatenate([e, jnp.zeros_like(e[:1])])
    h = s.shape[0] // 2
    s, err = _two_sum(s[:h], s[h:])
    e = (e[:h] + e[h:]) + err
  # The cross terms, 2^-12 smaller: g_hi a_lo + g_lo (a_hi + a_lo).
  small = a_lo @ hi_t + alpha @ lo_t
  return s[0] + (e[0] + small)


def accurate_matvec(gram: jax.Array, alpha: jax.Array) -> jax.Array:
  """``G @ alpha`` as if computed in twice the working precision.

  Plain float32 rounding makes ``(G alpha)_t`` wrong by about ``eps
  sqrt(G_tt) sum_s alpha_s sqrt(G_ss)``: for a long gradient ``g_t`` that is
  far above the stopping floor of an optimum on short gradients, and the
  duality gap (the certificate) could neither be trusted nor reach the
  tolerance. Here ``G`` and ``alpha`` are split into 12-bit halves
  (:func:`_split`); the products of the high halves are exact in float32 and
  are added by a pairwise tree of error-free sums (Knuth's TwoSum,
  compensated); the cross terms, ``2^-12`` smaller, by a plain product. The
  result is accurate to a few roundings of the result itself. Float64 input
  (under x64) uses the plain product, whose rounding is far below any
  float32 certificate. Inside the solver the split of ``G`` is made once per
  solve, not once per call.

  Args:
    gram: a ``(K, K)`` matrix.
    alpha: a ``(K,)`` vector of the same dtype.

  Returns:
    ``G @ alpha``, shape ``(K,)``.
  """
  if gram.dtype != jnp.float32:
    return gram @ alpha
  return _accurate_matvec(_split_gram(gram), alpha)


class _Carry(NamedTuple):
  step: jax.Array
  alpha: jax.Array
  g_alpha: jax.Array  # G @ alpha, updated incrementally
  f: jax.Array        # alpha @ G @ alpha
  gap: jax.Array
  support: jax.Array  # sum_t alpha_t sqrt(G_tt), updated incrementally


def _fw_gap(alpha, g_alpha):
  f = jnp.dot(alpha, g_alpha)
  return f, 2.0 * (f - jnp.min(g_alpha))


def _step(gram: jax.Array, carry: _Carry, method: str) -> _Carry:
  """One Frank-Wolfe iteration of the chosen variant.

  ``G alpha``, ``f`` and the support scale ``alpha . sqrt(diag G)`` are
  updated in O(K) (the scale in O(1): a step moves along one or two
  vertices); each round's exact check recomputes them.
  """
  alpha, g_alpha, f = carry.alpha, carry.g_alpha, carry.f
  dtype = alpha.dtype
  s = _argmin(g_alpha)
  g_s = gram[s]  # row s == column s of the symmetric G
  e_s = jax.nn.one_hot(s, alpha.shape[0], dtype=dtype)

  # Frank-Wolfe step: alpha + t (e_s - alpha), t in [0, 1].
  fw_slope = 2.0 * (g_alpha[s] - f)
  fw_curv = 2.0 * (g_s[s] - 2.0 * g_alpha[s] + f)
  t_fw = line_search(fw_slope, fw_curv, 1.0)
  alpha_fw = alpha + t_fw * (e_s - alpha)
  g_alpha_fw = g_alpha + t_fw * (g_s - g_alpha)
  # sqrt(G_ss) from the row already gathered (a gather under vmap costs
  # more than a square root).
  sup, r_s = carry.support, jnp.sqrt(jnp.maximum(g_s[s], 0.0))
  sup_fw = sup + t_fw * (r_s - sup)
  if method == 'frank_wolfe':
    new_alpha, new_g_alpha, new_sup = alpha_fw, g_alpha_fw, sup_fw
  else:
    # The away vertex: the worst one in the current support.
    v = _argmin(jnp.where(alpha > 0, -g_alpha, jnp.inf))
    g_v = gram[v]
    e_v = jax.nn.one_hot(v, alpha.shape[0], dtype=dtype)
    a_v = alpha[v]
    if method == 'pairwise':
      # alpha + t (e_s - e_v), t in [0, alpha_v].
      slope = 2.0 * (g_alpha[s] - g_alpha[v])
      curv = 2.0 * (g_s[s] + g_v[v] - 2.0 * g_s[v])
      t = line_search(slope, curv, a_v)
      new_alpha = alpha + t * (e_s - e_v)
      # A drop step empties v exactly, so the support shrinks for real.
      new_alpha = jnp.where((t >= a_v) & (e_v > 0), 0.0, new_alpha)
      new_alpha = jnp.maximum(new_alpha, 0.0)
      new_g_alpha = g_alpha + t * (g_s - g_v)
      new_sup = sup + t * (r_s - jnp.sqrt(jnp.maximum(g_v[v], 0.0)))
    else:  # away_steps
      # alpha + t (alpha - e_v), t in [0, alpha_v / (1 - alpha_v)].
      t_max = jnp.where(a_v < 1.0, a_v / jnp.where(a_v < 1.0, 1.0 - a_v, 1.0),
                        0.0)
      aw_slope = 2.0 * (f - g_alpha[v])
      aw_curv = 2.0 * (f - 2.0 * g_alpha[v] + g_v[v])
      t_aw = line_search(aw_slope, aw_curv, t_max)
      alpha_aw = alpha + t_aw * (alpha - e_v)
      alpha_aw = jnp.where((t_aw >= t_max) & (e_v > 0), 0.0, alpha_aw)
      alpha_aw = jnp.maximum(alpha_aw, 0.0)
      g_alpha_aw = g_alpha + t_aw * (g_alpha - g_v)
      sup_aw = sup + t_aw * (sup - jnp.sqrt(jnp.maximum(g_v[v], 0.0)))
      # Take the step whose direction promises more decrease (-slope).
      use_fw = -fw_slope >= -aw_slope
      new_alpha = jnp.where(use_fw, alpha_fw, alpha_aw)
      new_g_alpha = jnp.where(use_fw, g_alpha_fw, g_alpha_aw)
      new_sup = jnp.where(use_fw, sup_fw, sup_aw)
  new_f, new_gap = _fw_gap(new_alpha, new_g_alpha)
  return _Carry(carry.step + 1, new_alpha, new_g_alpha, new_f, new_gap,
                new_sup)


def _initial_weights(gram: jax.Array) -> jax.Array:
  """The vertex of the shortest gradient.

  The paper's code starts from the best pair instead, which costs O(K^2)
  closed forms; a vertex costs O(K), and the first Frank-Wolfe step from it
  is already the best segment through it.
  """
  k = gram.shape[0]
  return jax.nn.one_hot(jnp.argmin(jnp.diagonal(gram)), k, dtype=gram.dtype)


def _face_minimiser(gram: jax.Array, alpha: jax.Array,
                    max_iter: int) -> jax.Array:
  """Approximate affine minimiser of ``f`` on the face of ``alpha``'s support.

  Minimises ``w^T G w`` over ``{w : sum(w) = 1, w_i = 0 off S}`` (``S`` the
  support of ``alpha``) by projected conjugate gradients started at
  ``alpha``, in Jacobi-scaled variables ``y = w * sqrt(diag G)`` (so the
  scaled Gram matrix has a unit diagonal and task gradients of very different
  norms do not slow it down). The projection onto ``{c^T y = 0}`` with ``c_i
  = 1/sqrt(G_ii)`` keeps iterates on the face. Each iteration is one matrix
  vector product, O(K^2); CG needs at most ``rank`` iterations on a singular
  (rank-deficient) face, where a direct solve would need regularising.

  Returns:
    Weights summing to one on ``S`` (zero elsewhere), possibly negative.
  """
  dtype = alpha.dtype
  support = alpha > 0
  diag = jnp.diagonal(gram)
  tiny = jnp.finfo(dtype).tiny
  c = jnp.where(support & (diag > tiny),
                jax.lax.rsqrt(jnp.maximum(diag, tiny)), jnp.where(support, 1.0,
                                                                  0.0))
  cc = jnp.dot(c, c)

  def project(v):
    v = jnp.where(support, v, 0.0)
    return v - c * (jnp.dot(c, v) / cc)

  def hess(p):  # scaled Gram times p: c * (G (c * p))
    return c * (gram @ (c * p))

  y = jnp.where(support, alpha / jnp.where(support, c, 1.0), 0.0)
  r = -project(hess(y))
  rr0 = jnp.dot(r, r)
  eps = jnp.finfo(dtype).eps

  def cond(state):
    i, _, _, _, rr = state
    # Residual norm reduced by sqrt(eps): a face solve this accurate is
    # enough for the step's purpose (the gap check decides convergence), and
    # on a singular face float32 CG stagnates not far below it.
    return (i < max_iter) & (rr > eps * rr0) & (rr > tiny)

  def body(state):
    i, y, r, p, rr = state
    q = hess(p)
    pq = jnp.dot(p, q)
    step = jnp.where(pq > 0, rr / jnp.where(pq > 0, pq, 1.0), 0.0)
    y = y + step * p
    r = r - step * project(q)
    rr_new = jnp.dot(r, r)
    p = r + (rr_new / jnp.where(rr > 0, rr, 1.0)) * p
    return i + 1, y, r, p, jnp.where(pq > 0, rr_new, 0.0)

  _, y, _, _, _ = jax.lax.while_loop(cond, body,
                                     (jnp.zeros((), jnp.int32), y, r, r, rr0))
  w = jnp.where(support, y * c, 0.0)
  return w / jnp.sum(w)


def _corrective_step(gram: jax.Array, root_diag: jax.Array, c: _Carry,
                     skip: jax.Array | bool = False
                     ) -> tuple[_Carry, jax.Array]:
  """A fully corrective step: one of Wolfe's minor cycles on the support.

  Moves ``alpha`` towards the affine minimiser ``w`` of its face
  (:func:`_face_minimiser`) as far as the simplex allows, ``theta = min(1,
  min_{w_i < 0} alpha_i / (alpha_i - w_i))``, dropping the vertex that
  reaches zero. On an identified support this lands on the optimum, which
  pairwise steps approach only linearly, and a drop removes a vertex that
  pairwise steps would drain slowly. The step is kept only if it lowers
  ``f`` (recomputed exactly), so an inexact or ill-conditioned face solve can
  never make things worse.

  Returns:
    The new carry, and whether the step was kept *and* dropped a vertex (the
    face minimiser was infeasible: Wolfe would take another minor cycle).

  References:
    Wolfe, *Finding the nearest point in a polytope*, Mathematical Programming
    11, 1976.
  """
  alpha = c.alpha
  k = alpha.shape[0]
  # A solve that has finished runs no CG iteration: under ``jax.vmap`` the
  # CG loop then stops as soon as the unfinished members are done (in the
  # last round, at once), instead of running for every member.
  w = _face_minimiser(gram, alpha,
                      jnp.where(skip, 0, cg_iterations(k, alpha.dtype)))
  blocking = (alpha > 0) & (w < 0)
  ratio = jnp.where(blocking, alpha / jnp.where(blocking, alpha - w, 1.0),
                    jnp.inf)
  j = _argmin(ratio)
  theta = jnp.minimum(1.0, ratio[j])
  new = alpha + theta * (w - alpha)
  new = jnp.where((theta < 1.0) & (jnp.arange(k) == j), 0.0, new)
  new = jnp.where(alpha > 0, jnp.maximum(new, 0.0), 0.0)
  new = new / jnp.sum(new)
  # A plain product suffices to decide acceptance; the round's exact check
  # that follows recomputes G alpha accurately.
  g_alpha = gram @ new
  f, gap = _fw_gap(new, g_alpha)
  f_old = jnp.dot(c.alpha, gram @ c.alpha)  # compared in the same product
  accept = jnp.isfinite(f) & (f < f_old)
  new_c = jax.tree.map(lambda x, y: jnp.where(accept, x, y),
                       _Carry(c.step + 1, new, g_alpha, f, gap,
                              jnp.dot(new, root_diag)),
                       c._replace(step=c.step + 1))
  return new_c, accept & (theta < 1.0)


def _solve_loop(gram, alpha0, *, max_steps, tol, method, period):
  """Frank-Wolfe steps in rounds, each closed by an exact check.

  A round runs up to ``period`` cheap Frank-Wolfe steps of ``method``, which
  update ``G alpha`` in O(K) a step. The round ends with ``G alpha``
  recomputed exactly (so the certificate is honest, not an accumulation of
  rounding) and, if the exact gap still misses the tolerance, one fully
  corrective step (:func:`_corrective_step`). ``period=None`` disables the
  corrective steps (plain variant; rounds then only re-synchronise).
  """

  root_diag = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))

  def threshold(c: _Carry):
    return _threshold(c.f, c.alpha, root_diag, tol, c.support)

  if gram.dtype == jnp.float32:
    split = _split_gram(gram)  # loop-invariant: once per solve
    matvec = lambda a: _accurate_matvec(split, a)
  else:
    matvec = lambda a: gram @ a

  def exact(c: _Carry) -> _Carry:
    g_alpha = matvec(c.alpha)
    f, gap = _fw_gap(c.alpha, g_alpha)
    return c._replace(g_alpha=g_alpha, f=f, gap=gap,
                      support=jnp.dot(c.alpha, root_diag))

  def done(c: _Carry):
    return (c.step >= max_steps) | (c.gap <= threshold(c))

  def outer_cond(state):
    return ~state[1]

  def outer_body(state):
    c, _, again = state
    # After a corrective step that dropped a vertex, take another one at once
    # (Wolfe's minor cycles); otherwise run a round of cheap steps first.
    end = max_steps if period is None else jnp.minimum(
        max_steps, c.step + jnp.where(again, 0, period))
    c = jax.lax.while_loop(
        lambda c: (c.step < end) & (c.gap > threshold(c)),
        lambda c: _step(gram, c, method), c)
    c = exact(c)
    finish = done(c)
    if period is not None:
      # The carry that ends the loop is always the exactly checked one.
      corrected, again = _corrective_step(gram, root_diag, c, finish)
      c = jax.tree.map(lambda x, y: jnp.where(finish, x, y), c, corrected)
    return c, finish, again

  # alpha0 is a vertex: the plain product with it is exact.
  g_alpha0 = gram @ alpha0
  c0 = _Carry(jnp.zeros((), jnp.int32), alpha0, g_alpha0,
              *_fw_gap(alpha0, g_alpha0), jnp.dot(alpha0, root_diag))
  c, _, _ = jax.lax.while_loop(outer_cond, outer_body,
                               (c0, done(c0), jnp.zeros((), bool)))
  return c


def min_norm_element(
    gram: jax.Array,
    *,
    max_steps: int | jax.Array | None = None,
    tol: float | jax.Array | None = None,
    method: str = 'pairwise',
    corrective: bool = True,
) -> MinNormSolution:
  """Minimum-norm point of the convex hull of task gradients, from their Gram.

  Solves ``min_alpha alpha^T G alpha`` subject to ``alpha >= 0`` and
  ``sum(alpha) = 1`` by Frank-Wolfe (see the module docstring for the
  variants, the stopping rule and the handling of scale and non-finite
  input). The function is pure; use ``jax.vmap`` for a batch of Gram matrices.

  Args:
    gram: a symmetric positive semi-definite ``(K, K)`` matrix, ``K >= 1``,
      of a floating dtype. bfloat16 and float16 are solved in float32; float64
      is kept (under ``jax_enable_x64``). It is symmetrised as ``(G + G^T)/2``.
    max_steps: iteration cap; ``None`` means :func:`default_max_steps`. May be
      a traced integer (e.g. under ``optax.inject_hyperparams``).
    tol: relative tolerance on the duality gap; ``None`` means
      :func:`default_tol` for the dtype. May be traced.
    method: ``'pairwise'`` (default), ``'away_steps'`` or ``'frank_wolfe'``.
    corrective: take a corrective (Wolfe minor-cycle) step every ``2 K``
      steps while not converged. ``False`` gives the plain variant (with
      ``method='frank_wolfe'``: the paper's algorithm, slow to converge).

  Returns:
    A :class:`MinNormSolution`. ``weights``, ``sq_norm`` and ``gap`` have the
    solve dtype (float32, or float64 for float64 input).

  Raises:
    ValueError: at trace time, if ``gram`` is not a non-empty square matrix
      of a floating dtype, ``method`` is unknown, or a concrete ``tol`` is
      negative or not finite, or ``max_steps < 1``.

  Example:
    The paper's 2-D example: losses ``x^2 + y^2`` and ``-x`` at ``(-1, 1)``
    have gradients ``(-2, 2)`` and ``(-1, 0)``.

    >>> import jax.numpy as jnp
    >>> import mgda_jax
    >>> g = jnp.array([[-2.0, 2.0], [-1.0, 0.0]])
    >>> sol = mgda_jax.min_norm_element(g @ g.T)
    >>> print(jnp.round(sol.weights, 4), jnp.round(sol.sq_norm, 4))
    [0. 1.] 1.0
    >>> bool(sol.converged)
    True
  """
  gram = jnp.asarray(gram)
  if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
    raise ValueError(
        'min_norm_element expects a square (K, K) Gram matrix; got shape '
        f'{gram.shape}. For a batch of Gram matrices use '
        'jax.vmap(min_norm_element).')
  k = gram.shape[0]
  if k == 0:
    raise ValueError('min_norm_element needs at least one task; got a (0, 0) '
                     'Gram matrix.')
  check_method(method)
  checks.check_scalar('min_norm_element', 'tol', tol, low=0.0,
                      allow_none=True)
  checks.check_scalar('min_norm_element', 'max_steps', max_steps, low=1,
                      allow_none=True, integer=True)
  dtype = dtypes.solve_dtype(gram.dtype)
  gram = gram.astype(dtype)
  gram = 0.5 * (gram + gram.T)
  finite = jnp.all(jnp.isfinite(gram))
  if tol is None:
    tol = default_tol(dtype)
  if max_steps is None:
    max_steps = default_max_steps(k, dtype)
  tol = jnp.asarray(tol, dtype)
  max_steps = jnp.asarray(max_steps, jnp.int32)
  # A traced tolerance out of range cannot raise: it is reported.
  valid = jnp.isfinite(tol) & (tol >= 0) & (max_steps >= 1)
  tol = jnp.where(valid, tol, jnp.asarray(default_tol(dtype), dtype))

  # Scale-free problem: divide by the largest diagonal entry.
  scale = jnp.max(jnp.diagonal(gram))
  scale = jnp.where(finite & (scale > 0), scale, jnp.ones((), dtype))
  g = jnp.where(finite, gram / scale, jnp.zeros_like(gram))
  # Necessary conditions of positive semi-definiteness, O(K^2): a
  # non-negative diagonal and |G_st| <= sqrt(G_ss G_tt) (every 2 x 2 minor),
  # with a margin for the rounding of a computed Gram matrix.
  diag = jnp.diagonal(g)
  root = jnp.sqrt(jnp.maximum(diag, 0.0))
  psd = jnp.all(diag >= 0) & jnp.all(
      jnp.abs(g) <= (1.0 + 1e-3) * root[:, None] * root[None, :]
      + 16 * jnp.finfo(dtype).eps)
  valid = valid & psd
  g = jnp.where(valid, g, jnp.eye(k, dtype=dtype))

  zero = jnp.zeros((), jnp.int32)
  if k == 1:
    weights = jnp.ones((1,), dtype)
    steps = zero
  elif k == 2:
    weights = _two_task(g)
    steps = zero
  else:
    c = _solve_loop(g, _initial_weights(g), max_steps=max_steps, tol=tol,
                    method=method,
                    period=correction_period(k) if corrective else None)
    weights, steps = c.alpha, c.step

  # K >= 3: the loop's last exact check computed G alpha accurately.
  g_alpha = g @ weights if k <= 2 else c.g_alpha
  f_raw = jnp.dot(weights, g_alpha)
  f = jnp.maximum(f_raw, 0.0)
  gap = jnp.maximum(2.0 * (f_raw - jnp.min(g_alpha)), 0.0)
  if k <= 2:
    # Closed form: the objective is exactly quadratic along the segment, so
    # the rounding of the weights (a few ulps) costs an excess of order
    # eps^2 ||g_1 - g_2||^2, far below the floor; the linear Frank-Wolfe
    # gap overstates it, so it does not decide convergence here.
    converged = jnp.ones((), bool)
  else:
    converged = gap <= _threshold(f, weights, root, tol)
  # A solution whose objective is clearly negative proves the input is not
  # PSD (the necessary conditions above missed it).
  valid = valid & (f_raw >= -FLOOR_ULPS * jnp.finfo(dtype).eps *
                   jnp.dot(weights, root) ** 2 - tol * jnp.abs(f_raw))
  ok = finite & valid
  result = jnp.where(converged, SolverResult.CONVERGED,
                     SolverResult.MAX_STEPS_REACHED)
  result = jnp.where(valid, result, SolverResult.INVALID_INPUT)
  result = jnp.where(finite, result, SolverResult.NONFINITE)

  nan = jnp.full((), jnp.nan, dtype)
  return MinNormSolution(
      weights=jnp.where(ok, weights, nan),
      sq_norm=jnp.where(ok, f * scale, nan),
      gap=jnp.where(ok, gap * scale, nan),
      num_steps=steps,
      converged=ok & converged,
      result=result.astype(jnp.int32),
  )
