"""Which chunk cache to drop when a tier is full, and which to store at all.

* ``LRUPolicy`` — the baseline.
* ``GDSFPolicy`` — Greedy-Dual-Size-Frequency: priority = clock + frequency × cost / size, where
  cost is the compute a hit saves (prefill FLOPs of the chunk). It keeps what saves the most
  compute per byte, and the clock (the priority of the last victim) ages out entries that were
  valuable once but are no longer used — the value-aware policy of Marconi / Cache-Craft.
* ``AdmissionPolicy`` — do not store chunks unlikely to be reused: too short, or not requested
  at least ``min_requests`` times (a "doorkeeper"; 1 = admit on first sight).
"""

from __future__ import annotations

import heapq
import itertools
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass, field

from ctxcache.errors import InvalidInputError


class EvictionPolicy(ABC):
    @abstractmethod
    def insert(self, key: str, size: int, cost: float) -> None: ...

    @abstractmethod
    def touch(self, key: str) -> None: ...

    @abstractmethod
    def remove(self, key: str) -> None: ...

    @abstractmethod
    def victim(self) -> str | None:
        """The key to evict next (not removed: the store calls ``remove`` once it is gone)."""

    def reuse_hint(self, key: str, cost: float) -> None:
        """Raise a key's value when a strategy reports it saved ``cost`` (no-op for LRU)."""


class LRUPolicy(EvictionPolicy):
    def __init__(self) -> None:
        self._order: OrderedDict[str, None] = OrderedDict()

    def insert(self, key: str, size: int, cost: float) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key: str) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: str) -> None:
        self._order.pop(key, None)

    def victim(self) -> str | None:
        return next(iter(self._order), None)


@dataclass
class _GDSFItem:
    size: int
    cost: float
    freq: float = 1.0
    priority: float = 0.0


class GDSFPolicy(EvictionPolicy):
    def __init__(self) -> None:
        self.clock = 0.0
        self._items: dict[str, _GDSFItem] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._tick = itertools.count()

    def _push(self, key: str) -> None:
        it = self._items[key]
        it.priority = self.clock + it.freq * it.cost / max(it.size, 1)
        heapq.heappush(self._heap, (it.priority, next(self._tick), key))

    def insert(self, key: str, size: int, cost: float) -> None:
        old = self._items.get(key)
        self._items[key] = _GDSFItem(size, max(float(cost), 0.0), old.freq if old else 1.0)
        self._push(key)

    def touch(self, key: str) -> None:
        if key in self._items:
            self._items[key].freq += 1
            self._push(key)

    def reuse_hint(self, key: str, cost: float) -> None:
        if key in self._items:
            self._items[key].freq += max(cost, 0.0) / max(self._items[key].cost, 1e-9)
            self._push(key)

    def remove(self, key: str) -> None:
        it = self._items.pop(key, None)
        if it is not None:
            self.clock = max(self.clock, it.priority)  # aging: later entries start higher
        if len(self._heap) > 4 * len(self._items) + 64:  # drop stale heap records
            self._heap = [(p, t, k) for p, t, k in self._heap
                          if k in self._items and self._items[k].priority == p]
            heapq.heapify(self._heap)

    def victim(self) -> str | None:
        while self._heap:
            p, _, k = self._heap[0]
            it = self._items.get(k)
            if it is not None and it.priority == p:
                return k
            heapq.heappop(self._heap)
        return None

    def priority(self, key: str) -> float | None:
        it = self._items.get(key)
        return it.priority if it else None


POLICIES = {"lru": LRUPolicy, "gdsf": GDSFPolicy}


def make_policy(name: str) -> EvictionPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise InvalidInputError(f"unknown eviction policy {name!r}; use {sorted(POLICIES)}") from None


@dataclass
class AdmissionPolicy:
    min_tokens: int = 1
    min_requests: int = 1
    max_tracked: int = 100_000
    _seen: OrderedDict = field(default_factory=OrderedDict, repr=False)

    def __post_init__(self) -> None:
        if self.min_tokens < 1 or self.min_requests < 1:
            raise InvalidInputError("admission minimums must be >= 1")

    def admit(self, key: str, num_tokens: int) -> bool:
        n = self._seen.pop(key, 0) + 1
        self._seen[key] = n
        if len(self._seen) > self.max_tracked:
            self._seen.popitem(last=False)
        return num_tokens >= self.min_tokens and n >= self.min_requests
