"""HNSW vector index (hnswlib) for one (tenant, category).

Labels are the SQL row ids, so a hit resolves to its payload by primary key. Deleted or expired
entries are marked deleted in the graph (hnswlib skips them) and their slots are reused. The
index can be saved next to a small manifest and is rebuilt from SQL when the manifest does not
match the database (crash, restore, another replica wrote entries).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import hnswlib
import numpy as np

from ctxcache.errors import InvalidInputError


@dataclass(frozen=True)
class HnswParams:
    """Graph degree, build and search breadth. ``ef=None``: chosen by index size (``auto_ef``).

    Why by size: a search must visit more of a bigger graph to find the true nearest entry at
    the same rate, and a fixed large ef wastes time on small indexes.
    """

    M: int = 16
    ef_construction: int = 100
    ef: int | None = None

    def __post_init__(self):
        if self.M < 2 or self.ef_construction < 1 or (self.ef is not None and self.ef < 1):
            raise InvalidInputError(f"invalid HNSW parameters {self}: M >= 2, ef_construction "
                                    ">= 1 and ef >= 1 (or None for the size-based default)")

    def search_ef(self, n: int) -> int:
        return self.ef if self.ef is not None else auto_ef(n)


def auto_ef(n: int) -> int:
    # measured with real MiniLM vectors of real sentences, M=16 (benchmarks/semantic_scale.py):
    # ANN recall@1 at ef 32 / 64 — 10K: 1.0 / 1.0, 100K: 0.989 / 0.994, 1M: 0.969 / 0.979;
    # ef 128 adds < 0.5 point at 1M for +0.2 ms
    return 32 if n <= 50_000 else 64


class VectorIndex:
    def __init__(self, dim: int, capacity: int = 1024, params: HnswParams = HnswParams()):
        self.dim = dim
        self.params = params
        self.index = hnswlib.Index(space="ip", dim=dim)
        self.index.init_index(max_elements=capacity, M=params.M,
                              ef_construction=params.ef_construction,
                              allow_replace_deleted=True)
        self.ids: set[int] = set()
        self.lock = threading.RLock()

    @property
    def ef(self) -> int:
        return self.params.search_ef(len(self.ids))

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, ids: np.ndarray | list[int], vectors: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return
        with self.lock:
            need = len(self.ids) + len(ids)
            cap = self.index.get_max_elements()
            if need > cap:
                self.index.resize_index(max(need, cap * 2))
            self.index.add_items(vectors.astype(np.float32), ids, replace_deleted=True)
            self.ids.update(int(i) for i in ids)

    def delete(self, entry_id: int) -> bool:
        with self.lock:
            if entry_id not in self.ids:
                return False
            self.index.mark_deleted(int(entry_id))
            self.ids.discard(entry_id)
            return True

    def query(self, vector: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Ids and cosine similarities of the ``k`` nearest entries (fewer if the index is small)."""
        with self.lock:
            n = len(self.ids)
            if n == 0:
                return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
            k = min(k, n)
            self.index.set_ef(max(self.ef, k))
            labels, dist = self.index.knn_query(vector.reshape(1, -1).astype(np.float32), k=k)
        return labels[0].astype(np.int64), (1.0 - dist[0]).astype(np.float32)

    def save(self, path: Path, fingerprint: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with self.lock:
            tmp = path.with_suffix(".tmp")
            self.index.save_index(str(tmp))
            tmp.replace(path)
            path.with_suffix(".json").write_text(json.dumps(
                {"fingerprint": fingerprint, "dim": self.dim, "ids": sorted(self.ids)}))

    @classmethod
    def load(cls, path: Path, fingerprint: str, dim: int,
             params: HnswParams = HnswParams()) -> "VectorIndex | None":
        """The saved index if its manifest matches ``fingerprint`` (the SQL state), else None."""
        try:
            manifest = json.loads(path.with_suffix(".json").read_text())
        except (OSError, ValueError):
            return None
        if manifest.get("fingerprint") != fingerprint or manifest.get("dim") != dim:
            return None
        idx = cls(dim, params=params)
        try:
            idx.index.load_index(str(path), allow_replace_deleted=True)
        except RuntimeError:
            return None
        idx.ids = set(manifest["ids"])
        return idx
