"""The contract every architecture in :mod:`mgda_jax.nn` meets.

An architecture maps an input ``x`` to one output per task, and declares two
things the gradient methods need:

* **which parameters are shared**: :meth:`MTLArchitecture.is_shared` on a
  parameter's path (the attribute names and list indices from the model to
  the leaf, e.g. ``('encoder', 'kernel')``). A parameter is *shared* when it
  can reach the loss of more than one task; every other parameter reaches
  exactly one task's loss (*task-specific*).
* **its representation** ``Z``: the tensors through which the shared
  parameters reach the task-specific ones. :meth:`MTLArchitecture.represent`
  computes ``Z`` with the shared parameters only, and
  :meth:`MTLArchitecture.decode_task` maps ``(Z, x)`` to task ``t``'s output
  with task ``t``'s parameters only, so that ``decode(represent(x), x) ==
  model(x)``. ``Z`` is any pytree (the backbone features at every stage for
  MTAN; per-task columns ``(K, ...)`` for cross-stitch and sluice).

Then, for task losses ``L_t(Z(theta_sh), theta_t)``, the gradient of the
shared parameters is ``J^T r_t`` with ``J = dZ/dtheta_sh`` (the Jacobian of
the whole pytree ``Z``, flattened and concatenated) and ``r_t = dL_t/dZ``, so

.. math::

  \\Big\\|\\sum_t \\alpha_t \\nabla_{\\theta_{sh}} L_t\\Big\\|
  = \\Big\\|J^\\top \\sum_t \\alpha_t r_t\\Big\\|
  \\le \\|J\\| \\, \\Big\\|\\sum_t \\alpha_t r_t\\Big\\| ,

the bound MGDA-UB minimises (Sener & Koltun 2018, arXiv:1810.04650, Eq. 5-6),
whatever the number of tensors in ``Z``. :func:`mgda_jax.nn.functional` turns
an architecture into the pure functions :func:`mgda_jax.representation_grads`
and :func:`mgda_jax.per_task_grads` take.
"""

from typing import Any, Mapping, Sequence

from flax import nnx
import jax


def path_keys(path) -> tuple:
  """A ``jax.tree_util`` key path as plain keys: ``('encoder', 0, 'kernel')``.

  ``DictKey``/``SequenceKey``/``FlattenedIndexKey`` give their key or index;
  ``GetAttrKey`` entries (the ``.value`` inside an ``nnx.Variable``) are
  dropped, so a pure state and a state of Variables give the same keys.
  """
  out = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      out.append(k.key)
    elif isinstance(k, jax.tree_util.SequenceKey):
      out.append(k.idx)
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      out.append(k.key)
    elif isinstance(k, jax.tree_util.GetAttrKey):
      continue
    else:
      out.append(k)
  return tuple(out)


def task_container(parts, what: str):
  """``(nnx.List | nnx.Dict, task names, as_dict)`` from a list or a dict.

  Raises:
    ValueError: for no task, or a dict whose keys are not strings.
  """
  if isinstance(parts, Mapping):
    names = tuple(parts)
    if not names:
      raise ValueError(f'{what}: at least one task is needed; got an empty '
                       'dict.')
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
      raise ValueError(f'{what}: the task names (dict keys) must be strings; '
                       f'got {bad}.')
    return nnx.Dict(dict(parts)), names, True
  if isinstance(parts, nnx.Module) or not isinstance(parts, Sequence):
    raise ValueError(f'{what} must be a list of modules (one per task, in '
                     'task order) or a dict task name -> module; got '
                     f'{type(parts).__name__}.')
  parts = list(parts)
  if not parts:
    raise ValueError(f'{what}: at least one task is needed; got an empty '
                     'list.')
  return nnx.List(parts), tuple(f'task{i}' for i in range(len(parts))), False


class MTLArchitecture(nnx.Module):
  """Base class: per-task outputs, a representation, a shared mask.

  Subclasses set ``self.task_names`` (a tuple of strings), ``self.as_dict``
  (outputs as a dict keyed by task name, else a tuple in task order), and
  implement :meth:`represent`, :meth:`decode_task` and :meth:`is_shared`.

  ``supports_representation`` is False for a configuration in which a shared
  parameter acts after a task-specific one (MTAN with a shared attention
  extractor): then no ``Z`` separates them and only the parameter-gradient
  path (``mgda_jax.per_task_grads`` with the shared mask) is exact.
  """

  supports_representation: bool = True

  @property
  def num_tasks(self) -> int:
    return len(self.task_names)

  def represent(self, x) -> Any:
    """``Z``: the shared computation, reading only shared parameters."""
    raise NotImplementedError

  def decode_task(self, task: int, z, x) -> Any:
    """Task ``task``'s output from ``Z`` (and ``x``), reading only its own
    parameters."""
    raise NotImplementedError

  def decode(self, z, x):
    """Every task's output from ``Z``: a tuple in task order, or a dict."""
    return self.pack([self.decode_task(t, z, x)
                      for t in range(self.num_tasks)])

  def __call__(self, x):
    return self.decode(self.represent(x), x)

  def pack(self, outputs: Sequence[Any]):
    """A list in task order as the architecture's output type."""
    if self.as_dict:
      return dict(zip(self.task_names, outputs))
    return tuple(outputs)

  def is_shared(self, path: tuple) -> bool:
    """Whether the leaf at ``path`` (plain keys, see :func:`path_keys`) is
    shared (reaches more than one task's loss)."""
    raise NotImplementedError

  def shared_filter(self):
    """An NNX filter ``(path, value) -> bool`` selecting the shared
    variables, e.g. ``nnx.state(model, nnx.All(nnx.Param,
    model.shared_filter()))``."""
    return lambda path, value: self.is_shared(tuple(path))

  def shared_mask(self, tree):
    """A pytree of bools shaped like ``tree`` (an ``nnx.state`` of this
    model, pure or not): True on shared leaves. The ``shared=`` argument of
    :func:`mgda_jax.mgda` and every gradient method."""
    return jax.tree_util.tree_map_with_path(
        lambda p, _: bool(self.is_shared(path_keys(p))), tree)


def task_part(container, names, as_dict: bool, task: int):
  """The module of task ``task`` in a :func:`task_container`."""
  return container[names[task]] if as_dict else container[task]
