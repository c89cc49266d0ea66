"""Time to first token of every reuse strategy vs full prefill (GPU, bf16).

Prompt = system prompt (128 tokens) + retrieved chunks (``--chunk``, default 512–1024 tokens) +
question (32), total 4K / 8K / 16K. Chunk caches are built once (cold run, not timed), then each
strategy is timed warm with the chunk KV either already in GPU memory (``gpu``) or in CPU pinned
memory (``pinned``: the host→GPU load is part of TTFT). TTFT = lookup + assembly + recompute +
first token. ``cacheblend 15% (torch ops)`` is the same selective loop on plain PyTorch (gathered
Q/K/V and MLP, SDPA with a position mask, no custom kernels): the bar our kernels must clear.
Columns are measured side by side in one run; the floor is KV bytes moved / measured copy
bandwidth + FLOPs of the recomputed work / measured bf16 matmul throughput.

``--model`` takes ``random:<shape>`` (e.g. llama-3-8b, qwen2.5-0.5b: timing does not depend on
the weights' values), a packaged model name, a .gguf file or an HF checkpoint directory.

    python benchmarks/ttft.py --model random:llama-3-8b --contexts 4096,8192,16384
    python benchmarks/ttft.py --model qwen2.5-coder-0.5b-instruct --chunk 512
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import environment, print_table, write_json  # noqa: E402
from ctxcache.engine import Engine  # noqa: E402
from ctxcache.engine.flops import prefill_flops  # noqa: E402
from ctxcache.fusion import (  # noqa: E402
    APE, CacheBlend, CacheCraft, FullPrefill, FusionContext, NaiveReuse, Planner, PrefixReuse,
    Segment, default_strategies,
)
from ctxcache.fusion.costmodel import calibrate  # noqa: E402
from ctxcache.fusion.execute import graph_stats  # noqa: E402
from ctxcache.kv import KVStore, MemoryTier  # noqa: E402

GiB = 1 << 30


def sync():
    torch.cuda.synchronize()


def measure_hw() -> dict:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    sync()
    tflops = 10 * 2 * 8192 ** 3 / (time.perf_counter() - t0) / 1e12
    x = torch.empty(GiB // 2, dtype=torch.uint8).pin_memory()
    y = torch.empty(GiB // 2, dtype=torch.uint8, device="cuda")
    y.copy_(x, non_blocking=True)
    sync()
    t0 = time.perf_counter()
    for _ in range(5):
        y.copy_(x, non_blocking=True)
    sync()
    h2d = 5 * x.numel() / (time.perf_counter() - t0) / 1e9
    z = torch.empty_like(y)
    t0 = time.perf_counter()
    for _ in range(10):
        z.copy_(y)
    sync()
    d2d = 10 * 2 * y.numel() / (time.perf_counter() - t0) / 1e9  # read + write
    return {"bf16_tflops": tflops, "h2d_GBps": h2d, "d2d_GBps": d2d}


def make_prompt(total: int, seed: int, vocab: int, chunk: tuple[int, int] = (512, 1024)
                ) -> list[Segment]:
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    sys_len, q_len = 128, 32
    chunks, left = [], total - sys_len - q_len
    while left > 0:
        n = min(left, rng.randint(*chunk))
        if left - n < 128:
            n = left
        chunks.append(n)
        left -= n
    segs = [Segment.prefix(torch.randint(0, vocab, (sys_len,), generator=g).tolist())]
    segs += [Segment.chunk(torch.randint(0, vocab, (n,), generator=g).tolist()) for n in chunks]
    segs.append(Segment.text(torch.randint(0, vocab, (q_len,), generator=g).tolist()))
    return segs


def timed(fn, repeat: int) -> float:
    for _ in range(2):  # cold/warm-up: builds chunk caches, compiles kernels, captures graphs
        fn()
    sync()
    ts = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="random:llama-3-8b")
    ap.add_argument("--contexts", default="4096,8192,16384")
    ap.add_argument("--modes", default="gpu,pinned")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--chunk", default="512-1024", help="chunk length range, e.g. 512 or 512-1024")
    ap.add_argument("--strategies", default=None, help="comma-separated subset of the rows")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    lo, _, hi = args.chunk.partition("-")
    chunk = (int(lo), int(hi or lo))
    hw = measure_hw()
    print(f"hardware: {hw}")
    engine = Engine.load(args.model, device="cuda", dtype="bf16", kernels="triton")
    torch_engine = Engine(engine.loaded, kernels="torch")
    cost_model = None
    if not args.strategies or "default + cost guard" in args.strategies:
        t0 = time.perf_counter()
        cost_model = calibrate(engine, default_strategies())
        print(f"cost model calibrated in {time.perf_counter() - t0:.1f} s: {cost_model.coeffs}")
    spec = engine.spec
    kv_per_tok = spec.kv_bytes_per_token(torch.bfloat16)
    rows = []
    for n in [int(x) for x in args.contexts.split(",")]:
        segs = make_prompt(n, n, spec.vocab_size, chunk)
        ids = [t for s in segs for t in s.token_ids]
        full_flops = prefill_flops(spec, n)
        t_full = timed(lambda: FullPrefill().build(FusionContext(engine, KVStore([MemoryTier(
            1 << 20)])), segs).logits.argmax().item(), args.repeat)

        def hf():
            with torch.inference_mode():
                out = engine.hf(torch.tensor([ids], device="cuda"), use_cache=True,
                                logits_to_keep=1)
                return out.logits[0, -1].argmax().item()

        t_hf = timed(hf, args.repeat)
        for mode in args.modes.split(","):
            tier = MemoryTier(60 * GiB, "cuda") if mode == "gpu" else \
                MemoryTier(100 * GiB, "cpu", pin=True)
            store = KVStore([tier], eviction="lru")
            ctx = FusionContext(engine, store)
            # prefix caching has seen the same documents in another order
            PrefixReuse().build(ctx, [segs[0]] + segs[1:-1][::-1] + [segs[-1]])
            cc = CacheCraft(0.15)
            variants = [("naive", NaiveReuse(), engine),
                        ("cacheblend 5%", CacheBlend(0.05), engine),
                        ("cacheblend 15%", CacheBlend(0.15), engine),
                        ("cacheblend 30%", CacheBlend(0.30), engine),
                        ("cacheblend 15% (torch ops)", CacheBlend(0.15), torch_engine),
                        ("cachecraft 15%", cc, engine), ("ape", APE(), engine),
                        # the default configuration: cacheblend unless predicted slower
                        ("default + cost guard", Planner(default_strategies(),
                                                         sample_rate=0.0,
                                                         cost_model=cost_model), engine),
                        # last: every prefix call stores new entries (pinned allocations)
                        ("prefix", PrefixReuse(), engine)]
            if args.strategies:
                keep = set(args.strategies.split(","))
                variants = [v for v in variants if v[0] in keep]
            rng = random.Random(n)
            for name, strat, eng in variants:
                c = FusionContext(eng, store)
                if name.startswith("cachecraft"):
                    for _ in range(strat.probe_uses):  # first uses learn impact and scores
                        strat.build(c, segs)
                res = {}

                def run():
                    prompt = segs
                    if name == "prefix":  # a retrieval order never seen before: only the
                        mid = segs[1:-1][:]  # system prompt is a prefix hit
                        rng.shuffle(mid)
                        prompt = [segs[0]] + mid + [segs[-1]]
                    r = strat.run(c, prompt) if isinstance(strat, Planner) else strat.build(
                        c, prompt)
                    r.logits.argmax().item()
                    res["r"] = r

                t = timed(run, args.repeat)
                st = res["r"].stats
                loaded = st.reused_tokens * kv_per_tok if mode == "pinned" else 0
                floor = loaded / (hw["h2d_GBps"] * 1e9) + st.flops / (hw["bf16_tflops"] * 1e12)
                rows.append({
                    "context": n, "mode": mode, "strategy": name, "ttft_s": t,
                    "full_ours_s": t_full, "full_hf_s": t_hf, "speedup_vs_full": t_full / t,
                    "speedup_vs_hf": t_hf / t, "compute_fraction": st.flops / full_flops,
                    "floor_s": floor, "fraction_of_floor": floor / t,
                    "reused_tokens": st.reused_tokens,
                    "phases": {k: round(v, 5) for k, v in st.phases.items()},
                    "preselected": st.extra.get("preselected"),
                    "cuda_graph": st.extra.get("cuda_graph"), "served": st.strategy,
                })
                print(f"  {n} {mode} {name}: {t * 1e3:.1f} ms ({t_full / t:.2f}x)", flush=True)
            store.close()
            del store, tier
            torch.cuda.empty_cache()
        rows.append({"context": n, "mode": "-", "strategy": "full prefill (ours)",
                     "ttft_s": t_full, "full_ours_s": t_full, "full_hf_s": t_hf,
                     "speedup_vs_full": 1.0, "speedup_vs_hf": t_hf / t_full,
                     "compute_fraction": 1.0,
                     "floor_s": full_flops / (hw["bf16_tflops"] * 1e12),
                     "fraction_of_floor": full_flops / (hw["bf16_tflops"] * 1e12) / t_full})
        rows.append({"context": n, "mode": "-", "strategy": "full prefill (HF SDPA)",
                     "ttft_s": t_hf, "full_ours_s": t_full, "full_hf_s": t_hf,
                     "speedup_vs_full": t_full / t_hf, "speedup_vs_hf": 1.0,
                     "compute_fraction": 1.0,
                     "floor_s": full_flops / (hw["bf16_tflops"] * 1e12),
                     "fraction_of_floor": full_flops / (hw["bf16_tflops"] * 1e12) / t_hf})
    print_table(f"TTFT — {args.model} bf16, {torch.cuda.get_device_name()}",
                ["context", "KV in", "strategy", "TTFT ms", "× vs full (ours)", "× vs HF",
                 "FLOPs share", "floor ms", "of floor"],
                [[r["context"], r["mode"], r["strategy"], r["ttft_s"] * 1e3,
                  r["speedup_vs_full"], r["speedup_vs_hf"], r["compute_fraction"],
                  r["floor_s"] * 1e3, r["fraction_of_floor"]] for r in rows])
    print(f"graph cache: {graph_stats(engine)}")
    tag = os.path.basename(args.model.split(":")[-1].rstrip("/")).removesuffix(".gguf")
    path = write_json(f"ttft_{tag}", {"benchmark": "ttft", "model": engine.name, "chunk": chunk,
                                      "hardware": hw, "env": environment("cuda"),
                                      "cost_model": cost_model.coeffs if cost_model else None,
                                      "graph_cache": graph_stats(engine), "rows": rows},
                      args.out)
    plot(rows, path.with_suffix(".png"))


def plot(rows, path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(9, 4.5))
    names = [r["strategy"] for r in rows if r["context"] == rows[0]["context"]
             and r["mode"] in ("gpu", "-")]
    ctxs = sorted({r["context"] for r in rows})
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        ys = [next((r["ttft_s"] * 1e3 for r in rows if r["context"] == c and r["strategy"] == name
                    and r["mode"] in ("gpu", "-")), 0) for c in ctxs]
        ax.bar([j + i * width for j in range(len(ctxs))], ys, width, label=name)
    ax.set_xticks([j + 0.4 for j in range(len(ctxs))], [f"{c // 1024}K" for c in ctxs])
    ax.set_ylabel("TTFT (ms), chunk KV in GPU memory")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
