"""Bad input gets a clear error (or a documented result code), never a
pytree dump or a silent wrong answer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_every_method import all_losses
from test_every_method import encode
from test_every_method import heads
from test_every_method import K
from test_every_method import make_problem

import mgda_jax


def test_heads_returning_a_dict_says_how_to_stack():
  params, x, y = make_problem()
  bad = lambda p, z, x, y: {'a': heads(p, z, x, y)[0],
                            'b': heads(p, z, x, y)[1]}
  with pytest.raises(ValueError, match='got a dict.*jnp.stack'):
    mgda_jax.representation_grads(encode, bad, params, x, y)


def test_heads_returning_a_list_says_how_to_stack():
  params, x, y = make_problem()
  bad = lambda p, z, x, y: [heads(p, z, x, y)[t] for t in range(K)]
  with pytest.raises(ValueError, match='list of length 3.*jnp.stack'):
    mgda_jax.representation_grads(encode, bad, params, x, y)


def test_an_aux_tuple_without_has_aux_names_has_aux():
  params, x, y = make_problem()
  bad = lambda p, z, x, y: (heads(p, z, x, y), z)
  with pytest.raises(ValueError, match='has_aux=True'):
    mgda_jax.representation_grads(encode, bad, params, x, y)
  with pytest.raises(ValueError, match='has_aux=True'):
    mgda_jax.per_task_grads(lambda p, x, y: (all_losses(p, x, y), 0.0),
                            params, x, y)


def test_scalar_loss_is_rejected_with_its_shape():
  params, x, y = make_problem()
  with pytest.raises(ValueError, match=r'shape \(\)'):
    mgda_jax.per_task_grads(lambda p, x, y: jnp.sum(all_losses(p, x, y)),
                            params, x, y)


def test_mgda_accepts_representation_grads_and_mgda_ub_says_what_it_needs():
  params, x, y = make_problem()
  losses, rg = mgda_jax.representation_grads(encode, heads, params, x, y)
  a, _ = mgda_jax.mgda(K).update(rg, mgda_jax.mgda(K).init(params), params)
  b, _ = mgda_jax.mgda_ub(K).update(rg, mgda_jax.mgda_ub(K).init(params),
                                    params)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(u, v)
  _, g = mgda_jax.per_task_grads(all_losses, params, x, y)
  tx = mgda_jax.mgda_ub(K)
  with pytest.raises(ValueError, match='expects a RepresentationGrads'):
    tx.update(g, tx.init(params), params)
  del losses


@pytest.mark.parametrize('factory,kwargs,match', [
    (mgda_jax.mgda, {'tol': -1.0}, 'tol'),
    (mgda_jax.mgda, {'tol': float('nan')}, 'tol'),
    (mgda_jax.mgda_ub, {'max_steps': 0}, 'max_steps'),
    (mgda_jax.cagrad, {'c': -1.0}, 'c must be >= 0'),
    (mgda_jax.cagrad, {'max_steps': 0}, 'max_steps'),
    (mgda_jax.nash_mtl, {'tol': -1.0}, 'tol'),
    (mgda_jax.uncertainty_weighting, {'learning_rate': -0.1},
     'learning_rate'),
    (mgda_jax.uncertainty_weighting, {'momentum': 1.5}, 'momentum'),
    (mgda_jax.gradnorm, {'learning_rate': 0.0}, 'learning_rate'),
    (mgda_jax.gradnorm, {'alpha': -1.0}, 'alpha'),
    (mgda_jax.famo, {'learning_rate': -1.0}, 'learning_rate'),
    (mgda_jax.dwa, {'temperature': 0.0}, 'temperature'),
    (mgda_jax.dwa, {'steps_per_epoch': 0}, 'steps_per_epoch'),
    (mgda_jax.dtp, {'kpi_rate': 2.0}, 'kpi_rate'),
    (mgda_jax.graddrop, {'leak': 1.5}, 'leak'),
    (mgda_jax.upgrad, {'preferences': -jnp.ones(K)}, 'preferences'),
])
def test_bad_hyperparameters_are_rejected_at_construction(factory, kwargs,
                                                          match):
  with pytest.raises(ValueError, match=match):
    factory(K, **kwargs)


@pytest.mark.parametrize('bad', [0, -1, 2.5, True, 'three'])
def test_bad_num_tasks(bad):
  with pytest.raises(ValueError, match='num_tasks'):
    mgda_jax.pcgrad(bad)


def test_shared_accepts_optax_masked_prefix_trees():
  params, x, y = make_problem()
  _, g = mgda_jax.per_task_grads(all_losses, params, x, y)
  full = {'encoder': {'w': True, 'b': True}, 'heads': {'w': False}}
  prefix = {'encoder': True, 'heads': False}
  for name in ('mgda', 'upgrad', 'graddrop'):
    a = mgda_jax.make_method(name, K, shared=full)
    b = mgda_jax.make_method(name, K, shared=prefix)
    ua, _ = a.update(g, a.init(params), params)
    ub, _ = b.update(g, b.init(params), params)
    for u, v in zip(jax.tree.leaves(ua), jax.tree.leaves(ub)):
      np.testing.assert_array_equal(u, v)
  with pytest.raises(ValueError, match='prefix'):
    tx = mgda_jax.mgda(K, shared={'nope': True})
    tx.update(g, tx.init(params), params)
  with pytest.raises(ValueError, match='no parameter is marked shared'):
    tx = mgda_jax.mgda(K, shared={'encoder': False, 'heads': False})
    tx.update(g, tx.init(params), params)


def test_losses_of_the_wrong_shape_or_kind():
  params, x, y = make_problem()
  losses, rg = mgda_jax.representation_grads(encode, heads, params, x, y)
  tx = mgda_jax.famo(K)
  with pytest.raises(ValueError, match=r'shape \(3,\)'):
    tx.update(rg, tx.init(params), params, losses=losses[:2])
  with pytest.raises(ValueError, match='dict'):
    tx.update(rg, tx.init(params), params, losses={'a': losses[0]})


def test_unknown_method_and_unknown_argument():
  with pytest.raises(ValueError, match='registered methods'):
    mgda_jax.make_method('mdga', K)
  with pytest.raises(ValueError, match="no argument.*'cc'"):
    mgda_jax.make_method('cagrad', K, cc=0.3)


def test_axis_name_outside_a_mapped_axis_is_a_clear_error():
  params, x, y = make_problem()
  losses, rg = mgda_jax.representation_grads(encode, heads, params, x, y)
  tx = mgda_jax.upgrad(K, axis_name='data')
  with pytest.raises(ValueError, match='not a mapped axis'):
    jax.jit(lambda g, s: tx.update(g, s, params))(rg, tx.init(params))
  del losses


def test_a_state_from_elsewhere_is_a_clear_error():
  params, x, y = make_problem()
  _, rg = mgda_jax.representation_grads(encode, heads, params, x, y)
  tx = mgda_jax.upgrad(K)
  with pytest.raises(ValueError, match='MethodState'):
    tx.update(rg, {'count': 0}, params)
