"""Correctness of the serving engine's GPU path, checked on the GPU (tests run on CPU):

* the paged split-K decode kernel against the torch reference, real head shapes, ragged
  lengths, random block tables, bf16 (max abs error);
* batched decoding in the serving engine (CUDA graphs on, and off) against each request
  decoded alone by the contiguous batch-1 loop (``stream_from_kv``), for full prefill and
  CacheBlend prompts: greedy tokens identical up to the first bf16 near-tie, reported as the
  share of identical tokens and of requests identical throughout;
* graph replays against the eager decode forward: identical tokens.

    python benchmarks/serving_checks.py --model random:qwen2.5-0.5b
"""

from __future__ import annotations

import argparse
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import environment, print_table, write_json  # noqa: E402
from benchmarks.serving import rag_prompts, segments  # noqa: E402


def kernel_checks() -> list[dict]:
    from ctxcache.kernels.reference import paged_decode_attention_ref
    from ctxcache.kernels.triton_paged import paged_decode_attention

    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for hq, hkv, d, bsz, bs in ((14, 2, 64, 1, 16), (14, 2, 64, 33, 16), (32, 8, 128, 8, 16),
                                (32, 8, 128, 64, 32), (9, 3, 64, 5, 16)):
        lens = [int(x) for x in torch.randint(1, 5000, (bsz,), generator=g)]
        lens[0] = 1
        nb = sum(-(-n // bs) for n in lens) + 8
        K = torch.randn(hkv, nb * bs, d, generator=g).to("cuda", torch.bfloat16)
        V = torch.randn(hkv, nb * bs, d, generator=g).to("cuda", torch.bfloat16)
        perm = (torch.randperm(nb - 1, generator=g) + 1).tolist()
        width = max(-(-n // bs) for n in lens)
        tables = torch.zeros(bsz, width, dtype=torch.int32)
        at = 0
        for b, n in enumerate(lens):
            k = -(-n // bs)
            tables[b, :k] = torch.tensor(perm[at:at + k], dtype=torch.int32)
            at += k
        tables = tables.cuda()
        lt = torch.tensor(lens, dtype=torch.int32, device="cuda")
        q = torch.randn(bsz, hq, d, generator=g).to("cuda", torch.bfloat16)
        ref = paged_decode_attention_ref(q, K, V, tables, lt, bs, d ** -0.5).float()
        err = (paged_decode_attention(q, K, V, tables, lt, bs, d ** -0.5).float() - ref).abs()
        rows.append({"check": f"paged kernel Hq{hq}/Hkv{hkv} D{d} B{bsz} page{bs}",
                     "max_abs_err": float(err.max()), "ok": bool(err.max() < 2e-2)})
    return rows


def tokens_alone(engine, planner, ctx, p, strategy, n) -> list[int]:
    from ctxcache.engine import SamplingParams
    from ctxcache.engine.generate import stream_from_kv

    res = planner.run(ctx, segments(p), strategy)
    return [c.token_id for c in stream_from_kv(engine, res.kv, res.logits,
                                               SamplingParams(max_tokens=n, ignore_eos=True),
                                               context_group=res.context_group)
            if c.token_id is not None]


def tokens_batched(se, planner, ctx, prompts, strategy, n) -> list[list[int]]:
    from ctxcache.engine import SamplingParams
    from ctxcache.engine.scheduler import EngineRequest

    hs = []
    for p in prompts:
        segs = segments(p)
        hs.append(se.submit(EngineRequest(lambda segs=segs: planner.run(ctx, segs, strategy),
                                          SamplingParams(max_tokens=n, ignore_eos=True),
                                          sum(len(s.token_ids) for s in segs),
                                          len(p["system"]))))
    return [[c.token_id for c in h if c.token_id is not None] for h in hs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="random:qwen2.5-0.5b")
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from ctxcache.engine import Engine
    from ctxcache.engine.scheduler import ServingEngine
    from ctxcache.fusion import FusionContext, Planner, default_strategies
    from ctxcache.kv import KVStore, MemoryTier

    rows = kernel_checks()
    engine = Engine.load(args.model, device="cuda", dtype="bf16")
    store = KVStore([MemoryTier(8 << 30, "cuda")], eviction="lru")
    ctx = FusionContext(engine, store, "checks")
    planner = Planner(default_strategies(), default="cacheblend", sample_rate=0.0)
    random.seed(0)
    prompts = rag_prompts(engine.spec.vocab_size, args.requests, seed=5, chunk=256)
    results = {}
    for graphs in (True, False):
        se = ServingEngine(engine, max_running=16, kv_bytes=4 << 30, cuda_graphs=graphs).start()
        for strategy in ("full", "cacheblend", "ape"):
            tokens_batched(se, planner, ctx, prompts, strategy, 1)  # chunk caches warm
            batched = tokens_batched(se, planner, ctx, prompts, strategy, args.tokens)
            alone = [tokens_alone(engine, planner, ctx, p, strategy, args.tokens)
                     for p in prompts]
            same_tok = sum(a == b for x, y in zip(batched, alone) for a, b in zip(x, y))
            total = sum(len(x) for x in alone)
            same_req = sum(x == y for x, y in zip(batched, alone))
            results[(graphs, strategy)] = batched
            rows.append({"check": f"batched vs batch-1, {strategy}, graphs {'on' if graphs else 'off'}",
                         "identical_tokens": f"{same_tok}/{total}",
                         "identical_requests": f"{same_req}/{len(prompts)}",
                         "ok": same_tok / total >= 0.9})
        se.close()
    for strategy in ("full", "cacheblend"):
        a, b = results[(True, strategy)], results[(False, strategy)]
        rows.append({"check": f"graph replay vs eager decode, {strategy}",
                     "identical_requests": f"{sum(x == y for x, y in zip(a, b))}/{len(a)}",
                     "ok": a == b})
    print_table("serving engine GPU checks", ["check", "result", "ok"],
                [[r["check"], r.get("max_abs_err", r.get("identical_tokens", "")) if
                  "max_abs_err" in r else f"{r.get('identical_tokens', '')} "
                  f"{r.get('identical_requests', '')}", r["ok"]] for r in rows])
    name = args.model.split(":")[-1]
    write_json(f"serving_checks_{name}", {"model": name, "rows": rows,
                                          "environment": environment("cuda")}, args.out)


if __name__ == "__main__":
    main()
