"""Network selection: which groups of tasks to train, given an affinity.

Given a ``(K, K)`` affinity ``A`` (``A[i, j]``: the benefit to task ``j``
from training with task ``i``, e.g. TAG's training-averaged lookahead
affinity, the cosine-similarity baseline, or HOA's pairwise gains) and a
budget of ``b`` networks, TAG (Fifty et al. 2021, Sec. 3.2) scores task
``j`` inside a group ``G`` by the mean affinity onto it from the other
members,

.. math::

  s_j(G) = \\frac{1}{|G| - 1} \\sum_{i \\in G \\setminus \\{j\\}} A_{ij},
  \\qquad s_j(\\{j\\}) = c_{\\text{single}} \\; (\\text{default } -10^6),

and chooses at most ``b`` groups (they may overlap) covering every task that
maximise

.. math::

  S(\\mathcal{G}) = \\frac{1}{K} \\sum_j \\max_{G \\in \\mathcal{G},\\, j \\in G}
  s_j(G) .

Each task is served by its best group. The official code enumerates every
collection of at most ``b`` of the ``2^K - 1`` subsets. Here the search is
exact in ``O(b 3^K)`` by this equivalence: the serving sets ``P_1..P_b`` of an
optimal collection partition the tasks, with ``P_k`` inside group ``G_k``, so

.. math::

  \\max_{\\mathcal{G}} S = \\frac{1}{K} \\max_{\\text{partitions}\\ P_1..P_m,
  \\ m \\le b} \\sum_k f(P_k), \\qquad
  f(P) = \\max_{G \\supseteq P} \\sum_{j \\in P} s_j(G)

(">=": the groups ``G_k`` attaining ``f(P_k)`` cover every task and serve each
at least as well; "<=": a collection's serving sets are such a partition).
``f`` is a maximum over the ``3^K`` pairs ``P <= G`` and the partition a
dynamic programme over the same pairs, both vectorised in numpy. Past
``max_exact_tasks`` (default 14: ``3^14 = 4.8e6`` pairs; 0.4 s at 12 tasks
and 3-5 s at 14 on a 2-core CPU) a local search takes over (see
:func:`select_groups`) and the result says ``exact=False``.

References:
  Fifty et al., "Efficiently Identifying Task Groupings for Multi-Task
  Learning", NeurIPS 2021, https://arxiv.org/abs/2109.04617.
  Standley et al., "Which Tasks Should Be Learned Together in Multi-task
  Learning?", ICML 2020, https://arxiv.org/abs/1905.07553 (HOA).
"""

from typing import NamedTuple, Sequence

import numpy as np

SINGLETON_SCORE = -1e6
_CHUNK = 1 << 18


class TaskGrouping(NamedTuple):
  """A selected collection of task groups.

  Attributes:
    groups: the groups, each a sorted tuple of task indices.
    serving: for each task, the index (into ``groups``) of the group that
      serves it: the one where its score is highest.
    score: ``S``, the mean over tasks of the serving group's score.
    task_scores: ``(K,)``, each task's score in its serving group.
    exact: whether ``score`` is the proven optimum (False: local search).
  """

  groups: tuple[tuple[int, ...], ...]
  serving: tuple[int, ...]
  score: float
  task_scores: np.ndarray
  exact: bool


def _check_affinity(affinity) -> np.ndarray:
  a = np.asarray(affinity, dtype=np.float64)
  if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
    raise ValueError(f'the affinity must be a (K, K) matrix with K >= 1; got '
                     f'shape {a.shape}.')
  off = ~np.eye(a.shape[0], dtype=bool)
  if not np.all(np.isfinite(a[off])):
    bad = np.argwhere(~np.isfinite(a) & off)
    raise ValueError('the affinity has non-finite off-diagonal entries (e.g. '
                     f'[source, target] = {bad[0].tolist()}); a NaN means no '
                     'finite affinity was recorded there.')
  a = a.copy()
  np.fill_diagonal(a, 0.0)  # never read (a task's affinity onto itself)
  return a


