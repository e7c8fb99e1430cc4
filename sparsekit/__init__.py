"""sparsekit: train sparse dictionaries (sparse autoencoders, transcoders) on neural-network
activations, fast, and read the features they find.

The op layer lives in ``sparsekit.ops`` (checked, differentiable, backend chosen per device);
``sparsekit.ops.reference`` is its plain-PyTorch spec; ``sparsekit.backends()`` tells which
implementation runs on each device.
"""
from . import _moved
from ._util.version import VERSION
from . import ops
from .ops import reference
from .ops.backend import backends
from .sae import BatchTopKSAE, JumpReLUSAE, ReLUSAE, TopKSAE, Transcoder, load, load_saelens
from .analysis.splice import loss_recovered, splice, zero_ablate
from .training.config import TrainConfig, TrainResult
from .training.loop import train
from .ops import BatchTopKCodes, SparseCodes, TopKCodes, batchtopk_encode, ghost_grad_loss, jumprelu_encode, relu_encode, relu_encode_adaptive, sparse_decode, sparse_decode_coo, topk_encode

__version__ = VERSION

_moved.install()


def __getattr__(name: str):
    return _moved.attribute(name)

__all__ = [
    "BatchTopKCodes", "BatchTopKSAE", "JumpReLUSAE", "ReLUSAE", "SparseCodes", "TopKCodes", "TopKSAE", "Transcoder", "backends",
    "load", "load_saelens", "loss_recovered", "splice", "TrainConfig", "TrainResult", "train", "zero_ablate", "batchtopk_encode", "ghost_grad_loss", "jumprelu_encode",
    "ops", "reference", "relu_encode", "relu_encode_adaptive", "sparse_decode", "sparse_decode_coo", "topk_encode",
]
