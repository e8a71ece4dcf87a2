"""What every MTL experiment shares; a dataset brings only its own parts.

A dataset (``experiments/<name>/``, in the Flax examples' layout) provides

* ``input_pipeline.py``: its data, as :class:`experiments.common.trainer.Splits`
  (``train``/``val``/``test`` arrays), from a local folder, TFDS or a
  verified download (:mod:`experiments.common.download`);
* ``models.py``: a Flax NNX model and its ``functional`` split into
  ``encode(params, x, labels, key) -> Z`` and ``task_losses(params, z, x,
  labels, key) -> (losses (K,), outputs)`` (a model with BatchNorm is
  ``stateful``: its statistics are a model state the encoder updates);
* an :class:`experiments.common.trainer.Experiment`: its
  :class:`experiments.common.tasks.TaskSpec` (task names, metrics, which are
  higher-is-better), the evaluation metrics of a batch, the batch KPIs, and
  any dataset-specific method arguments (e.g. the prior of
  ``prior_loss_weighting``);
* ``configs/default.py`` and a CPU-sized ``configs/test.py`` built on
  :func:`experiments.common.config.base_config`.

The framework does the rest: every registered ``mgda_jax`` method with its
hyperparameters from the config (:mod:`~experiments.common.methods`), the
jitted train and eval steps, chunked ``lax.scan`` on accelerators, the data
mesh, checkpoints and safe resume, JSONL + TensorBoard logs, a ``tqdm``
progress bar, best-epoch selection by a configurable metric, K-task Δm, and
the reproduction driver (:mod:`~experiments.common.reproduce`), and TAG's
inter-task affinity recorded in the training step (``config.affinity``).
"""
