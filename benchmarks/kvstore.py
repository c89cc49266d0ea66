"""Chunk KV store throughput per tier vs raw copy bandwidth, and codec size/error.

Default: an 8K-token KV in the Llama-3-8B shape (32 layers × 8 KV heads × 128 dims, bf16 →
128 KiB/token, 1 GiB in all). Each tier's put/get is timed side by side with the raw operation
on the same machine (memcpy for memory, plain write+fsync/read for disk, SET/GET of the same
bytes for Redis) and reported as a ratio. With ``--device cuda`` the CPU tier is page-locked and
the load CPU-pinned → GPU through ``KVStore.get(device="cuda")`` is compared with a plain pinned
``tensor.to("cuda")`` of the same bytes.

Codecs are measured on the real SmolLM2 K/V of a real passage (``--codec-model``): compression
ratio, relative reconstruction error, and KL of the next-token distribution vs the raw KV.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import environment, print_table, sync, timeit, write_json  # noqa: E402
from ctxcache.engine import KVCache  # noqa: E402
from ctxcache.kv import DiskTier, KVStore, MemoryTier, RedisTier, get_codec  # noqa: E402
from ctxcache.kv.entry import EntryMeta, StoredEntry  # noqa: E402
from ctxcache.kv.serialize import pack  # noqa: E402

GiB = 1 << 30


def make_kv(tokens: int, layers: int, heads: int, dim: int) -> KVCache:
    g = torch.Generator().manual_seed(0)
    k = torch.randn(layers, heads, tokens, dim, generator=g, dtype=torch.float32).to(torch.bfloat16)
    v = torch.randn(layers, heads, tokens, dim, generator=g, dtype=torch.float32).to(torch.bfloat16)
    return KVCache(k, v, torch.arange(tokens))


def bench_tiers(kv: KVCache, repeat: int, device: str, redis_url: str | None) -> list[dict]:
    ids = list(range(kv.num_tokens))
    nbytes = kv.k.numel() * kv.k.element_size() * 2
    rows = []

    def row(tier: str, op: str, t_store: float, t_raw: float, raw_name: str) -> None:
        rows.append({"tier": tier, "op": op, "store_s": t_store, "raw_s": t_raw, "raw": raw_name,
                     "store_GBps": nbytes / t_store / 1e9, "raw_GBps": nbytes / t_raw / 1e9,
                     "store_over_raw_time": t_store / t_raw})

    def compare(name, store, raw_put, raw_put_name, raw_get, raw_get_name) -> None:
        """A persistent tier's put (fresh key each time) and get vs the raw operations."""
        key = store.key_for("m", ids)

        def put():
            store.delete(key)
            store.put(kv, ids, model="m")

        row(name, "put", timeit(put, "cpu", repeat)["median_s"],
            timeit(raw_put, "cpu", repeat)["median_s"], raw_put_name)
        row(name, "get", timeit(lambda: store.get(key), "cpu", repeat)["median_s"],
            timeit(raw_get, "cpu", repeat)["median_s"], raw_get_name)

    # --- CPU memory tier (pinned when CUDA is present)
    pin = device == "cuda"
    store = KVStore([MemoryTier(4 * GiB, "cpu", pin=pin)], admission=None)
    flat = torch.cat([kv.k.reshape(-1), kv.v.reshape(-1)])
    dst = torch.empty_like(flat)
    raw_copy = timeit(lambda: dst.copy_(flat), "cpu", repeat)["median_s"]
    raw_clone = timeit(lambda: flat.clone(), "cpu", repeat)["median_s"]

    def put_cpu():
        store.delete(store.key_for("m", ids))
        store.put(kv, ids, model="m")

    # a put must own its copy (fresh memory): compare with an allocating copy
    row("cpu", "put", timeit(put_cpu, "cpu", repeat)["median_s"],
        raw_clone if not pin else timeit(lambda: flat.pin_memory(), "cpu", repeat)["median_s"],
        "alloc+copy" if not pin else "pin_memory()")
    key = store.key_for("m", ids)
    # a get hands out the cached tensors (read-only); assembling a prompt copies them once
    kdst, vdst = torch.empty_like(kv.k), torch.empty_like(kv.v)

    def get_into():
        e = store.get(key)
        kdst.copy_(e.kv.k)
        vdst.copy_(e.kv.v)

    row("cpu", "get+copy", timeit(get_into, "cpu", repeat)["median_s"], raw_copy, "memcpy")
    if device == "cuda":
        pinned = flat.pin_memory()
        raw_h2d = timeit(lambda: pinned.to("cuda", non_blocking=True), "cuda", repeat)["median_s"]
        t = timeit(lambda: store.get(key, device="cuda"), "cuda", repeat)["median_s"]
        row("cpu-pinned→gpu", "get", t, raw_h2d, "pinned .to(cuda)")
        gstore = KVStore([MemoryTier(4 * GiB, "cuda")])
        gstore.put(kv, ids, model="m")
        gkey = gstore.key_for("m", ids)
        gflat = flat.to("cuda")
        gdst = torch.empty_like(gflat)
        raw_d2d = timeit(lambda: gdst.copy_(gflat), "cuda", repeat)["median_s"]
        gk, gv = torch.empty_like(kv.k, device="cuda"), torch.empty_like(kv.v, device="cuda")

        def gget_into():
            e = gstore.get(gkey)
            gk.copy_(e.kv.k)
            gv.copy_(e.kv.v)

        row("gpu", "get+copy", timeit(gget_into, "cuda", repeat)["median_s"], raw_d2d, "d2d copy")
    store.close()

    # --- disk tier vs plain file write+fsync / read of the same bytes
    with tempfile.TemporaryDirectory() as tmp:
        dstore = KVStore([DiskTier(os.path.join(tmp, "kv"), 64 * GiB)])
        payload = pack(StoredEntry.encode(
            EntryMeta("0" * 32, "default", "m", kv.num_tokens, "bfloat16", "raw", 1.0), kv,
            torch.tensor(ids)))
        raw_path = os.path.join(tmp, "raw.bin")

        def raw_write():
            with open(raw_path, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())

        def raw_read():
            with open(raw_path, "rb") as f:
                f.read()

        compare("disk", dstore, raw_write, "write+fsync", raw_read, "read (page cache)")
        dstore.close()

    # --- Redis tier vs SET/GET of the same bytes in the same part size
    if redis_url:
        prefix = f"ctxcache-bench:{uuid.uuid4().hex}"
        tier = RedisTier(redis_url, 64 * GiB, prefix=prefix)
        try:
            tier.client.ping()
        except Exception as e:  # noqa: BLE001
            print(f"redis not reachable ({e}); skipping the redis tier")
            return rows
        rstore = KVStore([tier])
        part = tier.part_bytes
        parts = [payload[i:i + part] for i in range(0, len(payload), part)]

        def raw_set():
            pipe = tier.client.pipeline(transaction=False)
            for i, p in enumerate(parts):
                pipe.set(f"{prefix}:raw:{i}", p)
            pipe.execute()

        def raw_get():
            tier.client.mget([f"{prefix}:raw:{i}" for i in range(len(parts))])

        compare("redis", rstore, raw_set, "SET parts", raw_get, "MGET parts")
        tier.clear()
    return rows


