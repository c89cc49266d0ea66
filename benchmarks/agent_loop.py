"""Reuse in an agent loop: step N+1 resends the whole conversation plus the new tool result.

An agent with tools (``--tools`` OpenAI function specs rendered by the model's own template)
runs ``--steps`` steps. Each step appends the assistant's tool call and the tool's result (a
section of the Python language reference, ~150-250 tokens, or with ``--source squad`` a SQuAD
v1.1 paragraph) and asks the model for the next step, exactly as an
agent framework does through ``/v1/chat/completions``. The request goes through the gateway's
embedded backend (``EmbeddedBackend``: chat template → per-message segments → ``prefix``
strategy over the chunk K/V store → the batched serving engine).

Per step, side by side on one model object:

* **reuse** — one tenant for the whole loop, as the gateway serves it: the previous step's
  prompt is still in the serving engine's page pool, so its rows are read in device memory and
  only the new messages are prefilled (the chunk store fills in what the pool lost);
* **reuse (store)** — the same with the pool's resident pages ignored (another tenant): the
  previous steps' segments come from the chunk store (a host tier by default);
* **full** — a fresh tenant every step: nothing cached, the whole prompt is prefilled;
* **new only** — the floor: the engine prefills just the tokens the reuse request did not find
  cached, over the rest of the prompt's K/V already resident on the device, and picks the first
  token (no store lookup, no scheduling, no serving engine). ``reuse / new only`` is what the
  gateway's reuse path costs above that floor.

Reported: prompt tokens, tokens served from cache, TTFT of the three, the ratios, and whether
the first ``--tokens`` greedy tokens agree (prefix reuse is exact: they must).

``--agents N`` (N > 1) measures whole loops under concurrent load instead: N agents run their
loops at once through one serving engine (continuous batching), each step a whole request of
``--answer-tokens`` tokens, for each path in turn — reuse, reuse (store), full (nothing reused)
— and the peer on the same model object: HF ``generate`` with one static batch per step (all N
agents' prompts, left-padded; the loop waits for the batch). Per path: wall time of all loops,
output tokens/s, TTFT, time per output token and whole-request time at p50/p99.

    python benchmarks/agent_loop.py                                  # CPU, Qwen2.5-Coder-0.5B
    python benchmarks/agent_loop.py --device cuda --dtype bfloat16 --model <dir or gguf>
    python benchmarks/agent_loop.py --agents 16 --answer-tokens 32 --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import environment, print_table, write_json  # noqa: E402
from ctxcache.datasets import python_docs, squad_dev  # noqa: E402
from ctxcache.engine import Engine, SamplingParams  # noqa: E402
from ctxcache.fusion.execute import graph_stats  # noqa: E402
from ctxcache.kv import KVStore, MemoryTier  # noqa: E402
from ctxcache.service.backends import EmbeddedBackend, GenRequest  # noqa: E402
from ctxcache.structured import parse_tool_spec  # noqa: E402
from ctxcache.structured.tools import template_messages  # noqa: E402

TOOLS = [
    {"type": "function", "function": {
        "name": "search", "description": "Search the encyclopedia; returns one paragraph.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                       "required": ["query"]}}},
    {"type": "function", "function": {
        "name": "open_page", "description": "Open an encyclopedia page by its title.",
        "parameters": {"type": "object", "properties": {"title": {"type": "string"}},
                       "required": ["title"]}}},
]


def episode(rng: random.Random, steps: int, source: str = "python-docs"
            ) -> tuple[str, list[tuple[dict, str]]]:
    """(question, [(tool call, tool result)] * steps): consecutive sections of one topic of
    the Python language reference (``python-docs``, always installed) or paragraphs of one
    SQuAD v1.1 article (``squad``, downloaded once)."""
    if source == "squad":
        arts = [a for a in squad_dev() if len(a["paragraphs"]) >= steps + 1]
        art = rng.choice(arts)
        question = art["paragraphs"][0]["qas"][0]["question"]
        title, results = art["title"], [p["context"] for p in art["paragraphs"][1:steps + 1]]
        tool = "search"
    else:
        docs = {k: v for k, v in python_docs(600).items() if len(v) >= steps}
        title = rng.choice(sorted(docs))
        question = (f"In Python, what are the exact rules of '{title}'? Look them up in the "
                    "language reference before answering.")
        results, tool = docs[title][:steps], "open_page"
    out = []
    for i, text in enumerate(results):
        args = {"query": f"{title} part {i}"} if tool == "search" else \
            {"title": f"{title} ({i + 1})"}
        call = {"id": f"call_{i}", "type": "function", "function": {
            "name": tool, "arguments": json.dumps(args)}}
        out.append((call, text))
    return question, out


def with_turn(msgs: list[dict], turn: tuple[dict, str]) -> list[dict]:
    """The conversation after the assistant's tool call and the tool's result."""
    call, result = turn
    return msgs + [{"role": "assistant", "content": "", "tool_calls": [call]},
                   {"role": "tool", "tool_call_id": call["id"], "content": result}]


def run_step(backend: EmbeddedBackend, messages: list[dict], tenant: str, tokens: int,
             tools, pool_prefix: bool = True) -> dict:
    backend.serving.pool_prefix = pool_prefix
    req = GenRequest(SamplingParams(max_tokens=tokens), tenant, messages=messages,
                     tools=tools)
    backend.check(req)
    # the engine finishes its idle-time work (graph captures) first, as it does while a
    # real agent runs the tool between two steps
    backend.serving.settle()
    t0 = time.perf_counter()
    stream = backend.generate(req)
    first, ids = None, []
    for ch in stream.chunks:
        if first is None:
            first = time.perf_counter() - t0
        if ch.token_id is not None:
            ids.append(ch.token_id)
        if ch.finish_reason:
            break
    # where the time to first token went: the strategy's own phases (host-side times on a GPU:
    # its work is queued, and the phase that reads the logits waits for it), the rest is the
    # gateway around it (template, scheduling, page-pool write, sampling)
    phases = dict((stream.info.get("stats") or {}).get("phases") or {})
    phases["outside the strategy"] = first - sum(phases.values())
    return {"ttft_s": first, "prompt_tokens": stream.info.get("prompt_tokens", 0),
            "cached_tokens": stream.info.get("cached_tokens", 0), "ids": ids,
            "phases": phases,
            "pool_tokens": (stream.info.get("stats") or {}).get("pool_tokens", 0)}


def new_only_ttft(engine: Engine, messages: list[dict], tools: list[dict], cached: int,
                  prompt_tokens: int, sync) -> float:
    """Seconds to prefill the prompt's tokens after ``cached`` over the first ``cached``
    tokens' K/V (computed beforehand, untimed) and take the greedy first token."""
    ids, _ = engine.chat_segments(template_messages(messages), tools)  # the gateway's prompt
    if len(ids) != prompt_tokens:
        raise SystemExit(f"the floor's prompt has {len(ids)} tokens, the gateway's "
                         f"{prompt_tokens}: they must be the same prompt")
    kv = engine.prefill(ids[:cached], logits="none").kv if cached else None
    sync()
    t0 = time.perf_counter()
    out = engine.prefill(ids[cached:], kv=kv)
    out.logits.argmax().item()
    return time.perf_counter() - t0


