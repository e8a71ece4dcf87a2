"""Fully-adaptive feature sharing (Lu et al. 2017): a branched network grown
top-down by grouping tasks.

FAFS is a procedure, not a fixed architecture. It starts from a thin network
in which every layer is shared by all tasks (one task-specific output layer
each) and widens it one layer at a time, from the top down. At the *active
layer* ``l`` the branches above it (the tasks, in the first round) are
grouped by affinity; the layer is replicated once per group, each copy
initialised *by copying* the old layer's weights (so the function does not
change), and each group's branches are attached to their own copy. Then
layer ``l - 1`` becomes the active layer. The result is a tree: a
:class:`Branched` hard-sharing network.

**Task affinity** (the paper's error-correlation criterion, Sec. 4.2): with
``m_i^n`` the margin of task ``i`` on example ``n`` (``|p - g|`` for a
binary attribute; any "how wrong" score), ``e_i^n = 1[m_i^n >= E_n m_i]``
marks the example as difficult for task ``i``, and

.. math::

  A(i, j) = \\mathbb E_n\\big[e_i^n e_j^n + (1 - e_i^n)(1 - e_j^n)\\big],

the probability that the two tasks find an example easy together or hard
together (:func:`error_affinity`). This module uses that criterion, as the
paper does; any symmetric affinity with values in ``[0, 1]`` can be passed
instead.

**Branch affinity** between branches ``k`` and ``l`` (sets of tasks):
``A~_b(k, l) = mean_{i in k} min_{j in l} A(i, j)`` and ``A_b(k, l) =
(A~_b(k, l) + A~_b(l, k)) / 2`` (:func:`branch_affinity`).

**Grouping** the ``n`` branches at a junction into ``d`` groups
``g_d = (g^1, ..., g^d)`` minimises

.. math::

  L(g_d) = (d - 1)\\, L_0\\, 2^{p_l} + \\alpha\\, L_s(g_d), \\qquad
  L_s(g_d) = \\frac1d \\sum_{k=1}^d \\Big(1 - \\operatorname*{mean}_{b \\in g^k}
  \\min_{b' \\in g^k} A_b(b, b')\\Big),

a cost per new branch (``L_0 2^{p_l}``, ``p_l`` the number of pooling layers
above layer ``l``: branching low in the network costs more) against the
separation of dissimilar branches (``alpha`` trades them). Here the best
``g_d`` for each ``d`` is found exactly by enumerating set partitions up to
``exact_max`` branches (default 8: 4140 partitions), and above it by greedy
agglomeration (merge the two groups whose union has the highest within-group
affinity); the official code (``luyongxi/deep_share``) uses spectral
clustering on ``A_b`` instead. Then ``d = argmin_d L(g_d)``
(:func:`group_branches`).

Not built: the thin network's initialisation from a pretrained wide network
by simultaneous orthogonal matching pursuit (the paper's Sec. 4.1); start
:func:`fafs` from your own (thin, possibly pretrained) blocks.

**Shared parameters and Z.** In a :class:`Branched` network a block is
shared when its group holds two or more tasks. The representation ``Z`` is
the tuple of the distinct tensors at which tasks leave shared blocks: the
output of each task's deepest multi-task group (an empty ``(B, 0)`` entry
for a task alone from the first layer: it reads ``x``, and no shared
parameter reaches it, so its gradient of the shared parameters is zero on
both paths; with such a task MGDA's min-norm point is zero and the shared
blocks do not move, as the maths of MGDA says for a task that is already
stationary in them). Every shared parameter reaches task ``t`` only
through its entry of ``Z``, so MGDA-UB's bound holds as for any ``Z`` (see
:mod:`mgda_jax.nn`'s base docstring); task ``t``'s own blocks and its
decoder are its task-specific parameters. Tasks that leave at different
tensors have orthogonal gradients at ``Z`` (zero Gram entries), so MGDA-UB
couples only the tasks that leave together; full MGDA, on the parameter
gradients, couples every pair that shares a block.

References:
  Lu, Kumar, Zhai, Cheng, Javidi, Feris, Fully-adaptive Feature Sharing in
  Multi-Task Networks with Applications in Person Attribute
  Classification, CVPR 2017, arXiv:1611.05377.
"""

import itertools
from typing import Callable, Mapping, NamedTuple, Sequence

from flax import nnx
import jax.numpy as jnp
import numpy as np

