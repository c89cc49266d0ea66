"""Full-size Triton kernel checks on the GPU: correctness vs the torch references, time, and
achieved bandwidth vs the measured HBM copy bandwidth (Llama-3-8B shapes, bf16).

    python benchmarks/kernels_gpu.py
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import environment, print_table, write_json  # noqa: E402
from ctxcache.kernels import get_ops  # noqa: E402
from ctxcache.kernels.reference import (  # noqa: E402
    kv_deviation_ref, rope_shift_ref, selective_attention_ref,
)


def attention_inputs(T: int, r: float, g: torch.Generator, Hq: int = 32, H: int = 8,
                     D: int = 128, dev: str = "cuda"):
    """Llama-3-8B-shaped inputs: ``r·T`` gathered queries (sorted random positions) over T keys."""
    n = int(T * r)
    q = torch.randn(Hq, n, D, device=dev, generator=g, dtype=torch.bfloat16)
    k = torch.randn(H, T, D, device=dev, generator=g, dtype=torch.bfloat16)
    v = torch.randn(H, T, D, device=dev, generator=g, dtype=torch.bfloat16)
    kp = torch.arange(T, device=dev)
    qp = torch.sort(torch.randperm(T, device=dev, generator=g)[:n]).values
    return q, k, v, qp, kp


def bench(fn, repeat=20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat


def main() -> None:
    dev = "cuda"
    ops, tops = get_ops("triton", dev), get_ops("torch", dev)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    hbm = 2 * x.numel() / bench(lambda: y.copy_(x), 10) / 1e9
    x = y = None  # free the GiB buffers
    L, H, Hq, D = 32, 8, 32, 128
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=dev).float() / D))
    rows, checks = [], []
    for T in (4096, 8192, 16384):
        K = torch.randn(L, H, T, D, device=dev, generator=g, dtype=torch.bfloat16)
        delta = torch.randint(0, 20000, (T,), device=dev, generator=g)
        # correctness on one layer (the reference is memory hungry in fp32)
        ref = rope_shift_ref(K[:1], delta, inv)
        out = ops.rope_shift(K[:1].clone(), delta, inv)
        checks.append(("rope_shift", T, (ref.float() - out.float()).abs().max().item()))
        t = bench(lambda: ops.rope_shift(K, delta, inv))
        tt = bench(lambda: tops.rope_shift(K, delta, inv), 3)
        nbytes = 2 * K.numel() * 2
        rows.append({"kernel": "rope_shift", "T": T, "triton_ms": t * 1e3, "torch_ms": tt * 1e3,
                     "GBps": nbytes / t / 1e9, "of_hbm": nbytes / t / 1e9 / hbm})
        K = None  # free before the next shape
        for r in (0.05, 0.15, 0.3):
            q, k, v, qp, kp = attention_inputs(T, r, g, Hq, H, D, dev)
            if T == 8192 and r == 0.15:
                ref = selective_attention_ref(q[:4], k[:1], v[:1], qp, kp, D ** -0.5)
                out = ops.selective_attention(q[:4], k[:1], v[:1], qp, kp, D ** -0.5)
                checks.append(("selective_attention", T, (ref.float() - out.float()).abs()
                               .max().item()))
            t = bench(lambda: ops.selective_attention(q, k, v, qp, kp, D ** -0.5, k_sorted=True))
            tt = bench(lambda: tops.selective_attention(q, k, v, qp, kp, D ** -0.5), 5)
            # unique bytes: Q + K + V + O ; causal FLOPs: 4·D per visible (q, k) pair per head
            nbytes = (2 * q.numel() + k.numel() + v.numel()) * 2
            flops = 4 * D * Hq * float((qp + 1).sum())
            rows.append({"kernel": f"selective_attention r={r}", "T": T,
                         "triton_ms": t * 1e3, "torch_ms": tt * 1e3, "GBps": nbytes / t / 1e9,
                         "of_hbm": nbytes / t / 1e9 / hbm, "TFLOPs": flops / t / 1e12})
        kn, vn, ko, vo = (torch.randn(H, T, D, device=dev, generator=g, dtype=torch.bfloat16)
                          for _ in range(4))
        checks.append(("kv_deviation", T, ((kv_deviation_ref(kn, vn, ko, vo) -
                                            ops.kv_deviation(kn, vn, ko, vo)).abs() /
                                           kv_deviation_ref(kn, vn, ko, vo)).max().item()))
        t = bench(lambda: ops.kv_deviation(kn, vn, ko, vo))
        tt = bench(lambda: tops.kv_deviation(kn, vn, ko, vo), 5)
        nbytes = 4 * kn.numel() * 2
        rows.append({"kernel": "kv_deviation", "T": T, "triton_ms": t * 1e3, "torch_ms": tt * 1e3,
                     "GBps": nbytes / t / 1e9, "of_hbm": nbytes / t / 1e9 / hbm})
        n = int(T * 0.15)
        idx = torch.randperm(T, device=dev, generator=g)[:n]
        Kb, Vb = torch.zeros(H, T, D, device=dev, dtype=torch.bfloat16), torch.zeros(
            H, T, D, device=dev, dtype=torch.bfloat16)
        kr, vr = (torch.randn(H, n, D, device=dev, generator=g, dtype=torch.bfloat16)
                  for _ in range(2))
        ops.scatter_kv(Kb, Vb, idx, kr, vr)
        checks.append(("scatter_kv", T, float((Kb[:, idx] != kr).sum() + (Vb[:, idx] != vr).sum())))
        t = bench(lambda: ops.scatter_kv(Kb, Vb, idx, kr, vr))
        tt = bench(lambda: tops.scatter_kv(Kb, Vb, idx, kr, vr), 5)
        nbytes = 4 * kr.numel() * 2
        rows.append({"kernel": "scatter_kv r=0.15", "T": T, "triton_ms": t * 1e3,
                     "torch_ms": tt * 1e3, "GBps": nbytes / t / 1e9,
                     "of_hbm": nbytes / t / 1e9 / hbm})
        torch.cuda.empty_cache()
    print_table("correctness at full size (max abs error; kv_deviation: max relative)",
                ["kernel", "T", "error"], checks)
    print_table(f"kernel times (HBM copy bandwidth measured: {hbm:.0f} GB/s)",
                ["kernel", "T", "triton ms", "torch ms", "GB/s", "of HBM", "TFLOP/s"],
                [[r["kernel"], r["T"], r["triton_ms"], r["torch_ms"], r["GBps"], r["of_hbm"],
                  r.get("TFLOPs", "")] for r in rows])
    write_json("kernels_gpu", {"benchmark": "kernels_gpu", "hbm_copy_GBps": hbm,
                               "env": environment("cuda"), "checks": checks, "rows": rows},
               sys.argv[1] if len(sys.argv) > 1 else None)


if __name__ == "__main__":
    main()
