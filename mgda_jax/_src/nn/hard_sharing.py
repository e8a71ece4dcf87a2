"""Hard parameter sharing: one shared encoder, one decoder per task."""

from typing import Mapping, Sequence

from flax import nnx

from mgda_jax._src.nn import base


class HardSharing(base.MTLArchitecture):
  """A shared encoder followed by task-specific decoders.

  .. math::

    Z = f(x; \\theta_{sh}), \\qquad \\hat y_t = h_t(Z; \\theta_t),

  the architecture of Caruana (1997) and of Sener & Koltun (2018); "hard
  parameter sharing" in Ruder's survey (2017). **Where the decoder goes**:
  each ``decoders[t]`` is applied to the encoder's output ``Z`` and returns
  task ``t``'s prediction; put everything task-specific (heads, towers,
  upsampling) there, everything shared in ``encoder``.

  Shared parameters: the encoder's (path ``('encoder', ...)``). The
  representation is ``Z`` itself.

  Args:
    encoder: ``x -> Z`` (any module; ``Z`` any pytree).
    decoders: one module per task, ``Z -> output``, as a list (outputs a
      tuple in task order) or a dict task name -> module (outputs a dict).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import mgda_jax.nn
    >>> rngs = nnx.Rngs(0)
    >>> model = mgda_jax.nn.HardSharing(
    ...     encoder=nnx.Sequential(nnx.Linear(3, 16, rngs=rngs), nnx.relu),
    ...     decoders={'age': nnx.Linear(16, 1, rngs=rngs),
    ...               'digit': nnx.Linear(16, 10, rngs=rngs)})
    >>> out = model(jnp.ones((5, 3)))
    >>> out['age'].shape, out['digit'].shape
    ((5, 1), (5, 10))

  References:
    Caruana, Multitask Learning, Machine Learning 28, 1997.
    Ruder, An Overview of Multi-Task Learning in Deep Neural Networks, 2017,
    arXiv:1706.05098.
  """

  def __init__(self, encoder: nnx.Module,
               decoders: Sequence[nnx.Module] | Mapping[str, nnx.Module]):
    self.encoder = encoder
    self.decoders, self.task_names, self.as_dict = base.task_container(
        decoders, 'HardSharing decoders')

  def represent(self, x):
    return self.encoder(x)

  def decode_task(self, task, z, x):
    del x
    return base.task_part(self.decoders, self.task_names, self.as_dict,
                          task)(z)

  def is_shared(self, path):
    return path[:1] == ('encoder',)
