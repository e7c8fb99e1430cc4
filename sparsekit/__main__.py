"""`python -m sparsekit <command>`: see `python -m sparsekit --help`."""
from .cli import main

main()
