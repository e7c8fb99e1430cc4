"""Training a sparse dictionary: the config, the loop, checkpoints, guards, memory estimates,
dead-latent handling, tracking and multi-process training (``parallel``).

Modules, each importing only those listed before it (and sparsekit.sae, .ops, .activations,
._util, .errors; never a module that imports it back):

- ``checkpoint``, ``memory``, ``dead_latents``, ``tracking``, ``metrics``, ``batches``: the parts
  (the checkpoint folder's format; memory estimates; AuxK, ghost grads, resampling; W&B; held-out
  metrics and the metric log; the batch stream)
- ``config``: TrainConfig (each field's help: ``config.field_help``) and TrainResult
- ``optimizer``: Adam as the trainer builds it and the LR and sparsity schedules
- ``guards``: the checkpoint folder's lock, the memory check, the NaN checks
- ``parallel``: one process, data parallel, latent sharding (``parallel.training_context``)
- ``state``: RunState, what a checkpoint holds, and ``write_checkpoint``
- ``loop``: ``train`` and its phases (``start``, ``take_step``, ``after_step``, ``finish``)
"""
