"""mgda_jax: multi-task learning as multi-objective optimisation, in JAX.

The public API; everything else lives in ``mgda_jax._src`` and may change.
"""

from mgda_jax._src.aggregation import GradientMethodState
from mgda_jax._src.aligned_mtl import aligned_mtl
from mgda_jax._src.aligned_mtl import aligned_mtl_matrix
from mgda_jax._src.aligned_mtl import aligned_mtl_weights
from mgda_jax._src.cagrad import cagrad
from mgda_jax._src.cagrad import cagrad_weights
from mgda_jax._src.cagrad import CAGradInfo
from mgda_jax._src.cagrad import CAGradState
from mgda_jax._src.famo import famo
from mgda_jax._src.famo import FAMOState
from mgda_jax._src.graddrop import graddrop
from mgda_jax._src.graddrop import graddrop_combine
from mgda_jax._src.graddrop import GradDropState
from mgda_jax._src.gradient_normalization import gradient_normalization
from mgda_jax._src.gram import gram_matrix
from mgda_jax._src.imtl import imtl_g
from mgda_jax._src.imtl import imtl_g_weights
from mgda_jax._src.jacobian_descent import dualproj
from mgda_jax._src.jacobian_descent import dualproj_weights
from mgda_jax._src.jacobian_descent import ProjectionInfo
from mgda_jax._src.jacobian_descent import ProjectionState
from mgda_jax._src.jacobian_descent import upgrad
from mgda_jax._src.jacobian_descent import upgrad_weights
from mgda_jax._src.loss_balancing import classification_prior
from mgda_jax._src.loss_balancing import DTPState
from mgda_jax._src.loss_balancing import dtp
from mgda_jax._src.loss_balancing import dwa
from mgda_jax._src.loss_balancing import DWAState
from mgda_jax._src.loss_balancing import initial_loss_weighting
from mgda_jax._src.loss_balancing import InitialLossState
from mgda_jax._src.loss_balancing import lbtw
from mgda_jax._src.loss_balancing import prior_loss_weighting
from mgda_jax._src.loss_balancing import realtime_loss_weighting
from mgda_jax._src.loss_balancing import regression_prior
from mgda_jax._src.loss_balancing import rlw
from mgda_jax._src.loss_balancing import RLWState
from mgda_jax._src.loss_weighting import fixed_weighting
from mgda_jax._src.loss_weighting import gradnorm
from mgda_jax._src.loss_weighting import GradNormState
from mgda_jax._src.loss_weighting import uncertainty_weighting
from mgda_jax._src.loss_weighting import UncertaintyState
from mgda_jax._src.loss_weighting import uniform_weighting
from mgda_jax._src.loss_weighting import WeightingState
from mgda_jax._src.mgda import mgda
from mgda_jax._src.mgda import mgda_weights
from mgda_jax._src.mgda import MGDAState
from mgda_jax._src.mgda_ub import mgda_ub
from mgda_jax._src.mgda_ub import representation_grads
from mgda_jax._src.mgda_ub import RepresentationGrads
from mgda_jax._src.min_norm import default_max_steps
from mgda_jax._src.min_norm import default_tol
from mgda_jax._src.min_norm import min_norm_element
from mgda_jax._src.min_norm import MinNormSolution
from mgda_jax._src.min_norm import SolverResult
from mgda_jax._src.nash_mtl import nash_mtl
from mgda_jax._src.nash_mtl import nash_mtl_weights
from mgda_jax._src.nash_mtl import NashMTLInfo
from mgda_jax._src.nash_mtl import NashMTLState
from mgda_jax._src.nonneg_qp import nonneg_qp
from mgda_jax._src.nonneg_qp import NonnegQPSolution
from mgda_jax._src.normalizers import gradient_normalizers
from mgda_jax._src.normalizers import normalize_gram
from mgda_jax._src.normalizers import NORMALIZERS
from mgda_jax._src.pcgrad import gradvac
from mgda_jax._src.pcgrad import gradvac_weights
from mgda_jax._src.pcgrad import GradVacState
from mgda_jax._src.pcgrad import pcgrad
from mgda_jax._src.pcgrad import pcgrad_weights
from mgda_jax._src.pcgrad import PCGradState
from mgda_jax._src.pcgrad import task_orders
from mgda_jax._src.task_grads import per_task_grads

__version__ = '0.1.0'

__all__ = (
    'aligned_mtl',
    'aligned_mtl_matrix',
    'aligned_mtl_weights',
    'cagrad',
    'cagrad_weights',
    'CAGradInfo',
    'CAGradState',
    'classification_prior',
    'default_max_steps',
    'default_tol',
    'dtp',
    'DTPState',
    'dualproj',
    'dualproj_weights',
    'dwa',
    'DWAState',
    'famo',
    'FAMOState',
    'fixed_weighting',
    'graddrop',
    'graddrop_combine',
    'GradDropState',
    'gradient_normalization',
    'gradient_normalizers',
    'GradientMethodState',
    'gradnorm',
    'GradNormState',
    'gradvac',
    'gradvac_weights',
    'GradVacState',
    'gram_matrix',
    'imtl_g',
    'imtl_g_weights',
    'initial_loss_weighting',
    'InitialLossState',
    'lbtw',
    'mgda',
    'mgda_ub',
    'mgda_weights',
    'MGDAState',
    'min_norm_element',
    'MinNormSolution',
    'nash_mtl',
    'nash_mtl_weights',
    'NashMTLInfo',
    'NashMTLState',
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
    'ProjectionState',
    'realtime_loss_weighting',
    'regression_prior',
    'representation_grads',
    'RepresentationGrads',
    'rlw',
    'RLWState',
    'SolverResult',
    'task_orders',
    'uncertainty_weighting',
    'UncertaintyState',
    'uniform_weighting',
    'upgrad',
    'upgrad_weights',
    'WeightingState',
)
