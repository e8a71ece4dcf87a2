"""Multi-task architectures in Flax NNX, ready for every gradient method.

An optional namespace (it imports Flax; ``import mgda_jax`` does not). Each
architecture wraps the user's encoder blocks and task decoders, returns one
output per task, and declares its shared parameters
(:meth:`MTLArchitecture.is_shared`, :meth:`MTLArchitecture.shared_mask`)
and its representation ``Z`` (:meth:`MTLArchitecture.represent`,
:meth:`MTLArchitecture.decode_task`). :func:`functional` turns one into the
pure functions of :func:`mgda_jax.representation_grads` (MGDA-UB and every
method that accepts representation gradients) and
:func:`mgda_jax.per_task_grads` (full MGDA on the shared parameters), and
:func:`task_gradients` runs either path.
"""

from mgda_jax._src.nn.base import MTLArchitecture
from mgda_jax._src.nn.base import path_keys
from mgda_jax._src.nn.cross_stitch import CrossStitch
from mgda_jax._src.nn.cross_stitch import stitch_init
from mgda_jax._src.nn.experts import CGC
from mgda_jax._src.nn.experts import MMoE
from mgda_jax._src.nn.experts import PLE
from mgda_jax._src.nn.fafs import Branched
from mgda_jax._src.nn.fafs import branch_affinity
from mgda_jax._src.nn.fafs import error_affinity
from mgda_jax._src.nn.fafs import fafs
from mgda_jax._src.nn.fafs import FAFSRound
from mgda_jax._src.nn.fafs import group_branches
from mgda_jax._src.nn.fafs import Grouping
from mgda_jax._src.nn.fafs import separation
from mgda_jax._src.nn.fafs import widen
from mgda_jax._src.nn.functional import Functional
from mgda_jax._src.nn.functional import functional
from mgda_jax._src.nn.functional import task_gradients
from mgda_jax._src.nn.hard_sharing import HardSharing
from mgda_jax._src.nn.mrn import MRN
from mgda_jax._src.nn.mrn import tensor_normal_cost
from mgda_jax._src.nn.mrn import tensor_normal_init
from mgda_jax._src.nn.mrn import tensor_normal_penalty
from mgda_jax._src.nn.mrn import tensor_normal_prior
from mgda_jax._src.nn.mrn import tensor_normal_update
from mgda_jax._src.nn.mrn import tensor_normal_value_and_grad
from mgda_jax._src.nn.mrn import well_posed_modes
from mgda_jax._src.nn.mrn import TensorNormalPriorState
from mgda_jax._src.nn.mtan import MTAN
from mgda_jax._src.nn.sluice import alpha_init
from mgda_jax._src.nn.sluice import beta_init
from mgda_jax._src.nn.sluice import Sluice

__all__ = (
    'alpha_init',
    'beta_init',
    'Branched',
    'branch_affinity',
    'CGC',
    'CrossStitch',
    'error_affinity',
    'fafs',
    'FAFSRound',
    'Functional',
    'functional',
    'group_branches',
    'Grouping',
    'HardSharing',
    'MMoE',
    'MRN',
    'MTAN',
    'MTLArchitecture',
    'path_keys',
    'PLE',
    'separation',
    'Sluice',
    'stitch_init',
    'task_gradients',
    'tensor_normal_cost',
    'tensor_normal_init',
    'tensor_normal_penalty',
    'tensor_normal_prior',
    'tensor_normal_update',
    'tensor_normal_value_and_grad',
    'TensorNormalPriorState',
    'well_posed_modes',
    'widen',
)
