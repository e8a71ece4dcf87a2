"""Mixtures of experts with per-task gates: MMoE, CGC and PLE.

An *expert* is a module ``h -> e(h)`` built by a user factory; a *gate* is a
linear map followed by a softmax over experts, read from the gate's input
flattened to ``(B, features)``; a *decoder* (the papers' *tower*) maps the
gated mixture to the task's output. Gates have no bias, as in the papers'
``softmax(W x)``.
"""

from typing import Callable, Mapping, Sequence

from flax import nnx
import jax
import jax.numpy as jnp

from mgda_jax._src.nn import base

Factory = Callable[[nnx.Rngs], nnx.Module]


def _flat(x):
  return x.reshape(x.shape[0], -1)


def gate_mix(gate: nnx.Module, gate_input, experts_out: Sequence):
  """``sum_i softmax(W h)_i e_i``: the gate's mixture of expert outputs."""
  w = jax.nn.softmax(gate(_flat(gate_input)), axis=-1)       # (B, E)
  out = 0.0
  for i, e in enumerate(experts_out):
    out = out + w[:, i].reshape((-1,) + (1,) * (e.ndim - 1)) * e
  return out


def _gate(features: int, n: int, rngs: nnx.Rngs) -> nnx.Linear:
  if n < 1:
    raise ValueError(f'a gate needs at least one expert; got {n}.')
  return nnx.Linear(features, n, use_bias=False, rngs=rngs)


class MMoE(base.MTLArchitecture):
  """Multi-gate Mixture-of-Experts (Ma et al. 2018).

  .. math::

    f^t(x) = \\sum_{i=1}^{n} g^t(x)_i \\, f_i(x), \\qquad
    g^t(x) = \\operatorname{softmax}(W_{g^t} x), \\qquad
    \\hat y_t = h^t(f^t(x)),

  with ``n`` shared experts ``f_i``, one gate ``W_{g^t} in R^{n x d}`` and one
  decoder (tower) ``h^t`` per task. **Where the decoder goes**: ``decoders[t]``
  receives the gated mixture of the expert outputs (shaped like one expert's
  output) and returns task ``t``'s prediction.

  Shared parameters: the experts. The representation ``Z`` is the tuple of
  the ``n`` expert outputs; the gates read ``x`` and are task-specific, so
  ``decode`` uses only the gates and decoders.

  Args:
    expert: ``rngs -> module``, called ``num_experts`` times; each expert maps
      ``x`` to a feature array (all experts the same output shape).
    num_experts: ``n``.
    gate_features: ``d``, the width of ``x`` flattened to ``(B, d)`` (the
      gates' input).
    decoders: one module per task (list, or dict task name -> module).
    rngs: for the gates (and passed to ``expert``).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import mgda_jax.nn
    >>> rngs = nnx.Rngs(0)
    >>> model = mgda_jax.nn.MMoE(
    ...     expert=lambda rngs: nnx.Sequential(nnx.Linear(6, 4, rngs=rngs),
    ...                                        nnx.relu),
    ...     num_experts=3, gate_features=6,
    ...     decoders=[nnx.Linear(4, 1, rngs=rngs) for _ in range(2)],
    ...     rngs=rngs)
    >>> [o.shape for o in model(jnp.ones((5, 6)))]
    [(5, 1), (5, 1)]

  References:
    Ma, Zhao, Yi, Chen, Hong, Chi, Modeling Task Relationships in Multi-task
    Learning with Multi-gate Mixture-of-Experts, KDD 2018,
    doi:10.1145/3219819.3220007.
  """

  def __init__(self, expert: Factory, num_experts: int, gate_features: int,
               decoders: Sequence[nnx.Module] | Mapping[str, nnx.Module], *,
               rngs: nnx.Rngs):
    if num_experts < 1:
      raise ValueError(f'MMoE needs num_experts >= 1; got {num_experts}.')
    self.decoders, self.task_names, self.as_dict = base.task_container(
        decoders, 'MMoE decoders')
    self.experts = nnx.List([expert(rngs) for _ in range(num_experts)])
    self.gates = nnx.List([_gate(gate_features, num_experts, rngs)
                           for _ in self.task_names])

  def represent(self, x):
    return tuple(e(x) for e in self.experts)

  def decode_task(self, task, z, x):
    mix = gate_mix(self.gates[task], x, z)
    return base.task_part(self.decoders, self.task_names, self.as_dict,
                          task)(mix)

  def is_shared(self, path):
    return path[:1] == ('experts',)


def _per_level(value, num_levels, what):
  if isinstance(value, (list, tuple)):
    if len(value) != num_levels:
      raise ValueError(f'{what}: one entry per level ({num_levels}); got '
                       f'{len(value)}.')
    return list(value)
  return [value] * num_levels


