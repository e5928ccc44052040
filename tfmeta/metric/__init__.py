"""Metric meta-learners: classify queries by comparing embeddings with the embedded support set (no inner loop)."""

from tfmeta.metric.base import MetricLearner
from tfmeta.metric.matching import MatchingNetwork
from tfmeta.metric.prototypical import PrototypicalNetwork
from tfmeta.metric.relation import RelationNetwork, relation_module

__all__ = ["MatchingNetwork", "MetricLearner", "PrototypicalNetwork", "RelationNetwork", "relation_module"]
