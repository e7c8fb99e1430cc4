"""How a training run spreads over processes: one process, data parallel, latents sharded over
ranks, or a 2-D mesh of both."""
