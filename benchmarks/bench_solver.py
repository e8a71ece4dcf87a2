"""Min-norm solver benchmark: mgda_jax against a Python loop and an exact QP.

Run with ``make bench`` (or ``python -m benchmarks.bench_solver``). Prints,
for K = 40 and for each problem family:

* the time of one jitted solve, and the time per problem of a vmapped batch
  of 4096 solves, and of a Python loop of single jitted solves;
* the same per-problem times of baselines measured in the same run: the
  projected-gradient solver of Sener & Koltun's code, written here from its
  description (best-pair start, projected gradient step, Eq. 4 line search,
  stop when ``sum |alpha change| < 1e-5`` or after 250 iterations), once with
  numpy-vectorised iterations and once in plain Python loops; and the exact
  host QP solver ``quadprog`` (optional: ``pip install quadprog``);
* the accuracy of each: the excess of ``alpha^T G alpha`` over the exact
  optimum (from ``tests/qp_reference.py``), relative to the optimum;
* ratios against the baselines.

``--variants`` also compares the Frank-Wolfe variants of ``mgda_jax`` (the
evidence for the default), and ``--scaling`` how the cost grows with K.

All times are medians of repeated runs after compilation, on whatever device
JAX uses by default.
"""

import argparse
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'tests'))
import qp_reference  # pylint: disable=g-import-not-at-top,wrong-import-position

import mgda_jax  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks.paper_numpy import best_pair_start  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks.paper_numpy import two_point  # pylint: disable=g-import-not-at-top,wrong-import-position

try:
  import quadprog  # pylint: disable=g-import-not-at-top
except ImportError:
  quadprog = None


# ----------------------------------------------------------------------------
# Problems


def make_grams(family: str, batch: int, k: int, seed: int = 0) -> np.ndarray:
  """A batch of Gram matrices, float64, of one problem family."""
  rng = np.random.default_rng(seed)
  if family == 'iid':
    # Independent Gaussian gradients in a large space: the optimum uses
    # (almost) every task.
    x = rng.normal(size=(batch, k, 256))
  elif family == 'hard':
    # Correlated gradients: a shared direction plus task noise of varied
    # size. The optimum leans on the tasks with least noise, a strict subset;
    # Frank-Wolfe is slow here and loose solvers stop well above the optimum.
    mu = rng.normal(size=(batch, 1, 256))
    noise = rng.normal(size=(batch, k, 256))
    sigma = rng.uniform(0.2, 1.5, size=(batch, k, 1))
    x = mu + sigma * noise
  elif family == 'rankdef':
    # Rank-deficient: K gradients in an 8-dimensional subspace.
    x = rng.normal(size=(batch, k, 8)) @ rng.normal(size=(batch, 8, 256))
  elif family == 'wide':
    # One task gradient 1000x longer than the others: the optimum lies on
    # the short ones (the Core 2.0 issue's family; float32 certificates tied
    # to the longest gradient stopped several per cent above the optimum).
    x = rng.normal(size=(batch, k, 256))
    x[np.arange(batch), rng.integers(k, size=batch)] *= 1e3
  else:
    raise ValueError(family)
  return x @ np.swapaxes(x, 1, 2)


# ----------------------------------------------------------------------------
# Baselines


def _project_simplex(y):
  """Euclidean projection onto the simplex (sort-based)."""
  u = np.sort(y)[::-1]
  css = np.cumsum(u) - 1.0
  ind = np.arange(1, len(y) + 1)
  rho = np.nonzero(u - css / ind > 0)[0][-1]
  return np.maximum(y - css[rho] / (rho + 1.0), 0.0)


