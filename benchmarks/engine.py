"""Prefill and decode speed of our engine vs the HF forward / DynamicCache, side by side.

CPU (default): the real SmolLM2-135M-Instruct in float32.
GPU: random weights in the Llama-3-8B shape, bf16:
    python benchmarks/engine.py --device cuda --model random:llama-3-8b --dtype bf16 \
        --contexts 1024,4096,8192,16384

Prefill compares ``Engine.prefill`` (K/V kept, last-token logits) with HF's forward doing the same
work (``use_cache=True, logits_to_keep=1``, as ``generate`` does for its prefill). Decode compares
one step of our preallocated-buffer loop with one HF step on a DynamicCache, at the given context.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import environment, print_table, sync, timeit, write_json  # noqa: E402
from ctxcache.engine import Engine  # noqa: E402
from ctxcache.engine.generate import DecodeBuffer, decode_step  # noqa: E402


def hf_prefill(engine: Engine, ids: torch.Tensor):
    with torch.inference_mode():
        return engine.hf(ids[None], use_cache=True, logits_to_keep=1)


def bench_context(engine: Engine, n: int, steps: int, repeat: int, device: str) -> dict:
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(0, engine.spec.vocab_size, (n,), generator=g).to(device)
    ours_pf = timeit(lambda: engine.prefill(ids), device, repeat)
    hf_pf = timeit(lambda: hf_prefill(engine, ids), device, repeat)

    # decode: ours
    pre = engine.prefill(ids)
    buf = DecodeBuffer(engine, n + steps + 1)
    tok = int(pre.logits[-1].argmax())

    def ours_decode():
        buf.load(pre.kv)
        for _ in range(steps):
            decode_step(engine, buf, tok)

    ours_dec = timeit(ours_decode, device, max(1, repeat // 2))
    # the reload of the prompt KV is part of the timed block: measure it alone and subtract
    load_t = timeit(lambda: buf.load(pre.kv), device, repeat)["median_s"]

    # decode: HF with DynamicCache (the cache is rebuilt each repeat, outside the timed part)
    hf_step_times = []
    for _ in range(max(1, repeat // 2)):
        out = hf_prefill(engine, ids)
        cache = out.past_key_values
        nxt = torch.tensor([[tok]], device=device)
        with torch.inference_mode():
            engine.hf(nxt, past_key_values=cache, use_cache=True)  # warm
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                engine.hf(nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            sync(device)
        hf_step_times.append((time.perf_counter() - t0) / steps)
        del out, cache
    hf_step = sorted(hf_step_times)[len(hf_step_times) // 2]
    ours_step = (ours_dec["median_s"] - load_t) / steps
    return {
        "context": n,
        "prefill_ours_s": ours_pf["median_s"],
        "prefill_hf_s": hf_pf["median_s"],
        "prefill_ratio_ours_over_hf": ours_pf["median_s"] / hf_pf["median_s"],
        "prefill_tok_per_s_ours": n / ours_pf["median_s"],
        "decode_step_ours_s": ours_step,
        "decode_step_hf_s": hf_step,
        "decode_speedup_vs_hf": hf_step / ours_step,
        "decode_steps": steps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--contexts", default="128,512,1024")
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed per context")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None, help="directory for the JSON (default results/)")
    ap.add_argument("--name", default=None, help="JSON file stem")
    args = ap.parse_args()

    torch.manual_seed(0)
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    engine = Engine.load(args.model, device=args.device, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    rows = []
    for n in [int(x) for x in args.contexts.split(",")]:
        r = bench_context(engine, n, args.steps, args.repeat, args.device)
        rows.append(r)
        print(f"  context {n}: done", flush=True)
    print_table(
        f"engine: {args.model} {args.dtype} on {args.device}",
        ["context", "prefill ours ms", "prefill HF ms", "ours/HF", "decode ours ms", "decode HF ms",
         "decode speed-up"],
        [[r["context"], r["prefill_ours_s"] * 1e3, r["prefill_hf_s"] * 1e3,
          r["prefill_ratio_ours_over_hf"], r["decode_step_ours_s"] * 1e3,
          r["decode_step_hf_s"] * 1e3, r["decode_speedup_vs_hf"]] for r in rows],
    )
    name = args.name or f"engine_{args.device.split(':')[0]}_{args.model.replace(':', '_')}"
    write_json(name, {"benchmark": "engine", "model": args.model, "dtype": args.dtype,
                      "load_s": load_s, "env": environment(args.device), "rows": rows}, args.out)


if __name__ == "__main__":
    main()
