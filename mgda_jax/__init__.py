"""mgda_jax: multi-task learning as multi-objective optimisation, in JAX.

The public API; everything else lives in ``mgda_jax._src`` and may change.
"""

from mgda_jax._src.gram import gram_matrix
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
from mgda_jax._src.normalizers import gradient_normalizers
from mgda_jax._src.normalizers import normalize_gram
from mgda_jax._src.normalizers import NORMALIZERS
from mgda_jax._src.task_grads import per_task_grads

__version__ = '0.1.0'

__all__ = (
    'default_max_steps',
    'default_tol',
    'fixed_weighting',
    'gradnorm',
    'GradNormState',
    'gradient_normalizers',
    'gram_matrix',
    'mgda',
    'mgda_ub',
    'mgda_weights',
    'MGDAState',
    'min_norm_element',
    'MinNormSolution',
    'normalize_gram',
    'NORMALIZERS',
    'per_task_grads',
    'representation_grads',
    'RepresentationGrads',
    'SolverResult',
    'uncertainty_weighting',
    'UncertaintyState',
    'uniform_weighting',
    'WeightingState',
)