def bench_codecs(model: str) -> list[dict]:
    from ctxcache.engine import Engine

    engine = Engine.load(model)
    text = ("The Amazon rainforest covers much of the Amazon basin of South America. "
            "The basin covers seven million square kilometres, of which five and a half million "
            "are covered by the rainforest. This region includes territory belonging to nine "
            "nations. The majority of the forest is contained within Brazil, with 60% of the "
            "rainforest, followed by Peru with 13%, Colombia with 10%, and with minor amounts in "
            "Venezuela, Ecuador, Bolivia, Guyana, Suriname and French Guiana. Question: which "
            "country holds most of the forest? Answer:")
    ids = engine.encode(text)
    pre = engine.prefill(ids[:-1])
    ref = torch.log_softmax(engine.prefill(ids[-1:], kv=pre.kv).logits[-1], -1)
    rows = []
    raw_bytes = None
    for name in ("raw", "int8", "int4"):
        c = get_codec(name)
        kv16 = pre.kv.to(dtype=torch.bfloat16)  # sizes as a bf16 deployment stores them
        enc = c.encode(kv16.k, kv16.v)
        size = sum(t.numel() * t.element_size() for t in enc.values())
        raw_bytes = raw_bytes or size
        enc32 = c.encode(pre.kv.k, pre.kv.v)
        k, v = c.decode(enc32, pre.kv.k.dtype)
        rel_k = ((k - pre.kv.k).norm() / pre.kv.k.norm()).item()
        rel_v = ((v - pre.kv.v).norm() / pre.kv.v.norm()).item()
        lp = torch.log_softmax(
            engine.prefill(ids[-1:], kv=KVCache(k, v, pre.kv.positions)).logits[-1], -1)
        kl = torch.sum(ref.exp() * (ref - lp)).item()
        rows.append({"codec": name, "bytes": size, "compression": raw_bytes / size,
                     "rel_err_k": rel_k, "rel_err_v": rel_v, "next_token_kl": kl,
                     "same_argmax": bool(lp.argmax() == ref.argmax()), "tokens": len(ids) - 1})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--no-redis", action="store_true")
    ap.add_argument("--codec-model", default="smollm2-135m-instruct",
                    help="model whose real K/V the codecs are measured on ('' to skip)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--name", default=None)
    args = ap.parse_args()

    kv = make_kv(args.tokens, args.layers, args.kv_heads, args.head_dim)
    nbytes = kv.k.numel() * kv.k.element_size() * 2
    print(f"KV: {args.tokens} tokens, {nbytes / args.tokens / 1024:.0f} KiB/token, "
          f"{nbytes / GiB:.2f} GiB")
    t0 = time.perf_counter()
    rows = bench_tiers(kv, args.repeat, args.device, None if args.no_redis else args.redis_url)
    print_table(f"tiers ({args.tokens} tokens, {nbytes / GiB:.2f} GiB)",
                ["tier", "op", "store ms", "raw ms", "raw op", "store GB/s", "raw GB/s",
                 "store/raw time"],
                [[r["tier"], r["op"], r["store_s"] * 1e3, r["raw_s"] * 1e3, r["raw"],
                  r["store_GBps"], r["raw_GBps"], r["store_over_raw_time"]] for r in rows])
    codecs = bench_codecs(args.codec_model) if args.codec_model else []
    if codecs:
        print_table("codecs (real K/V of SmolLM2 on a real passage)",
                    ["codec", "bytes", "compression", "rel err K", "rel err V", "next-token KL",
                     "same argmax"],
                    [[c["codec"], c["bytes"], c["compression"], c["rel_err_k"], c["rel_err_v"],
                      c["next_token_kl"], c["same_argmax"]] for c in codecs])
    name = args.name or f"kvstore_{args.device}"
    write_json(name, {"benchmark": "kvstore", "tokens": args.tokens, "kv_bytes": nbytes,
                      "env": environment(args.device), "tiers": rows, "codecs": codecs,
                      "wall_s": time.perf_counter() - t0}, args.out)
    sync(args.device)


if __name__ == "__main__":
    main()