def projected_gradient_numpy(g, max_iter=250, stop_crit=1e-5):
  """Python-loop projected-gradient min-norm solver, after the paper's code."""
  k = g.shape[0]
  alpha = best_pair_start(g)
  for _ in range(max_iter):
    grad = -g @ alpha
    # Projected gradient step; the step size is the smallest positive ratio
    # that takes a coordinate to 0 or 1 (ratios below 1e-7, i.e. coordinates
    # already at the boundary, are skipped, as in the paper's code).
    proj_grad = grad - grad.sum() / k
    neg = proj_grad < 0
    pos = proj_grad > 0
    ratios = np.concatenate([-alpha[neg] / proj_grad[neg],
                             (1.0 - alpha[pos]) / proj_grad[pos]])
    ratios = ratios[ratios > 1e-7]
    t = min(1.0, float(np.min(ratios))) if ratios.size else 1.0
    candidate = _project_simplex(alpha + t * proj_grad)
    v1v1 = alpha @ g @ alpha
    v1v2 = alpha @ g @ candidate
    v2v2 = candidate @ g @ candidate
    gam = two_point(v1v1, v1v2, v2v2)
    new = gam * alpha + (1 - gam) * candidate
    change = np.abs(new - alpha).sum()
    alpha = new
    if change < stop_crit:
      break
  return alpha


def projected_gradient_python(g, max_iter=250, stop_crit=1e-5):
  """The same solver in plain Python loops (lists, no numpy vectorisation).

  Every matrix-vector product and quadratic form is a double loop over task
  pairs, as in a direct transcription of the algorithm.
  """
  k = len(g)
  g = [list(map(float, row)) for row in g]

  def matvec(a):
    return [sum(g[i][j] * a[j] for j in range(k)) for i in range(k)]

  def dot(a, b):
    return sum(x * y for x, y in zip(a, b))

  alpha = [float(a) for a in best_pair_start(g)]
  for _ in range(max_iter):
    grad = [-x for x in matvec(alpha)]
    mean = sum(grad) / k
    proj = [x - mean for x in grad]
    ratios = [-a / p for a, p in zip(alpha, proj) if p < 0]
    ratios += [(1 - a) / p for a, p in zip(alpha, proj) if p > 0]
    ratios = [r for r in ratios if r > 1e-7]
    t = min([1.0] + ratios)
    candidate = list(_project_simplex(np.array(
        [a + t * p for a, p in zip(alpha, proj)])))
    g_alpha = matvec(alpha)
    v1v1 = dot(alpha, g_alpha)
    v1v2 = dot(candidate, g_alpha)
    v2v2 = dot(candidate, matvec(candidate))
    gam = two_point(v1v1, v1v2, v2v2)
    new = [gam * a + (1 - gam) * c for a, c in zip(alpha, candidate)]
    change = sum(abs(x - y) for x, y in zip(new, alpha))
    alpha = new
    if change < stop_crit:
      break
  return np.array(alpha)


def quadprog_solve(g):
  """Exact host QP (dual active set, compiled C). Needs a PD matrix."""
  k = g.shape[0]
  scale = np.max(np.diag(g))
  h = g / scale + 1e-12 * np.eye(k)
  c = np.hstack([np.ones((k, 1)), np.eye(k)])
  b = np.hstack([1.0, np.zeros(k)])
  return quadprog.solve_qp(h, np.zeros(k), c, b, meq=1)[0]


# ----------------------------------------------------------------------------
# Timing helpers