def pct(xs, q) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else \
        (xs[0] if xs else float("nan"))


def loops_served(backend: EmbeddedBackend, episodes, system: dict, tools, tokens: int,
                 path: str, run: str = "timed") -> dict:
    """Every agent's loop at once through the serving engine; one path's figures. Tenants are
    named by ``run``: nothing one run cached is found by another."""
    import threading

    backend.serving.pool_prefix = path == "reuse"
    recs: list[dict] = []
    lock = threading.Lock()

    def agent(i: int) -> None:
        question, turns = episodes[i]
        msgs = [system, {"role": "user", "content": question}]
        for k in range(len(turns) + 1):
            tenant = {"reuse": f"{run}-pool-{i}", "reuse (store)": f"{run}-store-{i}"}.get(
                path, f"{run}-none-{i}-{k}")
            req = GenRequest(SamplingParams(max_tokens=tokens, ignore_eos=True), tenant,
                             messages=msgs, tools=tools)
            backend.check(req)
            t0 = time.perf_counter()
            stream = backend.generate(req)
            times = []
            for ch in stream.chunks:
                times.append(time.perf_counter())
                if ch.finish_reason:
                    break
            with lock:
                recs.append({"ttft": times[0] - t0, "e2e": times[-1] - t0, "n": len(times),
                             "tpot": (times[-1] - times[0]) / (len(times) - 1)
                             if len(times) > 1 else None,
                             "prompt": stream.info.get("prompt_tokens", 0),
                             "cached": stream.info.get("cached_tokens", 0)})
            if k < len(turns):
                msgs = with_turn(msgs, turns[k])

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(len(episodes))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = [r["ttft"] for r in recs]
    tpot = [r["tpot"] for r in recs if r["tpot"] is not None]
    e2e = [r["e2e"] for r in recs]
    return {"path": path, "requests": len(recs), "wall_s": wall,
            "out_tok_s": sum(r["n"] for r in recs) / wall,
            "cached_share": sum(r["cached"] for r in recs) / max(1, sum(r["prompt"]
                                                                        for r in recs)),
            "ttft_p50_ms": pct(ttft, 50) * 1e3, "ttft_p99_ms": pct(ttft, 99) * 1e3,
            "tpot_p50_ms": pct(tpot, 50) * 1e3, "tpot_p99_ms": pct(tpot, 99) * 1e3,
            "e2e_p50_s": pct(e2e, 50), "e2e_p99_s": pct(e2e, 99)}