from mgda_jax._src.nn import base

Factory = Callable[[nnx.Rngs], nnx.Module]
Groups = tuple[tuple[int, ...], ...]


def _check_partition(groups, k, what):
  flat = sorted(t for g in groups for t in g)
  if flat != list(range(k)) or any(not g for g in groups):
    raise ValueError(f'{what}: the groups must partition the tasks 0..{k - 1}'
                     f' into non-empty sets; got {groups}.')


def _canonical(groups) -> Groups:
  return tuple(sorted(tuple(sorted(int(t) for t in g)) for g in groups))


class Branched(base.MTLArchitecture):
  """A tree-shaped hard-sharing network: at layer ``l`` the tasks are
  partitioned into groups, and each group has its own copy of block ``l``.

  ``groups[l]`` partitions the tasks ``0..K-1``; ``groups[l + 1]`` must
  refine ``groups[l]`` (a branch never re-joins). Group ``g`` at layer ``l``
  reads the output of the group at layer ``l - 1`` that contains it (the
  input ``x`` at layer 0), and decoder ``t`` reads the output of task
  ``t``'s group at the last layer. With every ``groups[l] = ((0, ...,
  K-1),)`` this is :class:`~mgda_jax.nn.HardSharing` over the sequence of
  blocks; with every group a single task, ``K`` independent networks.
  See the module docstring for the shared parameters and ``Z``.

  Args:
    blocks: one factory ``rngs -> module`` per layer (called once per
      group).
    decoders: one module per task (a list or a dict).
    rngs: passed to the factories.
    groups: one partition per layer (default: all tasks share every layer,
      FAFS's thin start).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import mgda_jax.nn
    >>> rngs = nnx.Rngs(0)
    >>> model = mgda_jax.nn.Branched(
    ...     [lambda r: nnx.Linear(3, 8, rngs=r),
    ...      lambda r: nnx.Linear(8, 8, rngs=r)],
    ...     [nnx.Linear(8, 1, rngs=rngs) for _ in range(3)], rngs=rngs,
    ...     groups=[[(0, 1, 2)], [(0, 1), (2,)]])
    >>> [o.shape for o in model(jnp.ones((5, 3)))]
    [(5, 1), (5, 1), (5, 1)]
    >>> model.groups
    (((0, 1, 2),), ((0, 1), (2,)))
  """

  def __init__(self, blocks: Sequence[Factory],
               decoders: Sequence[nnx.Module] | Mapping[str, nnx.Module], *,
               rngs: nnx.Rngs, groups: Sequence[Sequence[Sequence[int]]]
               | None = None):
    self.decoders, self.task_names, self.as_dict = base.task_container(
        decoders, 'Branched decoders')
    blocks = list(blocks)
    if not blocks:
      raise ValueError('Branched needs at least one block.')
    k = len(self.task_names)
    if groups is None:
      groups = [[tuple(range(k))]] * len(blocks)
    groups = tuple(_canonical(g) for g in groups)
    if len(groups) != len(blocks):
      raise ValueError(f'Branched: one partition per block ({len(blocks)}); '
                       f'got {len(groups)}.')
    for l, g in enumerate(groups):
      _check_partition(g, k, f'Branched groups[{l}]')
    for l in range(1, len(groups)):
      for g in groups[l]:
        if not any(set(g) <= set(p) for p in groups[l - 1]):
          raise ValueError(
              f'Branched: groups[{l}] must refine groups[{l - 1}] (a branch '
              f'never re-joins); {g} is not inside one of {groups[l - 1]}.')
    self.groups = groups
    self.blocks = nnx.List([nnx.List([make(rngs) for _ in g])
                            for make, g in zip(blocks, groups)])

  def _parent(self, layer, group):
    """The index of the group at ``layer - 1`` containing ``group``."""
    for i, p in enumerate(self.groups[layer - 1]):
      if set(group) <= set(p):
        return i
    raise AssertionError('unreachable: groups are checked to refine')

  def _group_of(self, layer, task):
    for i, g in enumerate(self.groups[layer]):
      if task in g:
        return i
    raise AssertionError('unreachable: groups are checked to partition')

  def _leave(self, task):
    """``(layer, group)`` of ``task``'s deepest multi-task group (``None``
    if it is alone from layer 0): where ``Z`` is read."""
    out = None
    for l in range(len(self.groups)):
      g = self._group_of(l, task)
      if len(self.groups[l][g]) > 1:
        out = (l, g)
    return out

  def z_sources(self) -> tuple:
    """The distinct ``(layer, group)`` entries of ``Z`` (``None`` for ``x``),
    in a fixed order; :meth:`decode_task` reads entry ``z_index(t)``."""
    seen = []
    for t in range(self.num_tasks):
      s = self._leave(t)
      if s not in seen:
        seen.append(s)
    return tuple(seen)

  def z_index(self, task) -> int:
    return self.z_sources().index(self._leave(task))

  def _run(self, x, until):
    """Outputs of every multi-task group up to layer ``until`` (inclusive):
    only shared blocks (a multi-task group's parent is multi-task too)."""
    outs = {}
    for l in range(until + 1):
      for i, g in enumerate(self.groups[l]):
        if len(g) < 2:
          continue
        h = x if l == 0 else outs[(l - 1, self._parent(l, g))]
        outs[(l, i)] = self.blocks[l][i](h)
    return outs

  def represent(self, x):
    sources = self.z_sources()
    deepest = max((s[0] for s in sources if s is not None), default=-1)
    outs = self._run(x, deepest) if deepest >= 0 else {}
    # A task alone from the first block reads x itself; its Z entry is
    # empty (no shared parameter reaches it: a zero gradient at Z, as its
    # gradient of the shared parameters is).
    return tuple(jnp.zeros((x.shape[0], 0), x.dtype) if s is None
                 else outs[s] for s in sources)

  def decode_task(self, task, z, x):
    src = self._leave(task)
    h = x if src is None else z[self.z_index(task)]
    start = 0 if src is None else src[0] + 1
    for l in range(start, len(self.groups)):
      h = self.blocks[l][self._group_of(l, task)](h)
    return base.task_part(self.decoders, self.task_names, self.as_dict,
                          task)(h)

  def is_shared(self, path):
    if path[:1] != ('blocks',) or len(path) < 3:
      return False
    layer, group = path[1], path[2]
    return len(self.groups[layer][group]) > 1


