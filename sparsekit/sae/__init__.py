"""Sparse dictionaries: one module per architecture, registered by name (``registry``) with the facts
the trainer, the CLI, the memory estimate and the SAELens export read from its class.

Adding an architecture is one module here (a SparseDictionary subclass declaring its facts, under
``@register``) plus its import below and its tests.
"""
from .base import SAEOutput, SparseDictionary, geometric_median
from .circuit_tracer_format import export_circuit_tracer, load_circuit_tracer
from .dictionary_learning_format import export_dictionary_learning, load_dictionary_learning
from .hub import push_to_hub
from .persistence import load
from .registry import ARCHITECTURES, Hyperparameter, register
from .saelens import export_saelens, load_saelens
from .sparsify_format import export_sparsify, load_sparsify
from .transcoder import Transcoder

# Registration order is the order the CLI and its errors list architectures in.
# isort: off
from .topk import TopKSAE
from .batchtopk import BatchTopKSAE
from .relu import ReLUSAE
from .jumprelu import JumpReLUSAE
from .gated import GatedSAE
from .matryoshka import MatryoshkaBatchTopKSAE
from .clt import CrossLayerTranscoder
# isort: on

__all__ = ["ARCHITECTURES", "BatchTopKSAE", "CrossLayerTranscoder", "GatedSAE", "Hyperparameter", "JumpReLUSAE",
           "MatryoshkaBatchTopKSAE", "ReLUSAE", "SAEOutput", "SparseDictionary", "TopKSAE", "Transcoder",
           "export_circuit_tracer", "export_dictionary_learning", "export_saelens", "export_sparsify", "geometric_median", "load",
           "load_circuit_tracer", "load_dictionary_learning", "load_saelens", "load_sparsify", "push_to_hub", "register"]
