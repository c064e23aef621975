"""Retrieval: metrics (SPEC §3) and rerankers (SPEC §4). Imports numpy only."""
from .metrics import RetrievalInputError, ranks_i2t, ranks_t2i, retrieval_metrics
from .rerank import RERANK_METHODS, mr_rerank, rerank, smr_rerank

__all__ = [
    "RERANK_METHODS",
    "RetrievalInputError",
    "mr_rerank",
    "ranks_i2t",
    "ranks_t2i",
    "rerank",
    "retrieval_metrics",
    "smr_rerank",
]