def widen(model: Branched, layer: int,
          grouping: Sequence[Sequence[int]]) -> Branched:
  """``model`` with block ``layer`` split: one copy per group of branches.

  The branches at the junction above ``layer`` are the groups at ``layer +
  1`` (the single tasks when ``layer`` is the last block). ``grouping`` lists,
  per new copy, the branches (as task tuples of ``model.groups[layer + 1]``,
  or task indices at the last layer) that attach to it. Each copy starts as
  a clone of the block it replaces, so the widened network computes the
  same function. Returns a new model; ``model`` is unchanged.

  Raises:
    ValueError: for a layer out of range, or a grouping that does not
      partition the branches of one group at ``layer``.
  """
  n = len(model.groups)
  if not 0 <= layer < n:
    raise ValueError(f'widen: layer must be in [0, {n}); got {layer}.')
  above = (model.groups[layer + 1] if layer + 1 < n else
           tuple((t,) for t in range(model.num_tasks)))
  clusters = []
  for c in grouping:
    if not len(c):
      raise ValueError(f'widen: an empty group in {list(grouping)}.')
    tasks = []
    for b in c:
      b = tuple(sorted(b)) if isinstance(b, (tuple, list)) else (int(b),)
      if b not in above:
        raise ValueError(f'widen: {b} is not a branch above layer {layer} '
                         f'(those are {above}).')
      tasks.extend(b)
    clusters.append(tuple(sorted(tasks)))
  new_groups = []
  for g in model.groups[layer]:
    inside = [c for c in clusters if set(c) <= set(g)]
    if sorted(t for c in inside for t in c) != list(g):
      raise ValueError(f'widen: the grouping {list(grouping)} must partition '
                       f'the branches of group {g} at layer {layer}.')
    new_groups.extend(inside)
  if sorted(t for c in clusters for t in c) != list(range(model.num_tasks)):
    raise ValueError(f'widen: the grouping {list(grouping)} must cover every '
                     'branch exactly once.')
  new = nnx.clone(model)
  groups = list(model.groups)
  groups[layer] = _canonical(new_groups)
  _check_partition(groups[layer], model.num_tasks, f'widen layer {layer}')
  copies = []
  for g in groups[layer]:
    parent = next(i for i, p in enumerate(model.groups[layer])
                  if set(g) <= set(p))
    copies.append(nnx.clone(model.blocks[layer][parent]))
  new.blocks[layer] = nnx.List(copies)
  new.groups = tuple(groups)
  return new


