"""Profile one warm TTFT of naive and CacheBlend at 8K (GPU): where the time goes.

    python benchmarks/profile_ttft.py [OUT_DIR]
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from benchmarks.ttft import make_prompt  # noqa: E402
from ctxcache.engine import Engine  # noqa: E402
from ctxcache.fusion import CacheBlend, FusionContext, NaiveReuse  # noqa: E402
from ctxcache.kv import KVStore, MemoryTier  # noqa: E402


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else "."
    engine = Engine.load("random:llama-3-8b", device="cuda", dtype="bf16", kernels="triton")
    segs = make_prompt(8192, 8192, engine.spec.vocab_size)
    ctx = FusionContext(engine, KVStore([MemoryTier(40 << 30, "cuda")]))
    for name, strat in (("naive", NaiveReuse()), ("cacheblend15", CacheBlend(0.15))):
        for _ in range(3):
            strat.build(ctx, segs).logits.argmax().item()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = strat.build(ctx, segs)
        r.logits.argmax().item()
        wall = time.perf_counter() - t0
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            strat.build(ctx, segs).logits.argmax().item()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        cuda_table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15)
        print(f"== {name}: wall {wall * 1e3:.1f} ms, phases {r.stats.phases}")
        print(table)
        print(cuda_table)
        with open(os.path.join(out, f"profile_{name}.txt"), "w") as f:
            f.write(f"wall {wall * 1e3:.1f} ms phases {r.stats.phases}\n{table}\n{cuda_table}\n")


if __name__ == "__main__":
    main()
