"""One table-driven test per property, over every registered method.

Each property is checked for every entry of ``mgda_jax.METHODS`` (and every
input kind it accepts), against an independent reference: ``jax.jacrev`` of
the task losses, the same run without the bad batch, or the exact scaling
law. Adding a method to the registry adds it to every test here.
"""

import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mgda_jax

K = 3
NAMES = sorted(mgda_jax.METHODS)
CASES = [(n, kind) for n in NAMES for kind in mgda_jax.METHODS[n].inputs]


def make_problem(seed=0):
  rng = np.random.default_rng(seed)
  f32 = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  params = {'encoder': {'w': f32(4, 6) / 2, 'b': f32(6) / 4},
            'heads': {'w': f32(K, 6) / 2}}
  return params, f32(16, 4), f32(16, K)


def encode(params, x, y):
  del y
  return jnp.tanh(x @ params['encoder']['w'] + params['encoder']['b'])


def heads(params, z, x, y):
  del x
  pred = jnp.einsum('bd,kd->kb', z, params['heads']['w'])
  return jnp.mean((pred - y.T) ** 2, axis=1) + 0.1


def all_losses(params, x, y):
  return heads(params, encode(params, x, y), x, y)


def kpis_of(y):
  return jnp.mean(jax.nn.sigmoid(y), axis=0)


def shared_mask(p):
  return {'encoder': jax.tree.map(lambda _: True, p['encoder']),
          'heads': jax.tree.map(lambda _: False, p['heads'])}


def build(name, kind='per_task', **kw):
  factory = mgda_jax.METHODS[name].factory
  if name == 'prior_loss_weighting':
    kw.setdefault('priors', jnp.array([1.0, 2.0, 0.5]))
  if kind == 'per_task' and 'shared' in inspect.signature(factory).parameters:
    kw.setdefault('shared', shared_mask)
  return mgda_jax.make_method(name, K, **kw)


def inputs_of(kind, params, x, y):
  if kind == 'representation':
    return mgda_jax.representation_grads(encode, heads, params, x, y)
  return mgda_jax.per_task_grads(all_losses, params, x, y)


def test_registry_lists_every_public_method():
  """Every public factory returning a transform is registered, and back."""
  public = set()
  for name in mgda_jax.__all__:
    obj = getattr(mgda_jax, name)
    if inspect.isfunction(obj):
      ret = inspect.signature(obj).return_annotation
      if 'GradientTransformation' in str(ret):
        public.add(name)
  public.discard('make_method')  # the registry's own builder
  assert public == set(mgda_jax.METHODS), public ^ set(mgda_jax.METHODS)
  assert len(mgda_jax.METHODS) == 24
  for name, spec in mgda_jax.METHODS.items():
    assert spec.family in ('gradient', 'loss'), name
    assert set(spec.inputs) <= {'representation', 'per_task'}, name
    assert set(spec.needs) <= {'losses', 'kpis'}, name
    sig = inspect.signature(spec.factory).parameters
    for h, default in spec.hyperparams.items():
      assert sig[h].default == default
    assert spec.stochastic == ('key' in sig), name


@pytest.mark.parametrize('name,kind', CASES)
def test_update_is_the_weighted_task_gradient(name, kind):
  """The update against jax.jacrev of the task losses, with the state's w.

  Gradient methods: ``sum_t w_t g_t`` on the shared parameters and each
  task's own gradient on its head (Algorithm 2); loss weightings: ``sum_t
  w_t g_t`` everywhere. GradDrop has no weights: with leak 1 it must be the
  plain sum.
  """
  params, x, y = make_problem()
  spec = mgda_jax.METHODS[name]
  kw = {'leak': 1.0} if name == 'graddrop' else {}
  tx = build(name, kind, **kw)
  losses, g = inputs_of(kind, params, x, y)
  update, state = jax.jit(
      lambda g, s: tx.update(g, s, params, losses=losses, kpis=kpis_of(y)))(
          g, tx.init(params))
  jac = jax.jacrev(all_losses)(params, x, y)        # leaves (K, ...)
  w = np.ones(K) if name == 'graddrop' else np.asarray(state.weights)
  assert np.all(np.isfinite(w)), (name, w)
  weigh = lambda leaf: np.tensordot(w, np.asarray(leaf), axes=1)
  plain = lambda leaf: np.sum(np.asarray(leaf), axis=0)
  if spec.family == 'gradient':
    expect = {'encoder': jax.tree.map(weigh, jac['encoder']),
              'heads': jax.tree.map(plain, jac['heads'])}
  else:
    expect = jax.tree.map(weigh, jac)
  chex.assert_trees_all_close(update, expect, rtol=2e-4, atol=2e-6)
  assert int(state.count) == 1
  assert int(state.info.result) == int(mgda_jax.SolverResult.CONVERGED)
  assert bool(state.info.converged)


