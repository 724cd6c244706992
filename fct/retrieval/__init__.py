"""Retrieval evaluation: exact k-NN, CMC top-k and full mAP, feature extraction."""

from fct.retrieval.features import extract_features
from fct.retrieval.knn import KNN_BACKENDS, knn
from fct.retrieval.metrics import cmc_from_neighbors, retrieval_metrics

__all__ = ["KNN_BACKENDS", "cmc_from_neighbors", "extract_features", "knn", "retrieval_metrics"]
