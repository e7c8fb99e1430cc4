"""sparsekit: train sparse dictionaries (sparse autoencoders, transcoders) on neural-network
activations, fast, and read the features they find.

The op layer lives in ``sparsekit.ops`` (checked, differentiable, backend chosen per device);
``sparsekit.ops.reference`` is its plain-PyTorch spec; ``sparsekit.backends()`` tells which
implementation runs on each device.
"""
from . import _moved, ops
from ._util.version import VERSION
from .analysis.splice import loss_recovered, splice, zero_ablate
from .analysis.steering import steer
from .ops import (
    BatchTopKCodes,
    SparseCodes,
    TopKCodes,
    batchtopk_encode,
    ghost_grad_loss,
    jumprelu_encode,
    reference,
    relu_encode,
    relu_encode_adaptive,
    sparse_decode,
    sparse_decode_coo,
    topk_encode,
)
from .ops.backend import backends
from .sae import (
    BatchTopKSAE,
    GatedSAE,
    JumpReLUSAE,
    MatryoshkaBatchTopKSAE,
    ReLUSAE,
    TopKSAE,
    Transcoder,
    export_circuit_tracer,
    export_dictionary_learning,
    export_sparsify,
    load,
    load_circuit_tracer,
    load_dictionary_learning,
    load_saelens,
    load_sparsify,
    push_to_hub,
)
from .training.config import TrainConfig, TrainResult
from .training.loop import train

__version__ = VERSION

_moved.install()


def __getattr__(name: str):
    """``sparsekit.<old module>`` for a module that moved (see sparsekit._moved)."""
    return _moved.attribute(name)


__all__ = [
    "BatchTopKCodes", "BatchTopKSAE", "GatedSAE", "JumpReLUSAE", "MatryoshkaBatchTopKSAE", "ReLUSAE", "SparseCodes", "TopKCodes",
    "TopKSAE", "Transcoder",
    "TrainConfig", "TrainResult", "backends", "batchtopk_encode", "export_circuit_tracer", "export_dictionary_learning",
    "export_sparsify", "ghost_grad_loss", "jumprelu_encode", "load", "load_circuit_tracer", "load_dictionary_learning",
    "load_saelens", "load_sparsify",
    "loss_recovered", "push_to_hub", "ops", "reference", "relu_encode", "relu_encode_adaptive", "sparse_decode",
    "sparse_decode_coo", "splice", "steer", "topk_encode", "train", "zero_ablate",
]
