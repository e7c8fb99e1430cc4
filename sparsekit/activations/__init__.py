"""Where activations come from: in-memory tensors, other frameworks' iterables, on-disk shards.

Every source is an ``ActivationSource``: iterating yields x [b, d_in] or (x, y) batches, and
``state_dict()`` / ``load_state_dict()`` resume the stream exactly (see ``source``).
"""
from .hf import HFModuleSource, find_modules
from .lm import load_lm
from .mnist import load_mnist
from .shards import ShardSource, load_activation_file, read_manifest, write_shards
from .source import ActivationSource, IterableSource, TensorSource, as_source
from .text import load_documents, load_text, token_contexts

__all__ = ["ActivationSource", "HFModuleSource", "find_modules", "IterableSource", "ShardSource", "TensorSource", "as_source",
           "load_activation_file",
           "load_documents", "load_lm", "load_mnist", "load_text", "read_manifest", "token_contexts", "write_shards"]
