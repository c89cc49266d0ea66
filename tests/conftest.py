"""Shared fixtures: the real packaged model is loaded once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels run on CPU through the interpreter in tests (set before triton is imported);
# the engine still defaults to the torch ops on CPU.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Gateways started by the tests skip the start-up timing of strategies (it would compete with
# the tests for the CPU); tests/test_fusion.py calibrates a cost model on its own.
os.environ.setdefault("CTXCACHE_COST_MODEL", "off")


@pytest.fixture(scope="session")
def engine():
    """SmolLM2-135M-Instruct in float32 on CPU — the real model, not a stand-in."""
    import torch

    from ctxcache.engine import Engine

    torch.manual_seed(0)
    return Engine.load("smollm2-135m-instruct", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_engines():
    """Random-weight miniatures of two architectures (Llama, Qwen2 with q/k/v bias)."""
    from ctxcache.engine import Engine

    return {name: Engine.load(f"random:{name}") for name in ("tiny-llama", "tiny-qwen2")}


@pytest.fixture(scope="session")
def qwen():
    """The packaged Qwen2.5-Coder-0.5B-Instruct (fp32, CPU): a real model with a tool format."""
    from ctxcache.engine import Engine
    from ctxcache.engine.packaged import SPLIT_MODELS, split_status

    if split_status(SPLIT_MODELS["qwen2.5-coder-0.5b-instruct"])[1]:
        pytest.skip("install ctxcache[qwen05b] for the real Qwen model")
    return Engine.load("qwen2.5-coder-0.5b-instruct")