class PLE(base.MTLArchitecture):
  """Progressive Layered Extraction (Tang et al. 2020); CGC is one level.

  **CGC** (one level): shared experts ``E_s`` and, per task ``k``, its own
  experts ``E_k``; task ``k``'s gate mixes its own and the shared ones,

  .. math::

    g^k(x) = w^k(x) \\, S^k(x), \\quad
    w^k(x) = \\operatorname{softmax}(W_g^k x), \\quad
    S^k(x) = [E_{k,1}(x), \\dots, E_{k,m_k}(x), E_{s,1}(x), \\dots,
              E_{s,m_s}(x)], \\quad
    \\hat y_k = t^k(g^k(x)),

  with ``W_g^k in R^{(m_k + m_s) x d}``. **PLE** stacks ``N`` such
  *extraction networks*: at level ``j`` task ``k``'s experts and gate read
  task ``k``'s output of level ``j - 1`` (``x`` at level 1),
  ``g^{k,j}(x) = w^{k,j}(g^{k,j-1}(x)) S^{k,j}(x)``, and, at every level but
  the last, a shared gate over *all* the level's experts (every task's and
  the shared ones) reads the shared output of level ``j - 1`` and feeds the
  next level's shared experts. **Where the decoder goes**: ``decoders[k]``
  (the tower ``t^k``) receives task ``k``'s gate output of the last level.

  Shared parameters (those reaching more than one task's loss): with ``N =
  1``, the shared experts. With ``N >= 2``: every shared expert and shared
  gate, and every task expert and task gate below level ``N - 1`` (task
  experts at an inner level feed the shared gate; the task gate at level
  ``N - 1`` feeds only its own task's last level). Task-specific: the
  decoders, the last level's task experts and gates, and the task gates of
  level ``N - 1``. The representation ``Z`` (a dict) holds what crosses that
  boundary: ``'last_shared'`` (the last level's shared expert outputs) and,
  for ``N >= 2``, ``'experts'`` and ``'shared'`` (level ``N - 1``'s task and
  shared expert outputs) and, for ``N >= 3``, ``'gate_inputs'`` (each task's
  input to its level-``N - 1`` gate).

  Args:
    expert: ``rngs -> module`` for every expert, or one factory per level;
      an expert maps its level's input to a feature array, and all experts
      of a level give the same shape.
    num_shared_experts: ``m_s`` (per level: an int or a list).
    num_task_experts: ``m_k`` for every task (int), or one per task (list);
      zero is allowed where ``m_s >= 1``.
    gate_features: the width of each level's input flattened to ``(B,
      d)``: an int (every level) or a list per level.
    decoders: one module per task (list, or dict task name -> module).
    num_levels: ``N`` (1 is CGC).
    rngs: for the gates (and passed to ``expert``).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import mgda_jax.nn
    >>> rngs = nnx.Rngs(0)
    >>> expert = lambda rngs: nnx.Sequential(nnx.Linear(6, 6, rngs=rngs),
    ...                                      nnx.tanh)
    >>> model = mgda_jax.nn.PLE(
    ...     expert, num_shared_experts=2, num_task_experts=1,
    ...     gate_features=6, num_levels=2,
    ...     decoders=[nnx.Linear(6, 1, rngs=rngs) for _ in range(3)],
    ...     rngs=rngs)
    >>> [o.shape for o in model(jnp.ones((5, 6)))]
    [(5, 1), (5, 1), (5, 1)]

  References:
    Tang, Liu, Zhao, Gong, Progressive Layered Extraction (PLE): A Novel
    Multi-Task Learning (MTL) Model for Personalized Recommendations, RecSys
    2020, doi:10.1145/3383313.3412236.
  """

  def __init__(self, expert: Factory | Sequence[Factory],
               num_shared_experts: int | Sequence[int],
               num_task_experts: int | Sequence[int],
               gate_features: int | Sequence[int],
               decoders: Sequence[nnx.Module] | Mapping[str, nnx.Module], *,
               num_levels: int = 1, rngs: nnx.Rngs):
    name = type(self).__name__
    if num_levels < 1:
      raise ValueError(f'{name} needs num_levels >= 1; got {num_levels}.')
    self.decoders, self.task_names, self.as_dict = base.task_container(
        decoders, f'{name} decoders')
    k = len(self.task_names)
    factories = _per_level(expert, num_levels, f'{name} expert')
    shared_n = _per_level(num_shared_experts, num_levels,
                          f'{name} num_shared_experts')
    features = _per_level(gate_features, num_levels, f'{name} gate_features')
    if isinstance(num_task_experts, (list, tuple)):
      if len(num_task_experts) != k:
        raise ValueError(f'{name} num_task_experts: one per task ({k}); got '
                         f'{len(num_task_experts)}.')
      task_n = list(num_task_experts)
    else:
      task_n = [num_task_experts] * k
    if min(task_n) < 0 or min(shared_n) < 0:
      raise ValueError(f'{name}: expert counts must be >= 0.')
    for level, m_s in enumerate(shared_n):
      if m_s == 0 and min(task_n) == 0:
        raise ValueError(f'{name}: a task with no expert of its own needs a '
                         f'shared expert (level {level} has none).')
    self.num_levels = num_levels
    self.shared_experts = nnx.List([
        nnx.List([factories[l](rngs) for _ in range(shared_n[l])])
        for l in range(num_levels)])
    self.task_experts = nnx.List([
        nnx.List([nnx.List([factories[l](rngs) for _ in range(task_n[t])])
                  for t in range(k)]) for l in range(num_levels)])
    self.task_gates = nnx.List([
        nnx.List([_gate(features[l], task_n[t] + shared_n[l], rngs)
                  for t in range(k)]) for l in range(num_levels)])
    self.shared_gates = nnx.List([
        _gate(features[l], sum(task_n) + shared_n[l], rngs)
        for l in range(num_levels - 1)])

  def _level(self, l, task_inputs, shared_input):
    """Level ``l``: the task experts' outputs and the shared ones."""
    task_out = [tuple(e(h) for e in self.task_experts[l][t])
                for t, h in enumerate(task_inputs)]
    shared_out = tuple(e(shared_input) for e in self.shared_experts[l])
    return task_out, shared_out

  def represent(self, x):
    n, k = self.num_levels, self.num_tasks
    h_tasks, h_shared = [x] * k, x
    z = {}
    for l in range(n - 1):
      task_out, shared_out = self._level(l, h_tasks, h_shared)
      if l == n - 2:
        z['experts'] = tuple(task_out)
        z['shared'] = shared_out
        if l > 0:
          z['gate_inputs'] = tuple(h_tasks)
        # The task gates of level n - 2 are task-specific: decode_task.
      else:
        h_tasks = [gate_mix(self.task_gates[l][t], h_tasks[t],
                            task_out[t] + shared_out) for t in range(k)]
      everything = tuple(e for out in task_out for e in out) + shared_out
      h_shared = gate_mix(self.shared_gates[l], h_shared, everything)
    z['last_shared'] = tuple(e(h_shared) for e in self.shared_experts[n - 1])
    return z

  def decode_task(self, task, z, x):
    n = self.num_levels
    if n == 1:
      h = x
    else:
      h_in = z['gate_inputs'][task] if n >= 3 else x
      h = gate_mix(self.task_gates[n - 2][task], h_in,
                   z['experts'][task] + z['shared'])
    own = tuple(e(h) for e in self.task_experts[n - 1][task])
    mix = gate_mix(self.task_gates[n - 1][task], h, own + z['last_shared'])
    return base.task_part(self.decoders, self.task_names, self.as_dict,
                          task)(mix)

  def is_shared(self, path):
    n = self.num_levels
    head = path[:1]
    if head in (('shared_experts',), ('shared_gates',)):
      return True
    if head == ('task_experts',):
      return path[1] < n - 1
    if head == ('task_gates',):
      return path[1] < n - 2
    return False


class CGC(PLE):
  """Customized Gate Control (Tang et al. 2020): :class:`PLE` with one level.

  See :class:`PLE` for the equations (the CGC part), the arguments and the
  shared parameters (the shared experts; ``Z`` is their outputs).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import mgda_jax.nn
    >>> rngs = nnx.Rngs(0)
    >>> model = mgda_jax.nn.CGC(
    ...     lambda rngs: nnx.Linear(6, 4, rngs=rngs), num_shared_experts=2,
    ...     num_task_experts=1, gate_features=6,
    ...     decoders=[nnx.Linear(4, 1, rngs=rngs) for _ in range(2)],
    ...     rngs=rngs)
    >>> [o.shape for o in model(jnp.ones((5, 6)))]
    [(5, 1), (5, 1)]
  """

  def __init__(self, expert: Factory, num_shared_experts: int,
               num_task_experts: int | Sequence[int], gate_features: int,
               decoders: Sequence[nnx.Module] | Mapping[str, nnx.Module], *,
               rngs: nnx.Rngs):
    super().__init__(expert, num_shared_experts, num_task_experts,
                     gate_features, decoders, num_levels=1, rngs=rngs)
