"""PCGrad and GradVac: resolve conflicts between task gradients by projection.

Both methods visit, for every task ``i``, the other tasks ``j`` in a random
order and edit ``g_i`` against ``g_j``:

* **PCGrad** (Yu et al. 2020, Algorithm 1): if ``<g_i', g_j> < 0``, project
  ``g_i'`` onto the normal plane of ``g_j``,
  ``g_i' <- g_i' - <g_i', g_j> / ||g_j||^2 g_j``;
* **GradVac** (Wang et al. 2021, Eq. 3): if the cosine ``phi_ij`` of ``g_i'``
  and ``g_j`` is below a target ``phihat_ij``, add the multiple of ``g_j``
  that makes it equal to the target,

  .. math::

    g_i' \\leftarrow g_i' + \\frac{\\|g_i'\\| \\big(\\hat\\phi_{ij}
    \\sqrt{1-\\phi_{ij}^2} - \\phi_{ij}\\sqrt{1-\\hat\\phi_{ij}^2}\\big)}
    {\\|g_j\\| \\sqrt{1-\\hat\\phi_{ij}^2}} \\, g_j ,

  and the target follows the observed cosine as an exponential moving
  average, ``phihat_ij <- (1 - beta) phihat_ij + beta phi_ij``. With the
  target held at 0 this is PCGrad (the GradVac paper's own remark).

The update is ``sum_i g_i'`` (the papers' sum, not the mean). Every edit adds
a multiple of some ``g_j``, so ``g_i'`` stays in the span of the task
gradients: the methods run on the ``K x K`` Gram matrix, tracking each
``g_i'`` as a coefficient row ``C_i`` (``g_i' = sum_t C_it g_t``), and return
the weights ``w_t = sum_i C_it``. That is exact, costs ``O(K^3)`` whatever
the size of the model, and works on representation gradients (MGDA-UB's
input) as well as on parameter gradients. The ``K`` tasks ``i`` are edited
in parallel (``vmap``), each over its own permutation of the others.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mgda_jax._src import engine
from mgda_jax._src.core import checks
from mgda_jax._src.core import results


def task_orders(key, num_tasks: int) -> jax.Array:
  """``(K, K)`` visiting orders: row ``i`` is a permutation of the tasks.

  With ``key=None`` every row is ``0, 1, ..., K-1`` (a deterministic order,
  for tests and ablations).
  """
  if key is None:
    return jnp.broadcast_to(jnp.arange(num_tasks), (num_tasks, num_tasks))
  keys = jax.random.split(key, num_tasks)
  return jax.vmap(lambda kk: jax.random.permutation(kk, num_tasks))(keys)


def _safe_div(a, b):
  return jnp.where(b > 0, a / jnp.where(b > 0, b, 1.0), 0.0)


def pcgrad_weights(gram: jax.Array, orders: jax.Array) -> jax.Array:
  """PCGrad's weights ``w`` (``sum_i g_i' = sum_t w_t g_t``) from the Gram.

  Args:
    gram: ``(K, K)`` Gram matrix of the task gradients.
    orders: ``(K, K)`` integer visiting orders (see :func:`task_orders`);
      ``orders[i]`` lists the tasks ``g_i`` is projected against, in order
      (``i`` itself is skipped).

  Returns:
    The ``K`` weights.
  """
  k = gram.shape[0]
  eye = jnp.eye(k, dtype=gram.dtype)

  def row(i, order):
    def body(s, c):
      j = order[s]
      dot = c @ gram[:, j]
      conflict = (j != i) & (dot < 0)
      return c - jnp.where(conflict, _safe_div(dot, gram[j, j]), 0.0) * eye[j]
    return jax.lax.fori_loop(0, k, body, eye[i])

  coefs = jax.vmap(row)(jnp.arange(k), orders)
  return jnp.sum(coefs, axis=0)


class PCGradState(NamedTuple):
  """Inner state of :func:`pcgrad`: the PRNG key for the next task order."""

  key: jax.Array


def pcgrad(num_tasks: int, *, key=0, shuffle: bool = True,
           shared=None,
    axis_name=None) -> optax.GradientTransformationExtraArgs:
  """PCGrad: project away the conflicting component of each task gradient.

  For each task ``i`` and each other task ``j`` in a random order, if
  ``<g_i', g_j> < 0`` then ``g_i' <- g_i' - <g_i', g_j>/||g_j||^2 g_j``; the
  update is ``sum_i g_i'``. Computed exactly on the Gram matrix (see the
  module docstring), so it takes representation gradients or per-task
  parameter gradients, like :func:`mgda_jax.mgda_ub` / :func:`mgda_jax.mgda`.

  Args:
    num_tasks: ``K`` (static).
    key: a PRNG key or int seed for the task orders; the state carries it and
      splits it every step, so a run is reproducible.
    shuffle: ``False`` visits the tasks in index order (deterministic).
    shared: which per-task-gradient leaves are shared, as in
      :func:`mgda_jax.mgda`.
    axis_name: the data-parallel axis for an untyped ``jax.shard_map`` or
      ``jax.pmap`` (see the README's "Several devices").

  Returns:
    A ``GradientTransformationExtraArgs`` with state
    :class:`MethodState` (``inner`` is a :class:`PCGradState`).

  References:
    Yu, Kumar, Gupta, Levine, Hausman & Finn, *Gradient Surgery for
    Multi-Task Learning*, NeurIPS 2020, https://arxiv.org/abs/2001.06782
  """
  num_tasks = checks.check_num_tasks(num_tasks, 'pcgrad')
  key0 = checks.as_key(key)

  def weight_fn(gram, inner, losses):
    del losses
    step_key, next_key = jax.random.split(inner.key)
    orders = task_orders(step_key if shuffle else None, num_tasks)
    return pcgrad_weights(gram, orders), PCGradState(next_key)

  return engine.gram_method('pcgrad', num_tasks, weight_fn,
                                 lambda dtype: PCGradState(key0),
                                 shared=shared, axis_name=axis_name)


def gradvac_weights(gram: jax.Array, orders: jax.Array, targets: jax.Array,
                    beta) -> tuple[jax.Array, jax.Array]:
  """GradVac's weights and updated cosine targets from the Gram matrix.

  Args:
    gram: ``(K, K)`` Gram matrix.
    orders: ``(K, K)`` visiting orders (see :func:`task_orders`).
    targets: ``(K, K)`` cosine targets ``phihat_ij``.
    beta: the moving-average rate of the targets.

  Returns:
    ``(weights, new_targets)``.
  """
  k = gram.shape[0]
  eye = jnp.eye(k, dtype=gram.dtype)
  bound = 1.0 - 1e-6 if gram.dtype == jnp.float64 else 1.0 - 1e-4

  def row(i, order, target_row):
    def body(s, carry):
      c, t_row = carry
      j = order[s]
      norm_i = jnp.sqrt(jnp.maximum(c @ gram @ c, 0.0))
      norm_j = jnp.sqrt(jnp.maximum(gram[j, j], 0.0))
      valid = (j != i) & (norm_i * norm_j > 0)
      phi = jnp.clip(_safe_div(c @ gram[:, j], norm_i * norm_j), -1.0, 1.0)
      target = jnp.clip(t_row[j], -bound, bound)
      root_t = jnp.sqrt(1.0 - target ** 2)
      coef = _safe_div(
          norm_i * (target * jnp.sqrt(1.0 - phi ** 2) - phi * root_t),
          norm_j * root_t)
      c = c + jnp.where(valid & (phi < target), coef, 0.0) * eye[j]
      t_row = t_row.at[j].set(
          jnp.where(valid, (1.0 - beta) * t_row[j] + beta * phi, t_row[j]))
      return c, t_row
    return jax.lax.fori_loop(0, k, body, (eye[i], target_row))

  coefs, new_targets = jax.vmap(row)(jnp.arange(k), orders,
                                     targets.astype(gram.dtype))
  return jnp.sum(coefs, axis=0), new_targets


class GradVacState(NamedTuple):
  """Inner state of :func:`gradvac`.

  Attributes:
    key: PRNG key for the next task orders.
    targets: ``(K, K)`` cosine targets ``phihat_ij`` (moving averages).
  """

  key: jax.Array
  targets: jax.Array


def gradvac(num_tasks: int, *, beta: float = 0.01, key=0,
            shuffle: bool = True,
            shared=None,
    axis_name=None) -> optax.GradientTransformationExtraArgs:
  """Gradient Vaccine: raise each pair's cosine to its running target.

  See the module docstring for the update. Targets start at 0, so the first
  step is PCGrad; afterwards each pair ``(i, j)`` is held to the moving
  average of its observed cosine, which may be positive (pulling related
  tasks closer) or negative (tolerating some conflict).

  Args:
    num_tasks: ``K`` (static).
    beta: the moving-average rate of the targets (the paper's beta;
      ``inject_hyperparams``-able).
    key: PRNG key or int seed for the task orders (carried in the state).
    shuffle: ``False`` visits the tasks in index order.
    shared: which per-task-gradient leaves are shared (see
      :func:`mgda_jax.mgda`).
    axis_name: the data-parallel axis for an untyped ``jax.shard_map`` or
      ``jax.pmap`` (see the README's "Several devices").

  Returns:
    A ``GradientTransformationExtraArgs`` with state
    :class:`MethodState` (``inner`` is a :class:`GradVacState`).

  References:
    Wang, Tsvetkov, Firat & Cao, *Gradient Vaccine: Investigating and
    Improving Multi-task Optimization in Massively Multilingual Models*,
    ICLR 2021, https://arxiv.org/abs/2010.05874
  """
  num_tasks = checks.check_num_tasks(num_tasks, 'gradvac')
  key0 = checks.as_key(key)

  def weight_fn(gram, inner, losses):
    del losses
    step_key, next_key = jax.random.split(inner.key)
    orders = task_orders(step_key if shuffle else None, num_tasks)
    weights, targets = gradvac_weights(gram, orders, inner.targets, beta)
    return weights, GradVacState(next_key, targets)

  return engine.gram_method(
      'gradvac', num_tasks, weight_fn,
      lambda dtype: GradVacState(key0, jnp.zeros((num_tasks, num_tasks),
                                                 dtype)),
      shared=shared, axis_name=axis_name)
