"""mgda_jax: multi-task learning as multi-objective optimisation, in JAX.

The public API; everything else lives in ``mgda_jax._src`` and may change.
"""

# Inputs, Gram matrices, results.
from mgda_jax._src.core.gram import gram_matrix
from mgda_jax._src.core.inputs import per_task_grads
from mgda_jax._src.core.inputs import representation_grads
from mgda_jax._src.core.inputs import RepresentationGrads
from mgda_jax._src.core.results import SolveInfo
from mgda_jax._src.core.results import SolverResult
# The engine's state and the registry.
from mgda_jax._src.engine import MethodState
from mgda_jax._src.registry import make_method
from mgda_jax._src.registry import method_spec
from mgda_jax._src.registry import MethodSpec
from mgda_jax._src.registry import METHODS
# Solvers.
from mgda_jax._src.solvers.min_norm import accurate_matvec
from mgda_jax._src.solvers.min_norm import default_max_steps
from mgda_jax._src.solvers.min_norm import default_tol
from mgda_jax._src.solvers.min_norm import min_norm_element
from mgda_jax._src.solvers.min_norm import MinNormSolution
from mgda_jax._src.solvers.nonneg_qp import nonneg_qp
from mgda_jax._src.solvers.nonneg_qp import NonnegQPSolution
# Gradient methods.
from mgda_jax._src.aggregators.aligned_mtl import aligned_mtl
from mgda_jax._src.aggregators.aligned_mtl import aligned_mtl_matrix
from mgda_jax._src.aggregators.aligned_mtl import aligned_mtl_weights
from mgda_jax._src.aggregators.cagrad import cagrad
from mgda_jax._src.aggregators.cagrad import cagrad_weights
from mgda_jax._src.aggregators.cagrad import CAGradInfo
from mgda_jax._src.aggregators.graddrop import graddrop
from mgda_jax._src.aggregators.graddrop import graddrop_combine
from mgda_jax._src.aggregators.graddrop import GradDropInner
from mgda_jax._src.aggregators.gradient_normalization import gradient_normalization
from mgda_jax._src.aggregators.imtl import imtl_g
from mgda_jax._src.aggregators.imtl import imtl_g_weights
from mgda_jax._src.aggregators.jacobian_descent import dualproj
from mgda_jax._src.aggregators.jacobian_descent import dualproj_weights
from mgda_jax._src.aggregators.jacobian_descent import ProjectionInfo
from mgda_jax._src.aggregators.jacobian_descent import upgrad
from mgda_jax._src.aggregators.jacobian_descent import upgrad_weights
from mgda_jax._src.aggregators.mgda import mgda
from mgda_jax._src.aggregators.mgda import mgda_ub
from mgda_jax._src.aggregators.mgda import mgda_weights
from mgda_jax._src.aggregators.nash_mtl import nash_mtl
from mgda_jax._src.aggregators.nash_mtl import nash_mtl_weights
from mgda_jax._src.aggregators.nash_mtl import NashMTLInfo
from mgda_jax._src.aggregators.normalizers import gradient_normalizers
from mgda_jax._src.aggregators.normalizers import normalize_gram
from mgda_jax._src.aggregators.normalizers import NORMALIZERS
from mgda_jax._src.aggregators.pcgrad import gradvac
from mgda_jax._src.aggregators.pcgrad import gradvac_weights
from mgda_jax._src.aggregators.pcgrad import GradVacState
from mgda_jax._src.aggregators.pcgrad import pcgrad
from mgda_jax._src.aggregators.pcgrad import pcgrad_weights
from mgda_jax._src.aggregators.pcgrad import PCGradState
from mgda_jax._src.aggregators.pcgrad import task_orders
# Loss weightings.
from mgda_jax._src.weightings.basic import fixed_weighting
from mgda_jax._src.weightings.basic import gradnorm
from mgda_jax._src.weightings.basic import GradNormInner
from mgda_jax._src.weightings.basic import uncertainty_weighting
from mgda_jax._src.weightings.basic import UncertaintyInner
from mgda_jax._src.weightings.basic import uniform_weighting
from mgda_jax._src.weightings.famo import famo
from mgda_jax._src.weightings.famo import FAMOInner
from mgda_jax._src.weightings.loss_balancing import classification_prior
from mgda_jax._src.weightings.loss_balancing import DTPInner
from mgda_jax._src.weightings.loss_balancing import dtp
from mgda_jax._src.weightings.loss_balancing import dwa
from mgda_jax._src.weightings.loss_balancing import DWAInner
from mgda_jax._src.weightings.loss_balancing import initial_loss_weighting
from mgda_jax._src.weightings.loss_balancing import InitialLossInner
from mgda_jax._src.weightings.loss_balancing import lbtw
from mgda_jax._src.weightings.loss_balancing import prior_loss_weighting
from mgda_jax._src.weightings.loss_balancing import realtime_loss_weighting
from mgda_jax._src.weightings.loss_balancing import regression_prior
from mgda_jax._src.weightings.loss_balancing import rlw
from mgda_jax._src.weightings.loss_balancing import RLWInner
# Task grouping (TAG), a namespace: mgda_jax.tag.select_groups, ...
from mgda_jax import tag

__version__ = '0.2.0'

__all__ = (
    'accurate_matvec',
    'aligned_mtl',
    'aligned_mtl_matrix',
    'aligned_mtl_weights',
    'cagrad',
    'cagrad_weights',
    'CAGradInfo',
    'classification_prior',
    'default_max_steps',
    'default_tol',
    'dtp',
    'DTPInner',
    'dualproj',
    'dualproj_weights',
    'dwa',
    'DWAInner',
    'famo',
    'FAMOInner',
    'fixed_weighting',
    'graddrop',
    'graddrop_combine',
    'GradDropInner',
    'gradient_normalization',
    'gradient_normalizers',
    'gradnorm',
    'GradNormInner',
    'gradvac',
    'gradvac_weights',
    'GradVacState',
    'gram_matrix',
    'imtl_g',
    'imtl_g_weights',
    'initial_loss_weighting',
    'InitialLossInner',
    'lbtw',
    'make_method',
    'method_spec',
    'MethodSpec',
    'MethodState',
    'METHODS',
    'mgda',
    'mgda_ub',
    'mgda_weights',
    'min_norm_element',
    'MinNormSolution',
    'nash_mtl',
    'nash_mtl_weights',
    'NashMTLInfo',
    'nonneg_qp',
    'NonnegQPSolution',
    'normalize_gram',
    'NORMALIZERS',
    'pcgrad',
    'pcgrad_weights',
    'PCGradState',
    'per_task_grads',
    'prior_loss_weighting',
    'ProjectionInfo',
    'realtime_loss_weighting',
    'regression_prior',
    'representation_grads',
    'RepresentationGrads',
    'rlw',
    'RLWInner',
    'SolveInfo',
    'SolverResult',
    'tag',
    'task_orders',
    'uncertainty_weighting',
    'UncertaintyInner',
    'uniform_weighting',
    'upgrad',
    'upgrad_weights',
)
