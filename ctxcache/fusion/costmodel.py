"""How long each strategy takes on *this* engine, so ``auto`` never picks reuse that is slower
than recomputing.

Whether reuse pays depends on the model and the machine: on a large model the layer loop is
bound by FLOPs and reuse wins from a few hundred tokens; on a small model or a slow host the
fixed cost of lookup, assembly and launches can exceed a short full prefill. So the planner
measures instead of assuming: at start-up (once per engine fingerprint, device, dtype and
kernel set; the result is cached on disk) it times full prefill and every reuse strategy on
synthetic RAG prompts of a few lengths with warm chunk caches, and fits per strategy
``t(n) = a + b·n + c·n²`` (fixed cost, per-token work, attention) by least squares.

For a request, reuse is predicted at its warm cost plus the prefill of any chunk that is not
cached yet (it is built on the way); full prefill at its fitted cost.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ctxcache.engine.models import cache_dir
from ctxcache.engine.runner import Engine

CALIBRATED = ("full", "naive", "ape", "cacheblend", "cachecraft")
# Cache-Craft's first uses of a chunk probe attention explicitly (slower): timed apart, with
# fresh chunk tables over warm chunk caches, so the guard counts first uses too
COLD = {"cachecraft": "cachecraft:cold"}


@dataclass
class CostModel:
    coeffs: dict[str, list[float]]  # strategy → [a, b, c] of t(n) = a + b·n + c·n² (seconds)
    measured: list[dict] = field(default_factory=list)
    key: str = ""

    def predict(self, strategy: str, n: int, missing: int = 0) -> float | None:
        """Seconds to first token for a prompt of ``n`` tokens of which ``missing`` belong to
        chunks not cached yet (None if the strategy was not calibrated)."""
        c = self.coeffs.get(strategy if strategy != "prefix" else "full")
        if c is None:
            return None
        t = c[0] + c[1] * n + c[2] * n * n
        if missing and strategy not in ("full", "prefix"):
            f = self.coeffs["full"]
            t += f[1] * missing + f[2] * missing * missing  # chunks are encoded alone
        return max(t, 0.0)

    def cheaper_than_full(self, strategy: str, n: int, missing: int = 0,
                          margin: float = 0.95) -> bool:
        """A strategy this model has no timing for is not known to be cheaper, so it is not
        (KVCOMM on a prompt without anchors recomputes its segments in full: served as
        "reuse", it was slower than full prefill on every request of the GPU long-context
        run). Without a timing of full prefill there is nothing to guard against."""
        mine, full = self.predict(strategy, n, missing), self.predict("full", n)
        if full is None:
            return True
        return mine is not None and mine <= margin * full

    def to_json(self) -> str:
        return json.dumps({"key": self.key, "coeffs": self.coeffs, "measured": self.measured})

    @classmethod
    def from_json(cls, text: str) -> "CostModel":
        d = json.loads(text)
        return cls(d["coeffs"], d.get("measured", []), d.get("key", ""))


def model_key(engine: Engine) -> str:
    dev = torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else "cpu"
    return f"{engine.fingerprint}|{dev}|{engine.dtype}|{engine.ops.name}|v2"


def lengths_for(engine: Engine) -> list[int]:
    top = min(engine.spec.max_positions - 64, 16384 if engine.device.type == "cuda" else 2048)
    base = [1024, 4096, 8192, 16384] if engine.device.type == "cuda" else [256, 768, 2048]
    return [n for n in base if n <= top] or [top]


def _prompt(engine: Engine, n: int, seed: int):
    from ctxcache.fusion.types import Segment

    rng = random.Random(seed)
    vocab = engine.spec.vocab_size
    sys_len, q_len = min(64, n // 8), min(24, n // 8)
    chunk = max(32, min(512, n // 8))
    segs = [Segment.prefix([rng.randrange(vocab) for _ in range(sys_len)])]
    left = n - sys_len - q_len
    while left > 0:
        k = min(left, chunk)
        segs.append(Segment.chunk([rng.randrange(vocab) for _ in range(k)]))
        left -= k
    segs.append(Segment.text([rng.randrange(vocab) for _ in range(q_len)]))
    return segs


def calibrate(engine: Engine, strategies: dict, repeat: int = 3) -> CostModel:
    """Time full prefill and each reuse strategy (warm chunk caches) at a few lengths."""
    from ctxcache.fusion.types import FusionContext
    from ctxcache.kv.store import KVStore
    from ctxcache.kv.tiers.memory import MemoryTier

    store = KVStore([MemoryTier(8 << 30, str(engine.device))], eviction="lru")
    ctx = FusionContext(engine, store, "_calibration")
    rows = []
    try:
        for n in lengths_for(engine):
            segs = _prompt(engine, n, n)
            for name in CALIBRATED:
                strat = strategies.get(name)
                if strat is None:
                    continue
                for _ in range(2):  # builds chunk caches, compiles kernels, captures graphs
                    strat.build(ctx, segs).logits.argmax().item()
                ts = []
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    strat.build(ctx, segs).logits.argmax().item()
                    ts.append(time.perf_counter() - t0)
                rows.append({"strategy": name, "n": n, "s": min(ts)})
                if name in COLD:
                    ts = []
                    for _ in range(repeat):
                        fresh = strat.fresh()
                        t0 = time.perf_counter()
                        fresh.build(ctx, segs).logits.argmax().item()
                        ts.append(time.perf_counter() - t0)
                    rows.append({"strategy": COLD[name], "n": n, "s": min(ts)})
    finally:
        store.close()
    coeffs = {}
    for name in CALIBRATED + tuple(COLD.values()):
        pts = [(r["n"], r["s"]) for r in rows if r["strategy"] == name]
        if not pts:
            continue
        x = np.array([[1.0, n, n * n] for n, _ in pts])
        y = np.array([s for _, s in pts])
        if len(pts) < 3:  # too few points for the quadratic term
            x = x[:, :2]
        sol = np.linalg.lstsq(x, y, rcond=None)[0].tolist()
        coeffs[name] = (sol + [0.0, 0.0])[:3]
    return CostModel(coeffs, rows, model_key(engine))


def load_or_calibrate(engine: Engine, strategies: dict) -> CostModel:
    """The engine's cost model from the local cache, calibrating (and caching) on first use."""
    key = model_key(engine)
    safe = "".join(c if c.isalnum() else "_" for c in key)[-150:]
    path = Path(cache_dir()) / "costmodel" / f"{safe}.json"
    if path.is_file():
        try:
            cm = CostModel.from_json(path.read_text())
            if cm.key == key:
                return cm
        except (ValueError, KeyError):
            pass
    cm = calibrate(engine, strategies)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(cm.to_json())
    os.replace(tmp, path)
    return cm