def error_affinity(margins) -> np.ndarray:
  """The paper's task affinity ``A(i, j)`` from margins ``(N, K)``.

  ``e_i^n = 1[m_i^n >= mean_n m_i^n]`` (difficult), ``A(i, j) = mean_n
  (e_i e_j + (1 - e_i)(1 - e_j))``. NaN margins (unlabelled examples) are
  left out of the pair's mean. Returns a ``(K, K)`` float64 matrix with
  ones on the diagonal.
  """
  m = np.asarray(margins, np.float64)
  if m.ndim != 2 or m.shape[0] == 0:
    raise ValueError(f'margins must be (N, K) with N > 0; got {m.shape}.')
  valid = np.isfinite(m)
  mean = np.nanmean(np.where(valid, m, np.nan), axis=0)
  e = (m >= mean).astype(np.float64)
  v = valid.astype(np.float64)
  both = v.T @ v
  agree = (e * v).T @ (e * v) + ((1 - e) * v).T @ ((1 - e) * v)
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(both > 0, agree / np.maximum(both, 1), np.nan)


def branch_affinity(affinity, branches: Sequence[Sequence[int]]) -> np.ndarray:
  """``A_b(k, l) = (A~_b(k, l) + A~_b(l, k)) / 2``, ``A~_b(k, l) = mean_{i in
  k} min_{j in l} A(i, j)``, for branches given as task sets."""
  a = np.asarray(affinity, np.float64)
  n = len(branches)
  at = np.empty((n, n))
  for p, bk in enumerate(branches):
    for q, bl in enumerate(branches):
      at[p, q] = np.mean(a[np.ix_(list(bk), list(bl))].min(axis=1))
  return 0.5 * (at + at.T)


def separation(ab, grouping) -> float:
  """``L_s(g_d) = (1/d) sum_k (1 - mean_{b in g^k} min_{b' in g^k}
  A_b(b, b'))`` for a grouping of branch indices."""
  total = 0.0
  for g in grouping:
    g = list(g)
    total += 1.0 - float(np.mean(ab[np.ix_(g, g)].min(axis=1)))
  return total / len(grouping)


def _partitions(items):
  if not items:
    yield []
    return
  first, rest = items[0], items[1:]
  for part in _partitions(rest):
    for i in range(len(part)):
      yield part[:i] + [[first] + part[i]] + part[i + 1:]
    yield [[first]] + part


def _best_exact(ab, n):
  best = {}
  for part in _partitions(list(range(n))):
    d = len(part)
    s = separation(ab, part)
    if d not in best or s < best[d][0] - 1e-15:
      best[d] = (s, part)
  return best


def _best_greedy(ab, n):
  part = [[i] for i in range(n)]
  best = {n: (separation(ab, part), [list(g) for g in part])}
  while len(part) > 1:
    score, pick = None, None
    for a, b in itertools.combinations(range(len(part)), 2):
      g = part[a] + part[b]
      within = float(np.mean(ab[np.ix_(g, g)].min(axis=1)))
      if score is None or within > score:
        score, pick = within, (a, b)
    a, b = pick
    part = [g for i, g in enumerate(part) if i not in pick] + [
        part[a] + part[b]]
    best[len(part)] = (separation(ab, part), [list(g) for g in part])
  return best


class Grouping(NamedTuple):
  """The decision at one junction: ``groups`` (lists of branch indices),
  ``loss[d - 1] = L(g_d)`` for every ``d`` tried, and ``exact``."""

  groups: list
  loss: tuple
  exact: bool