def loops_hf_static(engine: Engine, episodes, system: dict, tools, tokens: int) -> dict:
    """The peer: HF ``generate`` over all agents' step-k prompts as one left-padded static
    batch; every loop waits for the batch. TTFT is a separate 1-token ``generate`` of the same
    batch (not counted in the wall time)."""
    hf, dev = engine.hf, engine.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    msgs = [[system, {"role": "user", "content": q}] for q, _ in episodes]
    steps = len(episodes[0][1]) + 1
    wall, n_out, ttft, e2e = 0.0, 0, [], []
    for k in range(steps):
        ids = [engine.chat_segments(template_messages(m), tools.rendered())[0] for m in msgs]
        width = max(map(len, ids))
        x = torch.tensor([[0] * (width - len(i)) + i for i in ids], device=dev)
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=dev)
        kw = dict(input_ids=x, attention_mask=mask, do_sample=False, pad_token_id=0,
                  eos_token_id=None)
        for n, out in ((1, None), (tokens, None)):
            sync()
            t = time.perf_counter()
            res = hf.generate(max_new_tokens=n, min_new_tokens=n, **kw)
            sync()
            dt = time.perf_counter() - t
            if n == 1:
                ttft += [dt] * len(ids)
            else:
                wall += dt
                e2e += [dt] * len(ids)
                n_out += (res.shape[1] - width) * len(ids)
        for i, (_, turns) in enumerate(episodes):
            if k < len(turns):
                msgs[i] = with_turn(msgs[i], turns[k])
    tpot = [(w - t) / max(1, tokens - 1) for w, t in zip(e2e, ttft)]
    return {"path": "HF generate (static batch)", "requests": len(e2e), "wall_s": wall,
            "out_tok_s": n_out / wall, "cached_share": 0.0,
            "ttft_p50_ms": pct(ttft, 50) * 1e3, "ttft_p99_ms": pct(ttft, 99) * 1e3,
            "tpot_p50_ms": pct(tpot, 50) * 1e3, "tpot_p99_ms": pct(tpot, 99) * 1e3,
            "e2e_p50_s": pct(e2e, 50), "e2e_p99_s": pct(e2e, 99)}


