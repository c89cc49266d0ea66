"""Helpers shared by the benchmark scripts: timing, tables, JSON output, environment facts."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], device: str, repeat: int = 5, warmup: int = 1) -> dict:
    """Median/min wall time of ``fn`` in seconds (device-synchronized)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "n": repeat}


def environment(device: str) -> dict:
    import torch

    env = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": device,
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    if str(device).startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    return env


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    print(f"\n{title}")
    line = "  ".join(h.rjust(w) for h, w in zip(cells[0], widths))
    print(line)
    print("-" * len(line))
    for r in cells[1:]:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def _portable(obj):
    """The payload without where this machine put things: output folders dropped, local
    file paths (a model given by path) reduced to their file name."""
    if isinstance(obj, dict):
        return {k: (None if k == "out" else _portable(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_portable(x) for x in obj]
    if isinstance(obj, str) and obj.startswith("/") and os.path.exists(obj):
        return os.path.basename(obj.rstrip("/")).removesuffix(".gguf")
    return obj


def write_json(name: str, payload: dict, out_dir: str | os.PathLike | None = None) -> Path:
    out = Path(out_dir) if out_dir else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    # a file name of letters, digits, '.', '_' and '-' (``random:qwen2.5-0.5b`` → ``random-…``)
    path = out / (re.sub(r"[^A-Za-z0-9._-]+", "-", name) + ".json")
    path.write_text(json.dumps(_portable(payload), indent=2, default=str))
    print(f"\nwrote {path}")
    return path