def _median_time(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


_REFERENCE_CACHE = {}
N_REFERENCE = 256  # accuracy is measured on the first 256 problems


def _reference(family, k, grams64):
  key = (family, k)
  if key not in _REFERENCE_CACHE:
    _REFERENCE_CACHE[key] = np.array(
        [qp_reference.active_set_qp(g)[1] for g in grams64[:N_REFERENCE]])
  return _REFERENCE_CACHE[key]


def _excess(grams, weights, fstar):
  n = len(fstar)
  grams, weights = grams[:n], weights[:n]
  w = np.asarray(weights, np.float64)
  f = np.einsum('bi,bij,bj->b', w, grams, w)
  # Relative to the optimum, floored at one float32 ulp of the largest
  # diagonal entry (the optimum of a rank-deficient problem is ~0).
  ulp = np.finfo(np.float32).eps * np.max(
      np.diagonal(grams, axis1=1, axis2=2), axis=1)
  return (f - fstar) / (np.maximum(fstar, 0.0) + ulp)


def _fmt_us(seconds):
  return f'{seconds * 1e6:10.1f} us'


def bench_family(family, k, batch, repeats, method_kwargs=None, label=None,
                 baselines=True, loop=True, accuracy=True):
  """Times and accuracies for one family. Returns a dict of figures."""
  method_kwargs = method_kwargs or {}
  grams64 = make_grams(family, batch, k)
  grams = jnp.asarray(grams64, jnp.float32)
  fstar = _reference(family, k, grams64) if accuracy else None

  solve = jax.jit(lambda g: mgda_jax.min_norm_element(g, **method_kwargs))
  vsolve = jax.jit(jax.vmap(lambda g: mgda_jax.min_norm_element(
      g, **method_kwargs)))
  jax.block_until_ready(solve(grams[0]))
  sols = jax.block_until_ready(vsolve(grams))

  out = {'family': family, 'batch': batch,
         'label': label or method_kwargs.get('method', 'default')}
  n_single = min(batch, 256)
  out['single'] = _median_time(
      lambda: jax.block_until_ready(solve(grams[0])), repeats * 20)
  if loop:
    t_loop = _median_time(lambda: [jax.block_until_ready(solve(grams[i]))
                                   for i in range(n_single)],
                          max(repeats // 2, 1))
    out['loop_per_problem'] = t_loop / n_single
  out['vmap_per_problem'] = _median_time(
      lambda: jax.block_until_ready(vsolve(grams)), repeats) / batch
  if accuracy:
    exc = _excess(grams64, sols.weights, fstar)
    out['excess_median'] = float(np.median(exc))
    out['excess_max'] = float(np.max(exc))
  out['steps_mean'] = float(np.mean(sols.num_steps))
  out['steps_max'] = int(np.max(sols.num_steps))
  out['converged'] = float(np.mean(sols.converged))

  if baselines:
    def host(name, solver, n, reps):
      """Time a host solver on the first n problems; keep its weights."""
      n = min(n, len(fstar))
      runs = []
      for _ in range(reps):
        t0 = time.perf_counter()
        w = np.stack([solver(grams64[i]) for i in range(n)])
        runs.append(time.perf_counter() - t0)
      out[f'{name}_per_problem'] = float(np.median(runs)) / n
      exc = _excess(grams64, w, fstar[:n])
      out[f'{name}_excess_median'] = float(np.median(exc))
      out[f'{name}_excess_max'] = float(np.max(exc))

    host('pg', projected_gradient_numpy, 64, 1)
    host('py', projected_gradient_python, 8, 1)
    if quadprog is not None:
      host('qp', quadprog_solve, N_REFERENCE, max(repeats // 2, 1))
  return out


def print_family(r):
  print(f"\n== K=40, family '{r['family']}', mgda_jax {r['label']} "
        f"(float32) ==")
  print(f"  steps mean {r['steps_mean']:.1f}, max {r['steps_max']}; "
        f"converged {100 * r['converged']:.1f}%")
  rows = [('mgda_jax one jitted solve', r['single'], r['excess_median'],
           r['excess_max']),
          ('mgda_jax Python loop of jitted solves', r['loop_per_problem'],
           None, None),
          (f"mgda_jax vmap, batch of {r['batch']}", r['vmap_per_problem'],
           None, None)]
  if 'pg_per_problem' in r:
    rows.append(('projected gradient, numpy-vectorised', r['pg_per_problem'],
                 r['pg_excess_median'], r['pg_excess_max']))
    rows.append(('projected gradient, plain Python loops',
                 r['py_per_problem'], r['py_excess_median'],
                 r['py_excess_max']))
  if 'qp_per_problem' in r:
    rows.append(('quadprog (exact, float64), loop', r['qp_per_problem'],
                 r['qp_excess_median'], r['qp_excess_max']))
  print(f"  {'solver':42s} {'time/problem':>13s}   rel. excess median / max")
  for name, t, em, ex in rows:
    acc = '' if em is None else f'   {em:9.1e} / {ex:9.1e}'
    print(f'  {name:42s} {_fmt_us(t)}{acc}')
  v = r['vmap_per_problem']
  print('  ratios (baseline time / mgda_jax vmap time per problem):')
  if 'pg_per_problem' in r:
    print(f"    projected gradient, numpy   : {r['pg_per_problem'] / v:8.0f}x")
    print(f"    projected gradient, Python  : {r['py_per_problem'] / v:8.0f}x")
  if 'qp_per_problem' in r:
    print(f"    quadprog                    : {r['qp_per_problem'] / v:8.1f}x")
  print(f"    loop of jitted solves       : {r['loop_per_problem'] / v:8.1f}x")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=4096)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--families', default='iid,hard,rankdef,wide')
  parser.add_argument('--variants', action='store_true',
                      help='also compare the Frank-Wolfe variants')
  parser.add_argument('--scaling', action='store_true',
                      help='also report cost against K')
  parser.add_argument('--only-scaling', action='store_true',
                      help='skip the K=40 comparison')
  args = parser.parse_args(argv)

  print(f'jax {jax.__version__} on {jax.devices()[0].platform} '
        f'({jax.devices()[0].device_kind}); {platform.processor() or ""} '
        f'{os.cpu_count()} CPUs; quadprog '
        f"{'available' if quadprog else 'not installed'}")
  if not args.only_scaling:
    for family in args.families.split(','):
      print_family(bench_family(family, 40, args.batch, args.repeats))

  if args.variants:
    print('\n== Frank-Wolfe variants, K=40, vmapped batch (float32) ==')
    print(f"  {'family':8s} {'variant':28s} {'time/problem':>13s} "
          f"{'steps mean/max':>15s} {'conv.':>6s} {'max rel. excess':>15s}")
    variants = [
        ('pairwise + corrective', dict(method='pairwise')),
        ('away_steps + corrective', dict(method='away_steps')),
        ('frank_wolfe + corrective', dict(method='frank_wolfe')),
        ('pairwise, no corrective', dict(method='pairwise', corrective=False)),
        ('away_steps, no corrective', dict(method='away_steps',
                                           corrective=False)),
        ('frank_wolfe, no corrective', dict(method='frank_wolfe',
                                            corrective=False)),
    ]
    for family in args.families.split(','):
      for label, kw in variants:
        r = bench_family(family, 40, args.batch, args.repeats, kw, label,
                         baselines=False, loop=False)
        print(f"  {family:8s} {label:28s} {_fmt_us(r['vmap_per_problem'])} "
              f"{r['steps_mean']:7.1f}/{r['steps_max']:<7d} "
              f"{100 * r['converged']:5.1f}% {r['excess_max']:15.1e}")

  if args.scaling or args.only_scaling:
    print('\n== cost against K, family iid and hard, float32 ==')
    print(f"  {'K':>4s} {'family':8s} {'one solve':>13s} "
          f"{'vmap/problem':>13s} {'steps mean':>10s}")
    for k in (2, 10, 40, 100, 256):
      for family in ('iid', 'hard'):
        batch = max(16, min(args.batch, 2 ** 22 // (k * k)))
        r = bench_family(family, k, batch, args.repeats, baselines=False,
                         loop=False, accuracy=False)
        print(f"  {k:4d} {family:8s} {_fmt_us(r['single'])} "
              f"{r['vmap_per_problem'] * 1e6:10.2f} us {r['steps_mean']:10.1f}")


if __name__ == '__main__':
  main()
