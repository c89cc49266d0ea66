"""HNSW vector index (hnswlib) for one (tenant, category).

Each entry's graph label maps to its SQL row id, so a hit resolves to its payload by primary key.
Deleted or expired entries are marked deleted in the graph (hnswlib skips them) and their slots
are reused under fresh labels. The
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
    """Entry ids → vectors, searched by cosine.

    Why the graph's labels are not the entry ids: SQL may hand out an id again once its row is
    gone (SQLite reuses the highest rowid after a delete), and hnswlib's slot reuse
    (``replace_deleted``) re-labels a freed slot, so re-adding a label that is still marked
    deleted left two slots behind one label — a delete then failed with "Label not found" and
    the orphan slot kept answering with the old vector. Labels here come from a counter and are
    never handed out twice; ``ids`` maps them back to entry ids.
    """

    def __init__(self, dim: int, capacity: int = 1024, params: HnswParams = HnswParams()):
        self.dim = dim
        self.params = params
        self.index = hnswlib.Index(space="ip", dim=dim)
        self.index.init_index(max_elements=capacity, M=params.M,
                              ef_construction=params.ef_construction,
                              allow_replace_deleted=True)
        self.label_of: dict[int, int] = {}  # entry id -> graph label
        self.id_of: dict[int, int] = {}  # graph label -> entry id
        self.next_label = 0
        self.lock = threading.RLock()

    @property
    def ids(self) -> set[int]:
        return set(self.label_of)

    @property
    def ef(self) -> int:
        return self.params.search_ef(len(self.label_of))

    def __len__(self) -> int:
        return len(self.label_of)

    def __contains__(self, entry_id: int) -> bool:
        return entry_id in self.label_of

    def add(self, ids: np.ndarray | list[int], vectors: np.ndarray) -> None:
        """Add entries; an id already present gets its new vector (old slot released)."""
        ids = [int(i) for i in np.asarray(ids, dtype=np.int64)]
        if not ids:
            return
        with self.lock:
            for i in ids:
                if i in self.label_of:
                    self.delete(i)
            need = len(self.label_of) + len(ids)
            cap = self.index.get_max_elements()
            if need > cap:
                self.index.resize_index(max(need, cap * 2))
            labels = np.arange(self.next_label, self.next_label + len(ids), dtype=np.int64)
            self.next_label += len(ids)
            self.index.add_items(vectors.astype(np.float32).reshape(len(ids), -1), labels,
                                 replace_deleted=True)
            for i, lab in zip(ids, labels.tolist()):
                self.label_of[i] = lab
                self.id_of[lab] = i

    def delete(self, entry_id: int) -> bool:
        with self.lock:
            lab = self.label_of.pop(entry_id, None)
            if lab is None:
                return False
            self.id_of.pop(lab, None)
            self.index.mark_deleted(lab)
            return True

    def query(self, vector: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Ids and cosine similarities of the ``k`` nearest entries (fewer if the index is small).

        hnswlib raises when its search reaches fewer than ``k`` live entries (many deleted
        slots around the query); the search is then repeated with a wider beam and, failing
        that, a smaller ``k``, so a lookup returns what the graph holds instead of an error."""
        q = vector.reshape(1, -1).astype(np.float32)
        with self.lock:
            n = len(self.label_of)
            if n == 0:
                return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
            k = min(k, n)
            ef = max(self.ef, k)
            while True:
                self.index.set_ef(ef)
                try:
                    labels, dist = self.index.knn_query(q, k=k)
                    break
                except RuntimeError:
                    if ef < 4 * n:
                        ef = min(4 * ef, 4 * n)
                    elif k > 1:
                        k = max(1, k // 2)
                    else:
                        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
            ids = [self.id_of.get(int(lab), -1) for lab in labels[0]]
        sims = (1.0 - dist[0]).astype(np.float32)
        keep = [j for j, i in enumerate(ids) if i >= 0]
        return np.asarray([ids[j] for j in keep], dtype=np.int64), sims[keep]

    def exact(self, vector: np.ndarray, entry_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Ids and cosine similarities of ``entry_ids`` (those still here), best first."""
        with self.lock:
            pairs = [(i, self.label_of[i]) for i in entry_ids if i in self.label_of]
            if not pairs:
                return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
            vecs = np.asarray(self.index.get_items([lab for _, lab in pairs]), dtype=np.float32)
        sims = vecs @ vector.astype(np.float32).reshape(-1)
        order = np.argsort(-sims, kind="stable")
        return np.asarray([pairs[j][0] for j in order], dtype=np.int64), sims[order]

    def save(self, path: Path, fingerprint: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with self.lock:
            tmp = path.with_suffix(".tmp")
            self.index.save_index(str(tmp))
            tmp.replace(path)
            path.with_suffix(".json").write_text(json.dumps(
                {"fingerprint": fingerprint, "dim": self.dim, "version": 2,
                 "next_label": self.next_label,
                 "labels": sorted([i, lab] for i, lab in self.label_of.items())}))

    @classmethod
    def load(cls, path: Path, fingerprint: str, dim: int,
             params: HnswParams = HnswParams()) -> "VectorIndex | None":
        """The saved index if its manifest matches ``fingerprint`` (the SQL state), else None."""
        try:
            manifest = json.loads(path.with_suffix(".json").read_text())
        except (OSError, ValueError):
            return None
        if manifest.get("fingerprint") != fingerprint or manifest.get("dim") != dim \
                or manifest.get("version") != 2:
            return None  # an older manifest (labels were entry ids): rebuilt from SQL
        idx = cls(dim, params=params)
        try:
            idx.index.load_index(str(path), allow_replace_deleted=True)
        except RuntimeError:
            return None
        idx.label_of = {int(i): int(lab) for i, lab in manifest["labels"]}
        idx.id_of = {lab: i for i, lab in idx.label_of.items()}
        idx.next_label = int(manifest["next_label"])
        return idx
