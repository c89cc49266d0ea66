"""Embedded model runner: HF weights, our own layer loop, explicit positions, injectable K/V."""

from ctxcache.engine.generate import (
    DecodeBuffer,
    GenerationChunk,
    GenerationResult,
    decode_step,
    generate,
    stream,
    stream_from_kv,
)
from ctxcache.engine.kvcache import KVCache
from ctxcache.engine.models import DEFAULT_MODEL, RANDOM_CONFIGS, available_models, load_model
from ctxcache.engine.rope import Rope, rope_shift
from ctxcache.engine.runner import Engine, ModelSpec, PrefillOutput, parse_dtype
from ctxcache.engine.sampling import Sampler, SamplingParams

__all__ = [
    "DEFAULT_MODEL", "RANDOM_CONFIGS", "DecodeBuffer", "Engine", "GenerationChunk",
    "GenerationResult", "KVCache", "ModelSpec", "PrefillOutput", "Rope", "Sampler",
    "SamplingParams", "available_models", "decode_step", "generate", "load_model",
    "parse_dtype", "rope_shift", "stream", "stream_from_kv",
]
