"""Research studies as library functions (no argparse: their command lines live in sparsekit.cli):
the synthetic recovery demo, the MNIST scan and study, the language-model demo, the attention toy's
phase scan (attention_phase) and the dead-latents-vs-size scan on SmolLM2 (dead_latents_lm)."""
