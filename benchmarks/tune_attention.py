"""Sweep tile configurations of the selective-attention kernel on the GPU (Llama-3-8B heads).

    python benchmarks/tune_attention.py [OUT_DIR]
"""

from __future__ import annotations

import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import print_table, write_json  # noqa: E402
from benchmarks.kernels_gpu import attention_inputs  # noqa: E402
from ctxcache.kernels import triton_ops as t  # noqa: E402
from ctxcache.kernels.reference import selective_attention_ref  # noqa: E402


def main() -> None:
    dev, Hq, H, D = "cuda", 32, 8, 128
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for T, r in ((8192, 0.15), (16384, 0.15), (8192, 0.05)):
        q, k, v, qp, kp = attention_inputs(T, r, g, Hq, H, D, dev)
        ref = selective_attention_ref(q[:4], k[:1], v[:1], qp, kp, D ** -0.5).float()
        for bm, bn, w, st in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)):
            t.ATTN_CONFIG.update(block_m=bm, block_n=bn, num_warps=w, num_stages=st)
            try:
                plan = t.attention_plan(qp, kp, D, True, Hq // H)
                out = t.selective_attention(q, k, v, qp, kp, D ** -0.5, plan=plan)
                err = (out[:4].float() - ref).abs().max().item()
                for _ in range(3):
                    t.selective_attention(q, k, v, qp, kp, D ** -0.5, plan=plan)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(20):
                    t.selective_attention(q, k, v, qp, kp, D ** -0.5, plan=plan)
                torch.cuda.synchronize()
                ms = (time.perf_counter() - t0) / 20 * 1e3
            except Exception as e:  # noqa: BLE001 - configs that do not fit are skipped
                ms, err = float("inf"), str(e)[:40]
            flops = 4 * D * Hq * float((qp + 1).sum())
            rows.append({"T": T, "r": r, "block_m": bm, "block_n": bn, "warps": w, "stages": st,
                         "ms": ms, "TFLOPs": flops / (ms / 1e3) / 1e12 if ms != float("inf")
                         else 0, "err": err})
    best = {}
    for row in rows:
        key = (row["T"], row["r"])
        if key not in best or row["ms"] < best[key]["ms"]:
            best[key] = row
    print_table("best tile per shape", ["T", "r", "block_m", "block_n", "warps", "stages", "ms",
                                        "TFLOP/s", "max err"],
                [[b["T"], b["r"], b["block_m"], b["block_n"], b["warps"], b["stages"], b["ms"],
                  b["TFLOPs"], b["err"]] for b in best.values()])
    default = [r for r in rows if (r["block_m"], r["block_n"], r["warps"], r["stages"]) ==
               (64, 64, 4, 3)]
    print_table("current default (64, 64, 4 warps, 3 stages)", ["T", "r", "ms", "TFLOP/s"],
                [[d["T"], d["r"], d["ms"], d["TFLOPs"]] for d in default])
    write_json("tune_attention", {"rows": rows}, sys.argv[1] if len(sys.argv) > 1 else None)


if __name__ == "__main__":
    main()
