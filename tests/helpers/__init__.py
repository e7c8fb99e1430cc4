"""Shared test helpers: case factories for ops, dictionaries, fuzzing and language models, and the
worker scripts that tests run as subprocesses."""
