"""Where the time to first token goes (GPU): wall time vs GPU busy time, launches, host syncs
and per-phase time of every reuse strategy, from torch.profiler.

A strategy whose wall time is far above its GPU busy time is bound by host overhead (Python,
launches, synchronisations), not by the work it does. Phases come from the strategies' own
``Timer`` ranges (lookup, assembly, selection, layer loop, first token).

    python benchmarks/profile_ttft.py --model random:qwen2.5-0.5b --contexts 8192
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from benchmarks.common import environment, print_table, write_json  # noqa: E402
from benchmarks.ttft import make_prompt  # noqa: E402
from ctxcache.engine import Engine  # noqa: E402
from ctxcache.fusion import FusionContext, make_strategy  # noqa: E402
from ctxcache.kv import KVStore, MemoryTier  # noqa: E402

SYNC_OPS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize",
            "cudaEventSynchronize")
VARIANTS = {"full": ("full", {}), "naive": ("naive", {}),
            "cacheblend 15%": ("cacheblend", {"recompute_ratio": 0.15}),
            "cacheblend 5%": ("cacheblend", {"recompute_ratio": 0.05}),
            "cachecraft 15%": ("cachecraft", {"base_ratio": 0.15}), "ape": ("ape", {})}


def profile_one(fn) -> dict:
    """GPU busy time (union of device activity intervals), kernel launches, host syncs, the
    CPU ops that cost most and the device kernels that cost most, for one call of ``fn``."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    spans, kernels, syncs, cpu_ops, gpu_ops = [], 0, 0, {}, {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            spans.append((e.time_range.start, e.time_range.end))
            kernels += 1
        elif e.name in SYNC_OPS:
            syncs += 1
    busy, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if a > end:
            busy += b - a
            end = b
        elif b > end:
            busy += b - end
            end = b
    for ka in prof.key_averages():
        if ka.device_type == torch.autograd.DeviceType.CUDA:
            gpu_ops[ka.key] = ka.self_device_time_total / 1e3
        else:
            cpu_ops[ka.key] = ka.self_cpu_time_total / 1e3
    top = sorted(cpu_ops.items(), key=lambda kv: -kv[1])[:12]
    top_gpu = sorted(gpu_ops.items(), key=lambda kv: -kv[1])[:12]
    return {"gpu_busy_ms": busy / 1e3, "kernels": kernels, "host_syncs": syncs,
            "top_cpu_ops_ms": top, "top_gpu_kernels_ms": top_gpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="random:qwen2.5-0.5b")
    ap.add_argument("--contexts", default="8192")
    ap.add_argument("--strategies", default=",".join(VARIANTS))
    ap.add_argument("--repeat", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    engine = Engine.load(args.model, device="cuda", dtype="bf16", kernels="triton")
    rows = []
    for n in [int(x) for x in args.contexts.split(",")]:
        segs = make_prompt(n, n, engine.spec.vocab_size, (args.chunk, args.chunk))
        ctx = FusionContext(engine, KVStore([MemoryTier(60 << 30, "cuda")], eviction="lru"))
        for label in args.strategies.split(","):
            name, params = VARIANTS[label]
            strat = make_strategy(name, **params)

            def run():
                strat.build(ctx, segs).logits.argmax().item()

            for _ in range(4):  # builds chunk caches, compiles kernels, cachecraft learns
                run()
            ts = []
            for _ in range(args.repeat):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                run()
                torch.cuda.synchronize()
                ts.append(time.perf_counter() - t0)
            prof = profile_one(run)
            sctx = FusionContext(engine, ctx.store, sync_phases=True)
            phases = [strat.build(sctx, segs).stats.phases for _ in range(3)]
            prof["phases_ms"] = {k: statistics.median(p[k] for p in phases) * 1e3
                                 for k in phases[0]}
            row = {"model": engine.name, "context": n, "strategy": label,
                   "wall_ms": statistics.median(ts) * 1e3, **prof}
            rows.append(row)
            print(f"{n} {label}: wall {row['wall_ms']:.1f} ms, GPU busy {row['gpu_busy_ms']:.1f} "
                  f"ms, {row['kernels']} kernels, {row['host_syncs']} syncs, phases "
                  f"{ {k: round(v, 2) for k, v in row['phases_ms'].items()} }", flush=True)
            print("   top CPU ops:", [(k, round(v, 2)) for k, v in row["top_cpu_ops_ms"][:6]])
            print("   top GPU kernels:", [(k[:40], round(v, 2))
                                          for k, v in row["top_gpu_kernels_ms"][:6]])
        ctx.store.close()
    print_table(f"TTFT profile — {args.model} bf16, {torch.cuda.get_device_name()}",
                ["context", "strategy", "wall ms", "GPU busy ms", "busy share", "kernels",
                 "host syncs"],
                [[r["context"], r["strategy"], r["wall_ms"], r["gpu_busy_ms"],
                  r["gpu_busy_ms"] / r["wall_ms"], r["kernels"], r["host_syncs"]] for r in rows])
    tag = args.model.split(":")[-1].replace("/", "_")
    write_json(f"profile_ttft_{tag}", {"benchmark": "profile_ttft", "model": engine.name,
                                       "env": environment("cuda"), "rows": rows}, args.out)


if __name__ == "__main__":
    main()
