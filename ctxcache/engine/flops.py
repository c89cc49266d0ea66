"""FLOP counts of prefill work, for cost-aware eviction and the "compute saved" columns.

Counts multiply-adds as 2 FLOPs. Linear work per token is 2 × (parameters touched per token);
attention adds 4 × head_dim × heads per (query, key) pair (QKᵀ and PV).
"""

from __future__ import annotations

from ctxcache.engine.runner import ModelSpec


def linear_flops_per_token(spec: ModelSpec) -> float:
    h, d = spec.hidden_size, spec.head_dim
    attn = h * (spec.num_heads * d) * 2 + h * (spec.num_kv_heads * d) * 2  # q,o + k,v
    mlp = 3 * h * spec.intermediate_size
    return 2.0 * spec.num_layers * (attn + mlp)


def attention_flops(spec: ModelSpec, n_queries: int, n_keys_avg: float) -> float:
    return 4.0 * spec.num_layers * spec.num_heads * spec.head_dim * n_queries * n_keys_avg


def prefill_flops(spec: ModelSpec, n_new: int, n_past: int = 0) -> float:
    """FLOPs to prefill ``n_new`` tokens after ``n_past`` cached ones (causal)."""
    avg_keys = n_past + (n_new + 1) / 2
    return linear_flops_per_token(spec) * n_new + attention_flops(
        spec, n_new, avg_keys)