def concurrent_mode(args, engine: Engine, tools, system: dict) -> None:
    rng = random.Random(args.seed)
    episodes = [episode(rng, args.steps, args.source) for _ in range(args.agents)]
    store = KVStore([MemoryTier(8 << 30, args.kv_device)])
    backend = EmbeddedBackend(engine, store, max_running=args.agents)
    run_step(backend, [system, {"role": "user", "content": "warm up"}], "warm", 2, tools)
    # one untimed pass of every path first: kernels and graphs for these shapes are built
    # once, as in a server that has been up for a while
    warm = episodes[:2]
    for path in ("reuse", "reuse (store)", "full"):
        loops_served(backend, warm, system, tools, args.answer_tokens, path, "warm")
    backend.serving.settle()
    rows = []
    for path in ("reuse", "reuse (store)", "full"):
        rows.append(loops_served(backend, episodes, system, tools, args.answer_tokens, path))
    backend.close()
    if not args.no_hf:
        rows.append(loops_hf_static(engine, episodes, system, tools, args.answer_tokens))
    cols = list(rows[0])
    print_table(f"{args.agents} agent loops at once — {args.model} on {args.device}, "
                f"{args.steps + 1} steps each, {args.answer_tokens} answer tokens",
                cols, [[r[c] for c in cols] for r in rows])
    base = rows[2]["wall_s"]
    for r in rows:
        r["wall_vs_full"] = base / r["wall_s"]
    tier = "" if args.kv_device == "cpu" else "_kv_" + args.kv_device.split(":")[0]
    write_json(f"agent_loop_{engine.name}_{args.device.split(':')[0]}{tier}_concurrent", {
        "benchmark": "agent_loop_concurrent", "model": engine.name, "device": args.device,
        "agents": args.agents, "steps": args.steps + 1, "answer_tokens": args.answer_tokens,
        "kv_device": args.kv_device, "paths": rows, "environment": environment(args.device)},
        args.out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--episodes", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--warm-episodes", type=int, default=1,
                    help="untimed episodes (other questions) before the timed ones")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-device", default="cpu",
                    help="where the chunk store keeps K/V: cpu (the gateway's default tier) or "
                         "the engine's device (a GPU tier, CTXCACHE_KV_GPU_BYTES)")
    ap.add_argument("--agents", type=int, default=1,
                    help="above 1: that many loops at once (concurrent mode)")
    ap.add_argument("--answer-tokens", type=int, default=32,
                    help="tokens per step's answer in concurrent mode (EOS ignored)")
    ap.add_argument("--no-hf", action="store_true", help="concurrent mode without the HF peer")
    ap.add_argument("--tokenizer", default=None,
                    help="with --model random:<config>: a tokenizer directory (its chat "
                         "template renders the tools), for speed runs without real weights")
    ap.add_argument("--source", default="python-docs", choices=("python-docs", "squad"),
                    help="tool results: sections of the Python language reference (shipped "
                         "with Python) or SQuAD v1.1 paragraphs (downloaded once)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(args.dtype,
                                                                          args.dtype)
    engine = Engine.load(args.model, device=args.device, dtype=getattr(torch, dtype),
                         tokenizer=args.tokenizer)
    tools = parse_tool_spec(TOOLS, "auto", None)
    system = {"role": "system", "content": "You are a research agent. Use the tools to find "
                                           "facts, then answer in one sentence."}
    if args.agents > 1:
        return concurrent_mode(args, engine, tools, system)
    store = KVStore([MemoryTier(8 << 30, args.kv_device)])
    backend = EmbeddedBackend(engine, store, max_running=1)
    rng = random.Random(args.seed)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    # warm-up: kernels, allocator, template, then untimed episodes of other questions through
    # every path (graphs for their shapes), as in a server that has been up for a while
    run_step(backend, [system, {"role": "user", "content": "warm up"}], "warm", 2, tools)
    wrng = random.Random(args.seed + 1000)
    for w in range(args.warm_episodes):
        question, turns = episode(wrng, args.steps, args.source)
        msgs = [system, {"role": "user", "content": question}]
        for k in range(args.steps + 1):
            run_step(backend, msgs, f"warm-loop-{w}", args.tokens, tools)
            run_step(backend, msgs, f"warm-store-{w}", args.tokens, tools, pool_prefix=False)
            run_step(backend, msgs, f"warm-full-{w}-{k}", args.tokens, tools)
            if k < len(turns):
                msgs = with_turn(msgs, turns[k])
    per_step: dict[int, dict[str, list]] = {}
    agree = total = 0
    for e in range(args.episodes):
        question, turns = episode(rng, args.steps, args.source)
        msgs = [system, {"role": "user", "content": question}]
        for k in range(args.steps + 1):
            reuse = run_step(backend, msgs, f"loop-{e}", args.tokens, tools)
            store = run_step(backend, msgs, f"store-{e}", args.tokens, tools, pool_prefix=False)
            full = run_step(backend, msgs, f"full-{e}-{k}", args.tokens, tools)
            backend.serving.settle()
            new = new_only_ttft(engine, msgs, tools.rendered(), reuse["cached_tokens"],
                                reuse["prompt_tokens"], sync)
            rec = per_step.setdefault(k, {"reuse": [], "store": [], "full": [], "new": [],
                                          "prompt": [], "cached": [], "pool": []})
            rec["new"].append(new)
            for path, r in (("reuse", reuse), ("store", store), ("full", full)):
                for ph, sec in r["phases"].items():
                    rec.setdefault(f"phases_{path}", {}).setdefault(ph, []).append(sec)
                rec[path].append(r["ttft_s"])
                if r["ttft_s"] >= max(rec[path]):  # where the slowest one's time went
                    rec[f"worst_{path}"] = {ph: round(v * 1e3, 2)
                                            for ph, v in r["phases"].items()}
            rec["prompt"].append(reuse["prompt_tokens"])
            rec["cached"].append(reuse["cached_tokens"])
            rec["pool"].append(reuse["pool_tokens"])
            agree += (reuse["ids"] == full["ids"]) + (store["ids"] == full["ids"])
            total += 2
            if k < len(turns):
                msgs = with_turn(msgs, turns[k])
    rows, steps_out = [], []
    for k, r in sorted(per_step.items()):
        ru, fu = statistics.median(r["reuse"]), statistics.median(r["full"])
        su, nu = statistics.median(r["store"]), statistics.median(r["new"])
        row = {"step": k, "prompt_tokens": int(statistics.median(r["prompt"])),
               "cached_tokens": int(statistics.median(r["cached"])),
               "pool_tokens": int(statistics.median(r["pool"])),
               "ttft_reuse_ms": ru * 1e3, "ttft_reuse_store_ms": su * 1e3,
               "ttft_full_ms": fu * 1e3, "ttft_new_only_ms": nu * 1e3, "speedup": fu / ru,
               "reuse_over_new_only": ru / nu, "reuse_store_over_new_only": su / nu}
        rows.append(list(row.values()))
        for path, key in (("reuse", "reuse"), ("reuse_store", "store"), ("full", "full"),
                          ("new_only", "new")):
            row[f"ttft_{path}_ms_each"] = [round(x * 1e3, 2) for x in r[key]]
        for path in ("reuse", "store", "full"):
            row[f"phases_{path}_ms"] = {ph: round(statistics.median(v) * 1e3, 2)
                                        for ph, v in r.get(f"phases_{path}", {}).items()}
            row[f"phases_{path}_slowest_ms"] = r.get(f"worst_{path}", {})
        steps_out.append(row)
    print_table(f"agent loop — {args.model} on {args.device}, {args.episodes} episodes, "
                f"median TTFT per step", ["step", "prompt tok", "cached tok", "from pool",
                                          "TTFT reuse ms", "TTFT reuse (store) ms",
                                          "TTFT full ms", "TTFT new only ms", "full / reuse",
                                          "reuse / new only", "store / new only"], rows)
    print(f"  first {args.tokens} greedy tokens equal to full prefill (both reuse paths): "
          f"{agree}/{total}")
    graphs = graph_stats(engine)
    backend.close()
    tier = "" if args.kv_device == "cpu" else "_kv_" + args.kv_device.split(":")[0]
    write_json(f"agent_loop_{engine.name}_{args.device.split(':')[0]}{tier}", {
        "benchmark": "agent_loop", "model": engine.name, "device": args.device,
        "dtype": dtype, "episodes": args.episodes, "kv_device": args.kv_device,
        "steps": steps_out,
        "greedy_agreement": f"{agree}/{total}",
        "reuse_over_new_only_median": statistics.median(
            s["reuse_over_new_only"] for s in steps_out if s["cached_tokens"]),
        "reuse_store_over_new_only_median": statistics.median(
            s["reuse_store_over_new_only"] for s in steps_out if s["cached_tokens"]),
        "cuda_graphs": graphs,
        "environment": environment(args.device)},
        args.out)


if __name__ == "__main__":
    main()
