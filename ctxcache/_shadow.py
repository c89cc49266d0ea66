"""Keep the checkout's ``kernels/`` folder from posing as the PyPI ``kernels`` package.

The Triton kernels live in a top-level ``kernels/`` folder that the build maps to
``ctxcache.kernels``. Whenever a checkout's root is on ``sys.path`` (``python -m pytest`` or a
benchmark script run from the repo), a plain ``import kernels`` finds that folder first; recent
transformers import the unrelated hub ``kernels`` package whenever it is installed (sglang and
transformers depend on it), and fail on ours. Importing the real one first, from the rest of
``sys.path``, settles the name for the whole process.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path


def _ours(origin: str | None) -> bool:
    return origin is not None and (Path(origin).parent / "triton_ops.py").is_file()


def settle_kernels_name() -> None:
    if "kernels" in sys.modules:
        return
    try:
        spec = importlib.util.find_spec("kernels")
    except (ImportError, ValueError):
        return
    if spec is None or not _ours(spec.origin):
        return
    ours = Path(spec.origin).parent.parent.resolve()
    rest = [p for p in sys.path if Path(p or ".").resolve() != ours]
    real = importlib.machinery.PathFinder.find_spec("kernels", rest)
    if real is None or real.loader is None or _ours(real.origin):
        return  # the hub package is not installed: transformers will not look for it
    module = importlib.util.module_from_spec(real)
    sys.modules["kernels"] = module
    try:
        real.loader.exec_module(module)
    except Exception:  # noqa: BLE001 - a broken optional package must not break ctxcache
        del sys.modules["kernels"]