@pytest.mark.parametrize('name', NAMES)
def test_a_nonfinite_batch_is_a_no_op_under_the_readme_recipe(name):
  """clean, NaN, clean == clean, clean; everything finite afterwards.

  With ``optax.chain(method, optax.apply_if_finite(sgd, 3))`` a NaN batch
  must change neither the parameters nor the method's state (learned
  weights, moving averages, PRNG keys): the next step is the step the run
  would have taken without it.
  """
  kind = mgda_jax.METHODS[name].inputs[0]
  params, x, y = make_problem()
  x2 = x * 0.9 + 0.1
  x_nan = x.at[0, 0].set(jnp.nan)
  tx = optax.chain(build(name, kind),
                   optax.apply_if_finite(optax.sgd(0.05), 3))

  @jax.jit
  def step(params, state, x):
    losses, g = inputs_of(kind, params, x, y)
    updates, state = tx.update(g, state, params, losses=losses,
                               kpis=kpis_of(y) * jnp.where(
                                   jnp.all(jnp.isfinite(x)), 1.0, jnp.nan))
    return optax.apply_updates(params, updates), state, updates

  def run(batches):
    p, s = params, tx.init(params)
    for b in batches:
      p, s, u = step(p, s, b)
    return p, s, u

  p_a, s_a, u_a = run([x, x_nan, x2])
  p_b, s_b, u_b = run([x, x2])
  # The NaN step itself: NaN update, NONFINITE, state not committed.
  p_n, s_n, u_n = run([x, x_nan])
  assert not bool(s_n[1].last_finite)      # apply_if_finite skipped it
  assert all(bool(jnp.all(l == 0)) for l in jax.tree.leaves(u_n))
  assert int(s_n[0].info.result) == int(mgda_jax.SolverResult.NONFINITE)
  assert int(s_n[0].count) == 1
  chex.assert_trees_all_close(s_n[0].inner, run([x])[1][0].inner)
  # Afterwards: as if it never happened.
  chex.assert_trees_all_close(p_a, p_b, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(u_a, u_b, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(s_a[0].inner, s_b[0].inner, rtol=1e-6)
  assert int(s_a[0].count) == int(s_b[0].count) == 2
  for leaf in jax.tree.leaves((p_a, u_a, s_a[0].inner)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert bool(jnp.all(jnp.isfinite(leaf))), name


@pytest.mark.parametrize('name', NAMES)
def test_every_numeric_hyperparameter_is_live_under_inject_hyperparams(name):
  spec = mgda_jax.METHODS[name]
  kind = spec.inputs[0]
  params, x, y = make_problem()
  static = [a for a in ('num_tasks', 'shared')
            if a in inspect.signature(spec.factory).parameters]
  injected = optax.inject_hyperparams(spec.factory, static_args=static)
  kw = {}
  if name == 'prior_loss_weighting':
    tx = injected(jnp.array([1.0, 2.0, 0.5]))
  elif name == 'fixed_weighting':
    tx = injected(jnp.ones(K))
  else:
    tx = injected(num_tasks=K, **kw)
  state = tx.init(params)
  assert set(spec.hyperparams) <= set(state.hyperparams), (
      set(spec.hyperparams) - set(state.hyperparams))
  losses, g = inputs_of(kind, params, x, y)
  got, _ = jax.jit(lambda g, s: tx.update(g, s, params, losses=losses,
                                          kpis=kpis_of(y)))(g, state)
  plain = build(name, kind) if name != 'prior_loss_weighting' else build(
      name, kind)
  want, _ = plain.update(g, plain.init(params), params, losses=losses,
                         kpis=kpis_of(y))
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)


def _random_task_grads(seed, spread=1.0):
  rng = np.random.default_rng(seed)
  j = rng.normal(size=(K, 7)) + 0.4 * rng.normal(size=7)
  j[0] *= spread
  return {'encoder': {'w': jnp.asarray(j[:, :5], jnp.float32),
                      'b': jnp.asarray(j[:, 5:], jnp.float32)}}


EQUIVARIANT = [n for n in NAMES if mgda_jax.METHODS[n].scale_equivariant
               and 'per_task' in mgda_jax.METHODS[n].inputs]


@pytest.mark.parametrize('name', EQUIVARIANT)
def test_scale_equivariance_in_float32(name):
  """``d(c J) = c d(J)`` in float32 for c from 1e-4 to 1e4, also with one
  task's gradient 1e3 times longer than the others."""
  losses = jnp.array([1.0, 0.5, 2.0])
  tx = mgda_jax.make_method(
      name, K, **({'priors': jnp.ones(K)}
                  if name == 'prior_loss_weighting' else {}))
  f = jax.jit(lambda g: tx.update(g, tx.init(g), None, losses=losses,
                                  kpis=jnp.full(K, 0.5))[0])
  for spread in (1.0, 1e3):
    g = _random_task_grads(1, spread)
    base = f(g)
    for c in (1e-4, 1e-2, 1e2, 1e4):
      scaled = f(jax.tree.map(lambda l, c=c: l * c, g))
      ref = jax.tree.map(lambda l, c=c: l * c, base)
      norm = max(float(jnp.max(jnp.abs(l))) for l in jax.tree.leaves(ref))
      for a, b in zip(jax.tree.leaves(scaled), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, atol=2e-4 * norm,
                                   err_msg=f'{name} c={c} spread={spread}')


@pytest.mark.parametrize('name', sorted(set(NAMES) - set(EQUIVARIANT)
                                        - {'mgda_ub'}))
def test_methods_declared_not_scale_equivariant_are_not(name):
  g = _random_task_grads(2)
  tx = mgda_jax.make_method(name, K)
  losses = jnp.array([1.0, 0.5, 2.0])
  def f(g):  # two steps: GradNorm's first step uses its initial weights
    u, s = tx.update(g, tx.init(g), None, losses=losses)
    return tx.update(g, s, None, losses=losses)[0]

  base, scaled = f(g), f(jax.tree.map(lambda l: 100.0 * l, g))
  ratio = jnp.linalg.norm(scaled['encoder']['w']) / jnp.linalg.norm(
      base['encoder']['w'])
  assert abs(float(ratio) - 100.0) > 1.0, (name, ratio)


@pytest.mark.parametrize('name,kind', CASES)
def test_state_contract_and_one_compilation(name, kind):
  params, x, y = make_problem()
  tx = build(name, kind)
  state = tx.init(params)
  assert isinstance(state, mgda_jax.MethodState)
  assert state.weights.shape == (K,)
  assert isinstance(state.info, mgda_jax.SolveInfo)

  traces = []

  @jax.jit
  def step(state, x):
    traces.append(1)
    losses, g = inputs_of(kind, params, x, y)
    return tx.update(g, state, params, losses=losses, kpis=kpis_of(y))[1]

  for i in range(3):
    state = step(state, x * (1.0 + 0.1 * i))
  assert len(traces) == 1  # no recompilation after the first step
  assert int(state.count) == 3
  assert state.info.result.dtype == jnp.int32
  if name == 'graddrop':
    assert bool(jnp.all(jnp.isnan(state.weights)))
  else:
    assert bool(jnp.all(jnp.isfinite(state.weights)))


@pytest.mark.parametrize('name', NAMES)
def test_a_wrong_number_of_tasks_is_a_clear_error(name):
  kind = mgda_jax.METHODS[name].inputs[0]
  params, x, y = make_problem()
  tx = mgda_jax.make_method(
      name, K + 1, **({'priors': jnp.ones(K + 1)}
                      if name == 'prior_loss_weighting' else
                      {'weights': jnp.ones(K + 1)}
                      if name == 'fixed_weighting' else {}))
  losses, g = inputs_of(kind, params, x, y)
  with pytest.raises(ValueError, match='tasks'):
    tx.update(g, tx.init(params), params, losses=losses, kpis=kpis_of(y))


@pytest.mark.parametrize('name', [n for n in NAMES
                                  if mgda_jax.METHODS[n].needs])
def test_missing_losses_or_kpis_is_a_clear_error(name):
  kind = mgda_jax.METHODS[name].inputs[0]
  params, x, y = make_problem()
  tx = build(name, kind)
  _, g = inputs_of(kind, params, x, y)
  need = mgda_jax.METHODS[name].needs[0]
  with pytest.raises(ValueError, match=f'{need}='):
    tx.update(g, tx.init(params), params)
