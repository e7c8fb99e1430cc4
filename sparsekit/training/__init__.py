"""Training a sparse dictionary: the config, the loop, checkpoints, guards, memory estimates,
dead-latent handling, tracking and multi-process training (``parallel``)."""
