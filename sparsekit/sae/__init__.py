"""Sparse dictionaries: one module per architecture, a registry from cfg.json names to classes."""
from .base import ARCHITECTURES, SAEOutput, SparseDictionary, geometric_median
from .batchtopk import BatchTopKSAE
from .jumprelu import JumpReLUSAE
from .persistence import load
from .relu import ReLUSAE
from .saelens import export_saelens, load_saelens
from .topk import TopKSAE
from .transcoder import Transcoder

__all__ = ["ARCHITECTURES", "BatchTopKSAE", "JumpReLUSAE", "ReLUSAE", "SAEOutput", "SparseDictionary", "TopKSAE",
           "Transcoder", "export_saelens", "geometric_median", "load", "load_saelens"]
