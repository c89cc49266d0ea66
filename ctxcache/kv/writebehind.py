"""Write-behind puts: chunk caches built while serving are stored off the request's path."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Sequence

import torch
from torch import Tensor

from ctxcache.engine.kvcache import KVCache
from ctxcache.kv.keys import PUBLIC_NAMESPACE, check_namespace


class WriteBehind:
    """Mixed into ``KVStore`` (uses its ``put``, writer thread, lock and pending map)."""

    def put_later(self, kv: KVCache, token_ids: Sequence[int] | Tensor, *, model: str,
                  namespace: str = "default", public: bool = False, **kw) -> Future:
        """``put`` off the request's critical path (write-behind).

        The K/V is snapshotted first (the caller may reuse its buffers); lookups of the same key
        wait for the write, so the store stays read-your-writes consistent.
        """
        check_namespace(namespace)
        ids = torch.as_tensor(token_ids if not torch.is_tensor(token_ids) else token_ids.cpu(),
                              dtype=torch.int64).reshape(-1)
        key = self.key_for(model, ids, kw.get("prefix_key"))
        skey = f"{PUBLIC_NAMESPACE if public else namespace}/{key}"
        snap = kv.clone()
        ready = None
        if snap.k.is_cuda:  # the writer copies on its own stream once the snapshot exists
            ready = torch.cuda.Event()
            ready.record()

        def run():
            try:
                if ready is None:
                    return self.put(snap, ids, model=model, namespace=namespace, public=public,
                                    **kw)
                stream = self._write_stream(snap.k.device)
                with torch.cuda.stream(stream):
                    stream.wait_event(ready)
                    key = self.put(snap, ids, model=model, namespace=namespace, public=public,
                                   **kw)
                    stream.synchronize()  # visible to readers only once fully copied
                return key
            finally:
                with self._lock:
                    if self._pending.get(skey) is fut:
                        del self._pending[skey]

        with self._lock:
            fut = self._writer.submit(run)
            self._pending[skey] = fut
        return fut

    def _write_stream(self, device) -> "torch.cuda.Stream":
        """The write-behind thread's CUDA stream: its device→host copies overlap the compute
        of the next request instead of queueing behind it on the compute stream."""
        s = getattr(self, "_wstream", None)
        if s is None:
            s = self._wstream = torch.cuda.Stream(device=device)
        return s

    def flush(self) -> None:
        """Wait for every write-behind put."""
        for fut in list(self._pending.values()):
            fut.result()
