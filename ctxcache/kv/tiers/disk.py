"""Local-disk tier: one checksummed safetensors file per entry.

Writes go to a unique temporary name in the same directory, are fsync'ed, then renamed over the
final name (``os.replace`` is atomic on POSIX): a reader sees the old entry, the new entry, or
none — never half of one, even if the writer is killed. Leftover temporary files from killed
writers are removed when the tier opens. Concurrent writers of one key each rename a complete
file; the last rename wins and both files were identical in content anyway (content keys).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Iterator

from ctxcache.kv.entry import StoredEntry
from ctxcache.kv.serialize import CorruptEntryError, read_from, write_to
from ctxcache.kv.tiers.base import Tier, TierUnavailableError
from ctxcache.paths import contained_path

SUFFIX = ".kv"
TMP_MARK = ".tmp-"


class DiskTier(Tier):
    name = "disk"
    persistent = True

    def __init__(self, root: str | os.PathLike, capacity_bytes: int, fsync: bool = True):
        super().__init__(capacity_bytes)
        self.root = Path(root)
        self.fsync = fsync
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TierUnavailableError(f"disk tier {self.root} unavailable: {e}") from e
        self.cleaned_tmp = self._clean_tmp()

    def _path(self, skey: str) -> Path:
        ns, key = skey.split("/", 1)
        return contained_path(self.root, ns, key[:2], key + SUFFIX)

    def _clean_tmp(self) -> int:
        n = 0
        for p in self.root.rglob(f"*{TMP_MARK}*"):
            try:
                p.unlink()
                n += 1
            except OSError:
                pass
        return n

    def has(self, skey: str) -> bool:
        return self._path(skey).is_file()

    def get(self, skey: str) -> StoredEntry | None:
        path = self._path(skey)
        try:
            return read_from(path)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise TierUnavailableError(f"disk read failed: {e}") from e
        except CorruptEntryError:
            self.delete(skey)
            raise

    def put(self, skey: str, entry: StoredEntry) -> int:
        path = self._path(skey)
        tmp = path.with_name(path.name + TMP_MARK + uuid.uuid4().hex)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                size = write_to(f, entry)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise TierUnavailableError(f"disk write failed: {e}") from e
        return size

    def delete(self, skey: str) -> None:
        try:
            self._path(skey).unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise TierUnavailableError(f"disk delete failed: {e}") from e

    def scan(self) -> Iterator[tuple[str, int]]:
        for p in self.root.glob(f"*/*/*{SUFFIX}"):
            if TMP_MARK in p.name:
                continue
            try:
                size = p.stat().st_size
            except OSError:
                continue
            yield f"{p.parent.parent.name}/{p.name[: -len(SUFFIX)]}", size
