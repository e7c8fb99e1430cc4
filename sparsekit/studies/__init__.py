"""Research studies as library functions (no argparse: their command lines live in sparsekit.cli):
the synthetic recovery demo, the MNIST scan and study, the language-model demo."""
