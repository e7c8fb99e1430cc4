"""Toy problems with known answers, for tests and studies: planted superposition features, the
attention-superposition toy, small MNIST MLPs, sparse-regularised 1-layer character LMs."""
from .attention_superposition import AttentionToyConfig
from .mnist_mlp import MNISTMLP, MLPConfig, train_mlp
from .sparse_base_model import SparseBaseConfig, train_sparse_base
from .superposition import SuperpositionData, SuperpositionSource, feature_recovery, recovery_per_feature

__all__ = ["AttentionToyConfig", "MLPConfig", "MNISTMLP", "SparseBaseConfig", "SuperpositionData",
           "SuperpositionSource", "feature_recovery", "recovery_per_feature", "train_mlp", "train_sparse_base"]
