"""TAG: which tasks to train together (Fifty et al. 2021, arXiv:2109.04617).

Lookahead inter-task affinity (:func:`lookahead_affinity`), its running
average inside a jitted training step (:func:`affinity_average`), the
cosine-similarity baseline, HOA's pairwise affinity, and exact network
selection (:func:`select_groups`). No Flax import.
"""

from mgda_jax._src.tag.affinity import Affinity
from mgda_jax._src.tag.affinity import affinity_average
from mgda_jax._src.tag.affinity import AffinityAverage
from mgda_jax._src.tag.affinity import AffinityAverageState
from mgda_jax._src.tag.affinity import average_affinity
from mgda_jax._src.tag.affinity import cosine_affinity
from mgda_jax._src.tag.affinity import epoch_affinity
from mgda_jax._src.tag.affinity import lookahead_affinity
from mgda_jax._src.tag.affinity import representation_affinity
from mgda_jax._src.tag.affinity import reset_epoch
from mgda_jax._src.tag.affinity import shared_task_grads
from mgda_jax._src.tag.selection import collection_score
from mgda_jax._src.tag.selection import group_scores
from mgda_jax._src.tag.selection import hoa_affinity
from mgda_jax._src.tag.selection import select_groups
from mgda_jax._src.tag.selection import SINGLETON_SCORE
from mgda_jax._src.tag.selection import TaskGrouping

__all__ = (
    'Affinity',
    'affinity_average',
    'AffinityAverage',
    'AffinityAverageState',
    'average_affinity',
    'collection_score',
    'cosine_affinity',
    'epoch_affinity',
    'group_scores',
    'hoa_affinity',
    'lookahead_affinity',
    'representation_affinity',
    'reset_epoch',
    'select_groups',
    'shared_task_grads',
    'SINGLETON_SCORE',
    'TaskGrouping',
)
