"""Whole requests under concurrent load: our serving engine vs HF transformers on one model.

Engine mode (GPU, or CPU with small sizes): RAG requests of system prompt (128 tokens) + 6
chunks of 512 drawn from a pool of 24 warm chunk caches + question (32) = 3,232 prompt tokens,
128 output tokens each (EOS ignored), submitted to ``ServingEngine`` through the Python API:

* ``burst``: all requests at once (saturation) for full prefill, CacheBlend 15 % and the
  default configuration (CacheBlend behind the calibrated cost guard);
* ``poisson``: open-loop Poisson arrivals at fractions of the measured saturation rate;
* ``shared-doc``: every request over the same 6 documents in the same order (different
  questions) — K/V pool pages in use vs pages mapped (what prefix-block sharing saves);
* batch-1 decode time per output token after each strategy, and the weight-read floor
  (weight bytes / measured device copy bandwidth);
* peers on the same model object in the same run: HF ``generate`` with one static batch, and
  HF ``generate_batch`` (continuous batching).

Gateway mode (``--gateway``, CPU): ``ctxcache serve`` with the packaged SmolLM2 in a
subprocess, 16 concurrent clients of the official ``openai`` package (chat completions,
greedy, semantic cache off), served one at a time (``max_concurrency`` 1, the old behaviour)
vs the continuous-batching default; checks that the answers are identical.

    python benchmarks/serving.py --model random:llama-3-8b --device cuda --dtype bf16
    python benchmarks/serving.py --model qwen2.5-coder-0.5b-instruct --device cuda --dtype bf16
    python benchmarks/serving.py --gateway
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import environment, print_table, write_json  # noqa: E402

ROW_KEYS = ("engine", "strategy", "workload", "concurrency", "rate", "requests", "out_tok_s",
            "req_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_ms", "tpot_p99_ms", "e2e_p50_s",
            "e2e_p99_s", "kv_pool_peak_blocks", "kv_pool_peak_mapped")


def pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs, dtype=float), q)) if len(xs) else float("nan")


# ---------------------------------------------------------------------------- workload
def rag_prompts(vocab: int, n_req: int, *, seed: int = 0, chunk: int = 512, n_chunks: int = 6,
                pool: int = 24, system: int = 128, question: int = 32,
                shared: bool = False, draw_seed: int | None = None) -> list[dict]:
    """Token-id prompts (speed does not depend on the text): one system prompt, a pool of
    chunks (fixed by ``seed``), per request ``n_chunks`` drawn at random (``draw_seed``: other
    draws and questions over the same pool) or the same ones (``shared``)."""
    rng = random.Random(seed)
    tok = lambda n: [rng.randrange(100, vocab - 100) for _ in range(n)]  # noqa: E731
    sys_ids = tok(system)
    chunks = [tok(chunk) for _ in range(pool)]
    fixed = rng.sample(range(pool), n_chunks)
    if draw_seed is not None:
        rng = random.Random(draw_seed)
    out = []
    for _ in range(n_req):
        pick = fixed if shared else rng.sample(range(pool), n_chunks)
        out.append({"system": sys_ids, "chunks": [chunks[i] for i in pick],
                    "question": tok(question)})
    return out


def segments(p: dict):
    from ctxcache.fusion import Segment

    return [Segment.prefix(p["system"])] + [Segment.chunk(c) for c in p["chunks"]] + \
        [Segment.text(p["question"])]


def flat(p: dict) -> list[int]:
    return p["system"] + [t for c in p["chunks"] for t in c] + p["question"]


# ---------------------------------------------------------------------------- our engine
def run_ours(se, planner, ctx, prompts, strategy, max_tokens, arrivals=None) -> dict:
    from ctxcache.engine import SamplingParams
    from ctxcache.engine.scheduler import EngineRequest

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    for k in ("peak_blocks_used", "peak_blocks_mapped"):
        se.stats[k] = 0
    handles = []
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        if arrivals is not None:
            wait = t0 + arrivals[i] - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        segs = segments(p)
        n = sum(len(s.token_ids) for s in segs)
        handles.append(se.submit(EngineRequest(
            lambda segs=segs: planner.run(ctx, segs, strategy), params, n, len(p["system"]))))
    toks = [sum(1 for c in h if c.token_id is not None or c.finish_reason) for h in handles]
    end = max(h.t_done for h in handles)
    ttft = [h.t_first - h.t_submit for h in handles]
    e2e = [h.t_done - h.t_submit for h in handles]
    tpot = [(h.token_times[-1] - h.token_times[0]) / max(1, len(h.token_times) - 1) * 1e3
            for h in handles]
    span = end - t0
    served = {}
    for h in handles:
        served[h.info.get("strategy")] = served.get(h.info.get("strategy"), 0) + 1
    return {"requests": len(handles), "out_tok_s": sum(toks) / span,
            "req_s": len(handles) / span, "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "tpot_p50_ms": pct(tpot, 50), "tpot_p99_ms": pct(tpot, 99),
            "e2e_p50_s": pct(e2e, 50), "e2e_p99_s": pct(e2e, 99),
            "kv_pool_peak_blocks": se.stats["peak_blocks_used"],
            "kv_pool_peak_mapped": se.stats["peak_blocks_mapped"], "served": served,
            "tokens": sum(toks)}


def decode_ms(se, planner, ctx, prompt, strategy, max_tokens) -> float:
    """Median time per output token of one request alone in the engine (batch 1)."""
    r = run_ours(se, planner, ctx, [prompt], strategy, max_tokens)
    return r["tpot_p50_ms"]


# ---------------------------------------------------------------------------- HF peers
def hf_static(engine, prompts, max_tokens) -> dict:
    hf = engine.hf
    ids = torch.tensor([flat(p) for p in prompts], device=engine.device)
    mask = torch.ones_like(ids)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def gen(n):
        torch.cuda.synchronize() if engine.device.type == "cuda" else None
        t = time.perf_counter()
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                          **kw)
        torch.cuda.synchronize() if engine.device.type == "cuda" else None
        return time.perf_counter() - t, out

    gen(2)  # warm-up
    ttft, _ = gen(1)
    span, out = gen(max_tokens)
    n_out = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    tpot = (span - ttft) / max(1, max_tokens - 1) * 1e3
    return {"requests": len(prompts), "out_tok_s": n_out / span, "req_s": len(prompts) / span,
            "ttft_p50_s": ttft, "ttft_p99_s": ttft, "tpot_p50_ms": tpot, "tpot_p99_ms": tpot,
            "e2e_p50_s": span, "e2e_p99_s": span}


def hf_continuous(engine, prompts, max_tokens) -> dict:
    from transformers import GenerationConfig

    gc = GenerationConfig(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    inputs = [flat(p) for p in prompts]
    engine.hf.generate_batch(inputs=inputs[:2], generation_config=gc)  # warm-up
    t = time.perf_counter()
    out = engine.hf.generate_batch(inputs=inputs, generation_config=gc)
    span = time.perf_counter() - t
    n_out = sum(len(getattr(o, "generated_tokens", []) or []) for o in out.values())
    return {"requests": len(prompts), "out_tok_s": n_out / span, "req_s": len(prompts) / span,
            "e2e_p50_s": span, "e2e_p99_s": span}


def device_copy_gbps(device) -> float:
    if device.type != "cuda":
        return float("nan")
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 10 * 2 * x.numel() / (time.perf_counter() - t) / 1e9


# ---------------------------------------------------------------------------- engine mode
def engine_mode(args) -> None:
    from ctxcache.engine import Engine
    from ctxcache.engine.scheduler import ServingEngine
    from ctxcache.fusion import FusionContext, Planner, default_strategies
    from ctxcache.fusion.costmodel import load_or_calibrate
    from ctxcache.kv import KVStore, MemoryTier

    engine = Engine.load(args.model, device=args.device, dtype=args.dtype)
    dev = engine.device
    vocab = engine.spec.vocab_size
    store = KVStore([MemoryTier(args.tier_gib << 30, str(dev))], eviction="lru")
    ctx = FusionContext(engine, store, "bench")
    strategies = default_strategies(cacheblend={"recompute_ratio": 0.15})
    planner = Planner(strategies, default="cacheblend", sample_rate=0.0)
    se = ServingEngine(engine, max_running=args.max_running,
                       max_prefill_tokens=args.max_prefill_tokens,
                       kv_fraction=args.kv_fraction).start()
    n_req, mt = args.requests, args.max_tokens
    kw = dict(chunk=args.chunk, system=args.system, question=args.question)
    prompts = rag_prompts(vocab, n_req, seed=1, **kw)
    shared = rag_prompts(vocab, n_req, seed=1, shared=True, **kw)
    rows: list[dict] = []

    def add(engine_name, strategy, workload, res, concurrency=None, rate=None):
        row = {"engine": engine_name, "strategy": strategy, "workload": workload,
               "concurrency": concurrency, "rate": rate, **res}
        rows.append(row)
        print(f"  {engine_name:14s} {strategy:10s} {workload:10s} "
              f"{row['out_tok_s']:9.1f} tok/s  ttft p50 {row.get('ttft_p50_s', float('nan')):.3f}"
              f" p99 {row.get('ttft_p99_s', float('nan')):.3f}  tpot p50 "
              f"{row.get('tpot_p50_ms', float('nan')):.2f} ms", flush=True)

    # warm: chunk caches (all chunks built once), kernels, graphs, the cost model
    print("warming chunk caches and kernels ...", flush=True)
    run_ours(se, planner, ctx, prompts, "cacheblend", 4)
    run_ours(se, planner, ctx, shared[:2], "cacheblend", 4)
    run_ours(se, planner, ctx, prompts[:4], "full", 4)
    t = time.perf_counter()
    planner.cost_model = load_or_calibrate(engine, strategies)
    print(f"cost model ready in {time.perf_counter() - t:.1f} s", flush=True)

    floor_gbps = device_copy_gbps(dev)
    wbytes = sum(p.numel() * p.element_size() for p in engine.hf.parameters())
    decode = {}
    for b in (1, 2, 4):  # capture the small decode buckets before timing batch 1
        run_ours(se, planner, ctx, prompts[:b], "full", 8)
    for name in args.decode_strategies.split(","):
        decode[name] = decode_ms(se, planner, ctx, prompts[0], name, mt)
        print(f"  batch-1 decode after {name}: {decode[name]:.2f} ms/token", flush=True)
    unloaded = run_ours(se, planner, ctx, prompts[:1], "cacheblend", mt)
    add("ours", "cacheblend", "single", unloaded, concurrency=1)

    sat = {}
    for label, strat in (("full", "full"), ("cacheblend", "cacheblend"), ("default", None)):
        res = run_ours(se, planner, ctx, prompts, strat, mt)
        sat[label] = res
        add("ours", label, "burst", res, concurrency=n_req)
    for label, strat in (("cacheblend", "cacheblend"), ("full", "full")):
        for frac in args.rate_fractions:
            rate = sat[label]["req_s"] * frac
            rng = np.random.default_rng(7)
            arr = np.cumsum(rng.exponential(1.0 / rate, size=args.poisson_requests)).tolist()
            arr = [a - arr[0] for a in arr]
            ps = rag_prompts(vocab, args.poisson_requests, seed=1, draw_seed=3, **kw)
            res = run_ours(se, planner, ctx, ps, strat, mt, arrivals=arr)
            add("ours", label, f"poisson@{frac:g}", res, rate=round(rate, 3))
    for label, strat in (("full", "full"), ("prefix", "prefix"), ("cacheblend", "cacheblend")):
        res = run_ours(se, planner, ctx, shared, strat, mt)
        add("ours", label, "shared-doc", res, concurrency=n_req)
    se.close()
    if not args.no_hf:
        for name, fn in (("hf-static", hf_static), ("hf-continuous", hf_continuous)):
            try:
                add(name, "full", "burst", fn(engine, prompts, mt), concurrency=n_req)
            except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
                print(f"  {name} failed: {type(e).__name__}: {e}", flush=True)
                rows.append({"engine": name, "strategy": "full", "workload": "burst",
                             "error": f"{type(e).__name__}: {e}"[:300]})
            if dev.type == "cuda":
                torch.cuda.empty_cache()

    ok = [r for r in rows if "error" not in r]
    print_table(f"serving, {args.model} ({args.device}, {args.dtype}), {n_req} requests of "
                f"{len(flat(prompts[0]))} + {mt} tokens",
                ["engine", "strategy", "workload", "out tok/s", "req/s", "TTFT p50 s",
                 "TTFT p99 s", "TPOT p50 ms", "TPOT p99 ms", "e2e p99 s", "pool peak/mapped"],
                [[r["engine"], r["strategy"], r["workload"], round(r["out_tok_s"], 1),
                  round(r["req_s"], 2), _r(r.get("ttft_p50_s")), _r(r.get("ttft_p99_s")),
                  _r(r.get("tpot_p50_ms"), 2), _r(r.get("tpot_p99_ms"), 2),
                  _r(r.get("e2e_p99_s")),
                  f"{r.get('kv_pool_peak_blocks', '')}/{r.get('kv_pool_peak_mapped', '')}"]
                 for r in ok])
    floor_ms = wbytes / (floor_gbps * 1e9 / 2) * 1e3 if floor_gbps == floor_gbps else None
    name = args.model.split(":")[-1].split("/")[-1].replace(".gguf", "")
    out = {"model": name, "device": args.device, "dtype": args.dtype,
           "workload": {"requests": n_req, "prompt_tokens": len(flat(prompts[0])),
                        "output_tokens": mt, "chunk": args.chunk, "chunks": 6, "pool": 24},
           "rows": [{k: r.get(k) for k in ROW_KEYS} | ({"served": r["served"]} if "served" in r
                                                       else {}) |
                    ({"error": r["error"]} if "error" in r else {}) for r in rows],
           "decode_ms_per_token": decode, "decode_floor_ms": floor_ms,
           "weight_bytes": wbytes, "device_copy_GBps": floor_gbps,
           "pool": se.pool.stats().as_dict(), "runner": se.runner.describe(),
           "environment": environment(args.device)}
    save(out, f"serving_{name}", args.out)


def save(out: dict, name: str, out_dir: str | None) -> None:
    write_json(name, out, out_dir)


def _r(x, nd=3):
    return None if x is None else round(x, nd)


# ---------------------------------------------------------------------------- gateway mode
QUESTIONS = [
    "What is the capital of France?", "Write a haiku about rain.", "List three prime numbers.",
    "Who wrote Hamlet?", "Explain gravity in one sentence.", "What is a binary tree?",
    "Name two planets of the solar system.", "How do I sort a list in Python?",
    "What is the boiling point of water?", "Give me a synonym for happy.",
    "What does CPU stand for?", "Describe the ocean in five words.",
    "What is photosynthesis?", "Translate 'thank you' into French.",
    "Why is the sky blue?", "What is the largest mammal?",
]


def gateway_run(concurrency_setting: int | None, clients: int, max_tokens: int,
                rounds: int) -> dict:
    import concurrent.futures as cf
    import socket
    import subprocess
    import tempfile

    from openai import OpenAI

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    env = dict(os.environ, CTXCACHE_SEMANTIC_CACHE="false", CTXCACHE_COST_MODEL="off",
               CTXCACHE_DATA_DIR=tempfile.mkdtemp(prefix="ctxcache-bench-"),
               HF_HUB_OFFLINE="1", CTXCACHE_MAX_QUEUE="256")
    if concurrency_setting is not None:
        env["CTXCACHE_MAX_CONCURRENCY"] = str(concurrency_setting)
    proc = subprocess.Popen([sys.executable, "-m", "ctxcache.cli", "serve", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=600)
        deadline = time.time() + 300
        while True:
            try:
                client.models.list()
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("gateway did not start")
                time.sleep(1)

        def one(q: str) -> dict:
            t0 = time.perf_counter()
            first, n, parts = None, 0, []
            stream = client.chat.completions.create(
                model="smollm2-135m-instruct", messages=[{"role": "user", "content": q}],
                max_tokens=max_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True})
            for ev in stream:
                if ev.usage is not None:
                    n = ev.usage.completion_tokens
                for ch in ev.choices:
                    if ch.delta.content:
                        if first is None:
                            first = time.perf_counter()
                        parts.append(ch.delta.content)
            end = time.perf_counter()
            first = first or end
            return {"q": q, "text": "".join(parts), "ttft": first - t0, "e2e": end - t0,
                    "tokens": n, "tpot": (end - first) / max(1, n - 1)}

        one(QUESTIONS[0])  # warm-up
        qs = [QUESTIONS[i % len(QUESTIONS)] for i in range(clients * rounds)]
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(clients) as ex:
            res = list(ex.map(one, qs))
        span = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(30)
    tok = sum(r["tokens"] for r in res)
    return {"requests": len(res), "out_tok_s": tok / span, "req_s": len(res) / span,
            "ttft_p50_s": pct([r["ttft"] for r in res], 50),
            "ttft_p99_s": pct([r["ttft"] for r in res], 99),
            "tpot_p50_ms": pct([r["tpot"] for r in res], 50) * 1e3,
            "tpot_p99_ms": pct([r["tpot"] for r in res], 99) * 1e3,
            "e2e_p50_s": pct([r["e2e"] for r in res], 50),
            "e2e_p99_s": pct([r["e2e"] for r in res], 99),
            "answers": {r["q"]: r["text"] for r in res}}


def gateway_mode(args) -> None:
    rows = []
    answers = {}
    for label, setting in (("batch-1 (max_concurrency 1)", 1),
                           ("continuous batching (default)", None)):
        print(f"{label} ...", flush=True)
        r = gateway_run(setting, args.clients, args.max_tokens, args.rounds)
        answers[label] = r.pop("answers")
        rows.append({"engine": "ours", "strategy": "prefix", "workload": "gateway-chat",
                     "concurrency": args.clients, "rate": None, "setting": label, **r})
    a, b = answers.values()
    same = sum(a[q] == b.get(q) for q in a)
    print_table(f"gateway (SmolLM2-135M, CPU), {args.clients} concurrent openai clients, "
                f"{args.max_tokens} tokens, greedy",
                ["setting", "out tok/s", "req/s", "TTFT p50 s", "TTFT p99 s", "TPOT p50 ms",
                 "e2e p99 s"],
                [[r["setting"], round(r["out_tok_s"], 1), round(r["req_s"], 2),
                  _r(r["ttft_p50_s"]), _r(r["ttft_p99_s"]), _r(r["tpot_p50_ms"], 1),
                  _r(r["e2e_p99_s"])] for r in rows])
    speedup = rows[1]["out_tok_s"] / rows[0]["out_tok_s"]
    print(f"throughput x{speedup:.2f}; identical answers: {same}/{len(a)}")
    out = {"model": "smollm2-135m-instruct", "device": "cpu", "dtype": "float32",
           "rows": rows, "speedup": speedup, "identical_answers": same,
           "distinct_questions": len(a), "environment": environment("cpu")}
    save(out, "serving_smollm2-135m-instruct", args.out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gateway", action="store_true", help="CPU gateway mode (openai clients)")
    ap.add_argument("--model", default="random:llama-3-8b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--system", type=int, default=128)
    ap.add_argument("--question", type=int, default=32)
    ap.add_argument("--max-running", type=int, default=64)
    ap.add_argument("--max-prefill-tokens", type=int, default=8192)
    ap.add_argument("--kv-fraction", type=float, default=0.4)
    ap.add_argument("--tier-gib", type=int, default=8)
    ap.add_argument("--rate-fractions", type=float, nargs="+", default=[0.5, 0.8])
    ap.add_argument("--poisson-requests", type=int, default=48)
    ap.add_argument("--decode-strategies", default="full,prefix,naive,cacheblend,cachecraft,ape")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None, help="folder for the JSON (default benchmarks/results)")
    args = ap.parse_args()
    if args.gateway:
        gateway_mode(args)
    else:
        engine_mode(args)


if __name__ == "__main__":
    main()