def group_scores(affinity, group: Sequence[int],
                 singleton_score: float = SINGLETON_SCORE) -> np.ndarray:
  """``s_j(G)`` for each ``j`` in ``group`` (in the group's order)."""
  a = _check_affinity(affinity)
  g = list(group)
  if len(set(g)) != len(g) or not g or any(
      not 0 <= t < a.shape[0] for t in g):
    raise ValueError(f'a group must be distinct task indices in [0, '
                     f'{a.shape[0]}); got {group}')
  if len(g) == 1:
    return np.array([singleton_score])
  sub = a[np.ix_(g, g)]
  return (sub.sum(0) - np.diag(sub)) / (len(g) - 1)


def collection_score(affinity, groups: Sequence[Sequence[int]],
                     singleton_score: float = SINGLETON_SCORE
                     ) -> tuple[float, np.ndarray, tuple[int, ...]]:
  """``(S, per-task best score, serving group index)`` of a collection.

  Raises ``ValueError`` if the groups do not cover every task.
  """
  a = _check_affinity(affinity)
  k = a.shape[0]
  best = np.full(k, -np.inf)
  serving = [-1] * k
  for n, g in enumerate(groups):
    for t, s in zip(g, group_scores(a, g, singleton_score)):
      if s > best[t]:
        best[t], serving[t] = s, n
  if -1 in serving:
    missing = [t for t in range(k) if serving[t] == -1]
    raise ValueError(f'the groups {groups} do not cover tasks {missing}.')
  return float(best.mean()), best, tuple(serving)


def _subset_scores(a: np.ndarray, singleton_score: float) -> np.ndarray:
  """``(2^K, K)``: ``s_j(S)`` for ``j`` in ``S``, -inf for ``j`` not in ``S``."""
  k = a.shape[0]
  colsum = np.zeros((1, k))
  for b in range(k):  # colsum[S] = sum_{i in S} A[i, :], by doubling
    colsum = np.concatenate([colsum, colsum + a[b]], axis=0)
  masks = np.arange(1 << k)
  member = ((masks[:, None] >> np.arange(k)) & 1).astype(bool)
  size = member.sum(1)
  s = (colsum - np.diag(a)[None, :]) / np.maximum(size - 1, 1)[:, None]
  s[size == 1] = singleton_score
  s[~member] = -np.inf
  return s


def _pairs(k: int):
  """``(P, G)`` for every ``P <= G`` of ``k`` bits, in chunks (ternary)."""
  total = 3 ** k
  for start in range(0, total, _CHUNK):
    t = np.arange(start, min(total, start + _CHUNK), dtype=np.int64)
    p = np.zeros_like(t)
    g = np.zeros_like(t)
    for b in range(k):
      d = t % 3
      t //= 3
      g |= (d >= 1).astype(np.int64) << b
      p |= (d == 2).astype(np.int64) << b
    yield p, g


def _scatter_max(n: int, index, value, arg):
  """Per-``index`` maximum of ``value`` and an ``arg`` attaining it."""
  best = np.full(n, -np.inf)
  np.maximum.at(best, index, value)
  hit = value == best[index]
  out = np.full(n, -1, dtype=np.int64)
  out[index[hit]] = arg[hit]
  return best, out


