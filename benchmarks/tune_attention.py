"""Sweep tile configurations of the selective-attention kernel on the GPU, for the head shapes
of Qwen2.5-0.5B (14 query / 2 K/V heads, dim 64) and Llama-3-8B (32 / 8, dim 128), in the
regimes the reuse path runs: a 15 % gathered query set, and all queries (layer 0, causal).

    python benchmarks/tune_attention.py [OUT_DIR]
"""

from __future__ import annotations

import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton.testing  # noqa: E402

from benchmarks.common import print_table, write_json  # noqa: E402
from benchmarks.kernels_gpu import attention_inputs  # noqa: E402
from ctxcache.kernels import triton_ops as t  # noqa: E402
from ctxcache.kernels.reference import selective_attention_ref  # noqa: E402

SHAPES = {"qwen2.5-0.5b": (14, 2, 64), "llama-3-8b": (32, 8, 128)}


def main() -> None:
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for (name, (Hq, H, D)), (T, r) in itertools.product(
            SHAPES.items(), ((8192, 0.15), (16384, 0.15), (8192, 1.0))):
        q, k, v, qp, kp = attention_inputs(T, r, g, Hq, H, D, dev)
        sub = slice(0, 2 * (Hq // H))
        ref = selective_attention_ref(q[sub], k[:2], v[:2], qp, kp, D ** -0.5).float()
        flops = 4 * D * Hq * float((qp + 1).sum())
        for bm, bn, w, st in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)):
            if bm == 128 and w == 4 and D == 128:
                continue  # spills
            t.ATTN_CONFIGS[D] = {"block_m": bm, "block_n": bn, "num_warps": w, "num_stages": st}
            try:
                plan = t.attention_plan(qp, kp, D, True, Hq // H)
                out = t.selective_attention(q, k, v, qp, kp, D ** -0.5, plan=plan)
                err = (out[sub].float() - ref).abs().max().item()
                ms = triton.testing.do_bench(
                    lambda: t.selective_attention(q, k, v, qp, kp, D ** -0.5, plan=plan),
                    warmup=5, rep=40, return_mode="median")
            except Exception as e:  # noqa: BLE001 - configs that do not fit are skipped
                ms, err = float("inf"), str(e)[:40]
            rows.append({"shape": name, "T": T, "r": r, "block_m": bm, "block_n": bn,
                         "warps": w, "stages": st, "ms": ms,
                         "TFLOPs": flops / (ms / 1e3) / 1e12 if ms != float("inf") else 0,
                         "err": err})
        q = k = v = None  # free before the next shape
        torch.cuda.empty_cache()
    best = {}
    for row in rows:
        key = (row["shape"], row["T"], row["r"])
        if isinstance(row["err"], float) and row["err"] < 0.05 and (
                key not in best or row["ms"] < best[key]["ms"]):
            best[key] = row
    print_table("best tile per shape", ["shape", "T", "r", "block_m", "block_n", "warps",
                                        "stages", "ms", "TFLOP/s", "max err"],
                [[b["shape"], b["T"], b["r"], b["block_m"], b["block_n"], b["warps"],
                  b["stages"], b["ms"], b["TFLOPs"], b["err"]] for b in best.values()])
    # one configuration per head dim: the best total time over that shape's regimes
    totals: dict = {}
    for row in rows:
        if not isinstance(row["err"], float) or row["err"] >= 0.05:
            continue
        k = (row["shape"], row["block_m"], row["block_n"], row["warps"], row["stages"])
        totals[k] = totals.get(k, 0.0) + row["ms"]
    chosen = {}
    for (shape, bm, bn, w, st), total in totals.items():
        if shape not in chosen or total < chosen[shape][1]:
            chosen[shape] = ((bm, bn, w, st), total)
    print_table("chosen per head shape (sum over regimes)", ["shape", "config", "total ms"],
                [[s, c, tot] for s, (c, tot) in chosen.items()])
    write_json("tune_attention", {"rows": rows, "chosen": {s: c for s, (c, _) in chosen.items()}},
               sys.argv[1] if len(sys.argv) > 1 else None)


if __name__ == "__main__":
    main()