def group_branches(ab, alpha: float, branch_cost: float, *,
                   max_groups: int | None = None,
                   exact_max: int = 8) -> Grouping:
  """The grouping of ``n`` branches minimising ``(d - 1) branch_cost + alpha
  L_s(g_d)`` (module docstring).

  Args:
    ab: ``(n, n)`` branch affinity (:func:`branch_affinity`).
    alpha: the separation weight (the official code's ``split_thresh``:
      1 by default, 2 for CelebA).
    branch_cost: ``L_0 2^{p_l}``, the cost of one more branch at this layer
      (the official code: ``2^{p_l} / 64`` on VGG-16).
    max_groups: at most this many groups (the official code: the wide
      network's width over the thin one's).
    exact_max: enumerate every partition up to this many branches.
  """
  ab = np.asarray(ab, np.float64)
  n = ab.shape[0]
  if ab.shape != (n, n) or n == 0:
    raise ValueError(f'ab must be a square (n, n) matrix with n > 0; got '
                     f'{ab.shape}.')
  if not np.all(np.isfinite(ab)):
    raise ValueError('the branch affinity has non-finite entries.')
  exact = n <= exact_max
  best = _best_exact(ab, n) if exact else _best_greedy(ab, n)
  top = n if max_groups is None else max(1, min(n, int(max_groups)))
  loss = tuple((d - 1) * branch_cost + alpha * best[d][0]
               for d in range(1, top + 1))
  d = int(np.argmin(loss)) + 1
  return Grouping(sorted(sorted(g) for g in best[d][1]), loss, exact)


class FAFSRound(NamedTuple):
  """One widening round: the active ``layer``, the task ``affinity`` it
  used, the ``branches`` (task sets) above the layer, ``decisions`` (one
  :class:`Grouping` per group of the layer with two or more branches above
  it, in the layer's group order) and the resulting ``groups`` of the
  model."""

  layer: int
  affinity: np.ndarray
  branches: tuple
  decisions: tuple
  groups: tuple


def fafs(model: Branched,
         train: Callable[[Branched, int], tuple[Branched, np.ndarray]], *,
         alpha: float, branch_costs: Sequence[float],
         max_groups: int | Sequence[int] | None = None,
         exact_max: int = 8) -> tuple[Branched, list]:
  """The FAFS procedure: widen ``model`` top-down, one layer per round.

  Each round ``r`` (active layer ``l = L - 1 - r``): ``model, A =
  train(model, r)`` trains the current network for a while and returns it
  with the task affinity ``A`` measured meanwhile (``(K, K)``, e.g.
  :func:`error_affinity` of its training margins); the branches above ``l``
  are grouped by :func:`group_branches` with ``branch_costs[l]``, and if
  more than one group results, :func:`widen` splits layer ``l``. Layers
  with one group at the junction above stay shared. The caller trains the
  returned network to the end.

  Args:
    model: the thin start (a :class:`Branched`, usually all shared).
    train: ``(model, round) -> (trained model, affinity)``.
    alpha: the separation weight.
    branch_costs: one ``L_0 2^{p_l}`` per layer.
    max_groups: the largest number of groups, one for all layers or one per
      layer.
    exact_max: see :func:`group_branches`.

  Returns:
    ``(model, rounds)``: the widened network and one :class:`FAFSRound` per
    layer visited.
  """
  n = len(model.groups)
  if len(branch_costs) != n:
    raise ValueError(f'branch_costs: one per layer ({n}); got '
                     f'{len(branch_costs)}.')
  if max_groups is None or np.ndim(max_groups) == 0:
    caps = [max_groups] * n
  else:
    caps = list(max_groups)
    if len(caps) != n:
      raise ValueError(f'max_groups: one per layer ({n}) or one for all; got '
                       f'{len(caps)}.')
  rounds = []
  for r in range(n):
    layer = n - 1 - r
    model, affinity = train(model, r)
    affinity = np.asarray(affinity, np.float64)
    if affinity.shape != (model.num_tasks,) * 2:
      raise ValueError(f'train must return a (K, K) affinity, K = '
                       f'{model.num_tasks}; got {affinity.shape}.')
    above = (model.groups[layer + 1] if layer + 1 < n else
             tuple((t,) for t in range(model.num_tasks)))
    cap = caps[layer]
    new_groups = []
    decisions = []
    for g in model.groups[layer]:
      branches = [b for b in above if set(b) <= set(g)]
      if len(branches) == 1:
        new_groups.append([branches[0]])
        continue
      ab = branch_affinity(affinity, branches)
      decision = group_branches(ab, alpha, branch_costs[layer],
                                max_groups=cap, exact_max=exact_max)
      decisions.append(decision)
      new_groups.extend([[branches[i] for i in c] for c in decision.groups])
    if len(new_groups) > len(model.groups[layer]):
      model = widen(model, layer, new_groups)
    rounds.append(FAFSRound(layer, affinity, tuple(above), tuple(decisions),
                            model.groups))
  return model, rounds
