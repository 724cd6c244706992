"""Retrieval evaluation: exact k-NN, the exact ranking engine, CMC top-k and full mAP, feature
extraction."""

from fct.retrieval.engine import QueryRanks, rank_queries
from fct.retrieval.features import extract_features
from fct.retrieval.knn import KNN_BACKENDS
from fct.retrieval.metrics import cmc_from_neighbors, retrieval_metrics

__all__ = ["KNN_BACKENDS", "QueryRanks", "cmc_from_neighbors", "extract_features", "rank_queries",
           "retrieval_metrics"]