def _exact(a: np.ndarray, budget: int, singleton_score: float):
  k = a.shape[0]
  n = 1 << k
  s = _subset_scores(a, singleton_score)
  s_fin = np.where(np.isfinite(s), s, 0.0)
  # f(P) = max_{G >= P} sum_{j in P} s_j(G), and its maximising G.
  f = np.full(n, -np.inf)
  f_arg = np.full(n, -1, dtype=np.int64)
  bits = np.arange(k)
  for p, g in _pairs(k):
    keep = p > 0
    p, g = p[keep], g[keep]
    pm = ((p[:, None] >> bits) & 1).astype(np.float64)
    h = np.einsum('nk,nk->n', pm, s_fin[g])
    best, arg = _scatter_max(n, p, h, g)
    better = best > f
    f[better], f_arg[better] = best[better], arg[better]
  # dp[m][M]: the best sum of f over partitions of M into at most m blocks;
  # each block holds M's lowest task, so each partition is met once.
  dp = np.full(n, -np.inf)
  dp[0] = 0.0
  choices = []
  for _ in range(budget):
    new = dp.copy()
    choice = np.zeros(n, dtype=np.int64)  # 0: fewer blocks suffice
    for p, m in _pairs(k):
      low = m & -m
      keep = (p & low) > 0
      p, m = p[keep], m[keep]
      val = f[p] + dp[m ^ p]
      best, arg = _scatter_max(n, m, val, p)
      better = best > new
      new[better], choice[better] = best[better], arg[better]
    choices.append(choice)
    dp = new
  groups = []
  mask, m = n - 1, budget
  while mask:
    while choices[m - 1][mask] == 0:
      m -= 1
    p = int(choices[m - 1][mask])
    groups.append(int(f_arg[p]))
    mask ^= p
    m -= 1
  return [tuple(int(t) for t in range(k) if g >> t & 1) for g in groups]


def _helped_group(a: np.ndarray, p: tuple[int, ...], singleton_score: float):
  """``G >= P`` by greedily adding the helper that most raises
  ``sum_{j in P} s_j(G)``, while one does; returns ``(G, value)``."""
  k = a.shape[0]
  p_idx = np.asarray(p)
  diag = np.diag(a)[p_idx]
  in_g = np.zeros(k, dtype=bool)
  in_g[p_idx] = True
  size = len(p)
  # numerator: sum_{j in P} (sum_{i in G} A[i, j] - A[j, j]).
  num = a[np.ix_(p_idx, p_idx)].sum() - diag.sum()
  value = num / (size - 1) if size > 1 else singleton_score * size
  onto_p = a[:, p_idx].sum(1)  # sum_{j in P} A[c, j], for every c
  while True:
    cand = np.where(in_g, -np.inf, (num + onto_p) / size)
    c = int(np.argmax(cand))
    if not cand[c] > value + 1e-12:
      return tuple(sorted(np.flatnonzero(in_g).tolist())), value
    in_g[c] = True
    num += onto_p[c]
    size += 1
    value = cand[c]


def _local_search(a: np.ndarray, budget: int, singleton_score: float,
                  restarts: int, seed: int):
  """Partitions of the tasks into at most ``budget`` serving sets, improved
  by single-task moves until none helps; each set's group is the set plus
  greedily added helpers (:func:`_helped_group`). Starts: all tasks
  together, and ``restarts`` random partitions."""
  k = a.shape[0]
  rng = np.random.default_rng(seed)
  cache = {}

  def value(members) -> float:
    key = tuple(sorted(members))
    if not key:
      return 0.0
    if key not in cache:
      cache[key] = _helped_group(a, key, singleton_score)
    return cache[key][1]

  best_blocks, best_total = None, -np.inf
  starts = [np.zeros(k, dtype=int)] + [rng.integers(0, budget, k)
                                       for _ in range(restarts)]
  for labels in starts:
    blocks = [set(np.flatnonzero(labels == b).tolist())
              for b in range(budget)]
    current = sum(value(b) for b in blocks)
    improved = True
    while improved:
      improved = False
      for t in range(k):
        src = next(n for n, b in enumerate(blocks) if t in b)
        for dst in range(budget):
          if dst == src:
            continue
          before = value(blocks[src]) + value(blocks[dst])
          after = value(blocks[src] - {t}) + value(blocks[dst] | {t})
          if after > before + 1e-12:
            blocks[src].discard(t)
            blocks[dst].add(t)
            current += after - before
            improved = True
            src = dst
    if current > best_total:
      best_total, best_blocks = current, [set(b) for b in blocks]
  return [_helped_group(a, tuple(sorted(b)), singleton_score)[0]
          for b in best_blocks if b]


