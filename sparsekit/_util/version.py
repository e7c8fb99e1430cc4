"""The package version (sparsekit.__version__; pyproject.toml's version must match it)."""
VERSION = "0.1.0"
