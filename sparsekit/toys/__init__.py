"""Toy problems with known answers, for tests and studies: planted superposition features, the
attention-superposition toy, small MNIST MLPs."""
from .attention_superposition import AttentionToyConfig
from .mnist_mlp import MLPConfig, MNISTMLP, train_mlp
from .superposition import SuperpositionData, SuperpositionSource, feature_recovery, recovery_per_feature

__all__ = ["AttentionToyConfig", "MLPConfig", "MNISTMLP", "SuperpositionData", "SuperpositionSource",
           "feature_recovery", "recovery_per_feature", "train_mlp"]