def select_groups(affinity, budget: int, *,
                  singleton_score: float = SINGLETON_SCORE,
                  max_exact_tasks: int = 14, restarts: int = 20,
                  seed: int = 0) -> TaskGrouping:
  """TAG's network selection: at most ``budget`` groups covering the tasks.

  Args:
    affinity: ``(K, K)``, ``[i, j]`` the affinity of task ``i`` onto task
      ``j`` (:func:`average_affinity` of :func:`lookahead_affinity`, or
      :func:`cosine_affinity`, or :func:`hoa_affinity`); the diagonal is not
      read. Off-diagonal entries must be finite.
    budget: the number of networks, ``b >= 1``.
    singleton_score: the score of a task alone in a group.
    max_exact_tasks: up to this ``K`` the search is exact (``O(b 3^K)``
      time, ``O(2^K K)`` memory; 14 tasks take 3-5 s on a 2-core CPU, each
      further task about three times as long). Past it, a local search:
      partitions of the tasks into at most ``budget`` serving sets, from
      all-in-one and ``restarts`` random starts, improved by moving one task
      at a time while that helps, each set's group being the set plus
      greedily added helper tasks. It finds a valid cover whose score is a
      lower bound on the optimum (1.2 s for 40 tasks); on random 9- to
      14-task instances it matched the exact optimum.
    restarts: random starts of the local search (beyond all-in-one).
    seed: its seed.

  Returns:
    A :class:`TaskGrouping`; ``exact`` says which search produced it.

  Raises:
    ValueError: for a non-square or non-finite affinity, or ``budget < 1``.

  Example:
    >>> import numpy as np
    >>> from mgda_jax import tag
    >>> a = np.array([[0, 1, -1, -1], [1, 0, -1, -1],
    ...               [-1, -1, 0, 1], [-1, -1, 1, 0]], float)
    >>> g = tag.select_groups(a, budget=2)
    >>> g.groups, g.score
    (((0, 1), (2, 3)), 1.0)
  """
  a = _check_affinity(affinity)
  if not isinstance(budget, (int, np.integer)) or budget < 1:
    raise ValueError(f'select_groups: budget must be an int >= 1; got '
                     f'{budget!r}.')
  k = a.shape[0]
  budget = int(min(budget, k))
  if k == 1:
    groups, exact = [(0,)], True
  elif k <= max_exact_tasks:
    groups, exact = _exact(a, budget, singleton_score), True
  else:
    groups = _local_search(a, budget, singleton_score, restarts, seed)
    exact = False
  groups = tuple(sorted(set(groups)))
  score, task_scores, serving = collection_score(a, groups, singleton_score)
  return TaskGrouping(groups=groups, serving=serving, score=score,
                      task_scores=task_scores, exact=exact)


def hoa_affinity(pair_values, single_values,
                 higher_is_better: bool = True) -> np.ndarray:
  """HOA's pairwise affinity (Standley et al. 2020), for :func:`select_groups`.

  HOA trains every pair of tasks and approximates a task's result in a
  larger group by the mean of its results in the pairs inside it: the same
  score as TAG's with ``A[i, j]`` the gain of task ``j`` from being trained
  with task ``i``, relative to training alone:

  .. math::

    A_{ij} = \\pm \\frac{M_j(\\{i, j\\}) - M_j(\\{j\\})}{|M_j(\\{j\\})|} .

  Args:
    pair_values: ``(K, K)``, ``[i, j]`` = task ``j``'s metric in the network
      trained on ``{i, j}`` (the diagonal is not read).
    single_values: ``(K,)``, each task's metric trained alone.
    higher_is_better: the metric's direction (accuracy: True).

  Returns:
    ``(K, K)``, zero on the diagonal.
  """
  p = np.asarray(pair_values, np.float64)
  s = np.asarray(single_values, np.float64)
  if p.ndim != 2 or p.shape != (s.shape[0], s.shape[0]):
    raise ValueError(f'hoa_affinity: pair_values must be (K, K) and '
                     f'single_values (K,); got {p.shape} and {s.shape}.')
  sign = 1.0 if higher_is_better else -1.0
  a = sign * (p - s[None, :]) / np.abs(s)[None, :]
  np.fill_diagonal(a, 0.0)
  return a
