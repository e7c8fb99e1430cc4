"""Toy problems with known answers, for tests and studies."""
from .superposition import SuperpositionData, SuperpositionSource, feature_recovery, recovery_per_feature

__all__ = ["SuperpositionData", "SuperpositionSource", "feature_recovery", "recovery_per_feature"]
