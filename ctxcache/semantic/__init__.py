"""Category-aware semantic cache: embedder, classifier, per-category policy, HNSW index, SQL store."""

from ctxcache.semantic.cache import (
    CacheHit, CacheRequest, LookupResult, SemanticCache, context_fingerprint,
)
from ctxcache.semantic.classifier import DEFAULT_CATEGORIES, CentroidClassifier, load_examples
from ctxcache.semantic.embedder import Embedder, TransformerEmbedder
from ctxcache.semantic.index import HnswParams, VectorIndex
from ctxcache.semantic.policy import CategoryPolicy, LoadAdapter, default_policies, make_policy

__all__ = ["CacheHit", "CacheRequest", "CategoryPolicy", "CentroidClassifier",
           "DEFAULT_CATEGORIES", "Embedder", "LoadAdapter", "LookupResult", "SemanticCache",
           "TransformerEmbedder", "VectorIndex", "HnswParams", "context_fingerprint", "default_policies",
           "load_examples", "make_policy"]
