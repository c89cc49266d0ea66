"""Structured output under load: does every answer validate, and what does the constraint cost?

Three measurements, on one model object in one run:

1. **Validity**: ``--schemas`` generated JSON schemas (objects with strings, integers, numbers,
   booleans, enums, arrays and nested objects, required and optional fields; seeded), each with
   a prompt asking for such an object, served ``--concurrency`` at a time through the serving
   engine with ``response_format: json_schema``. Every answer that ends (``stop``) must parse
   and validate (``jsonschema``); answers cut by ``max_tokens`` are counted apart.
2. **Tool calls**: ``--tool-prompts`` requests with 1-3 generated functions and
   ``tool_choice: required``: the share whose calls parse and whose arguments validate.
3. **Cost per token**: the same prompts decoded unconstrained and constrained in the same
   batched engine (time per output token, p50 over requests), and the grammar library's own
   mask time per token for llguidance (which the engine uses) and, if installed, xgrammar,
   replayed over the constrained answers' tokens.

Usage::

    python benchmarks/structured.py                       # CPU, packaged Qwen2.5-Coder-0.5B
    python benchmarks/structured.py --device cuda --dtype bf16 --model <dir or gguf>
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, print_table, write_json  # noqa: E402
from ctxcache.engine import Engine, SamplingParams  # noqa: E402
from ctxcache.engine.scheduler import EngineRequest, ServingEngine  # noqa: E402
from ctxcache.fusion import FusionContext, Planner, Segment, default_strategies  # noqa: E402
from ctxcache.kv import KVStore, MemoryTier  # noqa: E402
from ctxcache.structured import parse_tool_spec, response_constraint  # noqa: E402

SUBJECTS = ["a book", "a city", "a recipe", "a laptop", "a movie", "a planet", "a football club",
            "a song", "an employee", "a bank transfer", "a hotel booking", "a bird species",
            "a programming language", "a museum", "a car", "a weather report"]
FIELDS = ["name", "title", "year", "price", "count", "rating", "country", "color", "id", "tags",
          "active", "author", "size", "weight", "category", "owner", "score", "status", "notes",
          "language"]


def gen_schema(rng: random.Random, depth: int = 0) -> dict:
    props, req = {}, []
    for f in rng.sample(FIELDS, rng.randint(2, 5 if depth == 0 else 3)):
        kind = rng.choice(["string", "integer", "number", "boolean", "enum", "array"]
                          + (["object"] if depth == 0 else []))
        if kind == "enum":
            p = {"type": "string", "enum": rng.sample(["low", "mid", "high", "new", "old",
                                                       "red", "blue"], 3)}
        elif kind == "array":
            p = {"type": "array", "items": {"type": rng.choice(["string", "integer"])},
                 "maxItems": rng.randint(2, 4)}
        elif kind == "object":
            p = gen_schema(rng, depth + 1)
        elif kind == "string":
            p = {"type": "string", "maxLength": 40}
        else:
            p = {"type": kind}
        props[f] = p
        if rng.random() < 0.7:
            req.append(f)
    return {"type": "object", "properties": props, "required": req or [next(iter(props))],
            "additionalProperties": False}


def gen_tools(rng: random.Random, i: int) -> list[dict]:
    tools = []
    for j in range(rng.randint(1, 3)):
        s = gen_schema(rng, 1)
        tools.append({"type": "function", "function": {
            "name": f"{rng.choice(['get', 'find', 'create', 'update'])}_"
                    f"{rng.choice(FIELDS)}_{i}_{j}", "description": "a generated function",
            "parameters": s}})
    return tools


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


class Runner:
    def __init__(self, engine: Engine, concurrency: int):
        self.e = engine
        self.se = ServingEngine(engine, max_running=concurrency).start()
        self.ctx = FusionContext(engine, KVStore([MemoryTier(1 << 30)]), "bench")
        self.planner = Planner(default_strategies(), default="full")

    def submit(self, messages, max_tokens, constraint=None, tools=None):
        ids = self.e.chat_ids(messages, tools=tools)
        segs = [Segment.chunk(ids)]
        return self.se.submit(EngineRequest(lambda: self.planner.run(self.ctx, segs, "full"),
                                            SamplingParams(max_tokens=max_tokens), len(ids), 0,
                                            None, constraint))

    def run(self, jobs) -> list[dict]:
        """``jobs``: (messages, max_tokens, constraint factory or None, tools) — all submitted
        at once; the engine batches ``concurrency`` of them."""
        handles = [self.submit(m, mt, f() if f else None, t) for m, mt, f, t in jobs]
        out = []
        for h in handles:
            chunks = list(h)
            toks = [c.token_id for c in chunks if c.token_id is not None]
            tt = h.token_times
            out.append({"text": "".join(c.text for c in chunks),
                        "finish": chunks[-1].finish_reason, "tokens": toks,
                        "tpot": (tt[-1] - tt[0]) / max(1, len(tt) - 1) if len(tt) > 1 else None})
        return out


def validity(runner: Runner, n: int, seed: int, max_tokens: int):
    import jsonschema

    rng = random.Random(seed)
    schemas = [gen_schema(rng) for _ in range(n)]
    jobs = []
    for i, s in enumerate(schemas):
        subj = SUBJECTS[i % len(SUBJECTS)]
        msg = [{"role": "user", "content": f"Describe {subj} as a JSON object with the fields "
                f"{', '.join(s['properties'])}."}]
        jobs.append((msg, max_tokens, lambda s=s: response_constraint(runner.e.grammar, s),
                     None))
    t0 = time.perf_counter()
    res = runner.run(jobs)
    span = time.perf_counter() - t0
    ok = cut = bad = 0
    for r, s in zip(res, schemas):
        if r["finish"] != "stop":
            cut += 1
            continue
        try:
            jsonschema.validate(json.loads(r["text"]), s)
            ok += 1
        except (ValueError, jsonschema.ValidationError):
            bad += 1
    # what the model was writing when max_tokens cut it (the loops a grammar bound can stop)
    cut_tails = [r["text"][-160:] for r in res if r["finish"] != "stop"][:10]
    return {"schemas": n, "finished": ok + bad, "valid": ok, "invalid": bad,
            "cut_by_max_tokens": cut, "valid_share_of_finished": ok / max(1, ok + bad),
            "answer_tokens_p50": pct([len(r["tokens"]) for r in res], 50),
            "answer_tokens_max": max((len(r["tokens"]) for r in res), default=0),
            "cut_tails": cut_tails, "seconds": span}, res, schemas, jobs


def tool_calls(runner: Runner, n: int, seed: int, max_tokens: int):
    import jsonschema

    rng = random.Random(seed + 1)
    fmt = runner.e.tool_format
    fmt.check()
    jobs, specs = [], []
    for i in range(n):
        tools = gen_tools(rng, i)
        spec = parse_tool_spec(tools, "required", rng.random() < 0.5)
        specs.append(spec)
        fn = rng.choice(tools)["function"]["name"]
        msg = [{"role": "user", "content": f"Please call {fn} for {SUBJECTS[i % len(SUBJECTS)]}."}]
        jobs.append((msg, max_tokens, lambda spec=spec: fmt.constraint(runner.e.grammar, spec),
                     tools))
    res = runner.run(jobs)
    parsed = valid = cut = 0
    for r, spec in zip(res, specs):
        if r["finish"] != "stop":
            cut += 1
            continue
        _, calls = fmt.parse(r["text"], spec)
        if calls:
            parsed += 1
            try:
                for c in calls:
                    jsonschema.validate(c.arguments, spec.functions[c.name]["parameters"])
                valid += 1
            except jsonschema.ValidationError:
                pass
    fin = n - cut
    return {"requests": n, "finished": fin, "parsed": parsed, "arguments_valid": valid,
            "cut_by_max_tokens": cut, "parse_rate": parsed / max(1, fin),
            "valid_rate": valid / max(1, fin)}


def mask_times(engine: Engine, res: list[dict], schemas: list[dict]) -> dict:
    """Mask time per token of each library, replaying the constrained answers' tokens."""
    out = {}
    g = engine.grammar
    times = []
    for r, s in zip(res, schemas):
        m = g.matcher(g.json_schema(s))
        for t in r["tokens"]:
            t0 = time.perf_counter()
            g.fill([m])
            times.append(time.perf_counter() - t0)
            if not m.consume_token(t):
                break
    out["llguidance"] = {"mask_us_p50": pct(times, 50) * 1e6, "mask_us_p99": pct(times, 99) * 1e6,
                         "tokens": len(times)}
    try:
        import xgrammar as xgr
    except ImportError:
        return out
    info = xgr.TokenizerInfo.from_huggingface(engine.tokenizer, vocab_size=engine.spec.vocab_size)
    comp = xgr.GrammarCompiler(info)
    bm = xgr.allocate_token_bitmask(1, engine.spec.vocab_size)
    times, compile_s = [], []
    for r, s in zip(res, schemas):
        t0 = time.perf_counter()
        cg = comp.compile_json_schema(json.dumps(s), any_whitespace=False)
        compile_s.append(time.perf_counter() - t0)
        m = xgr.GrammarMatcher(cg)
        for t in r["tokens"]:
            t0 = time.perf_counter()
            m.fill_next_token_bitmask(bm)
            times.append(time.perf_counter() - t0)
            if not m.accept_token(t):
                break
    out["xgrammar"] = {"mask_us_p50": pct(times, 50) * 1e6, "mask_us_p99": pct(times, 99) * 1e6,
                       "tokens": len(times), "compile_ms_p50": pct(compile_s, 50) * 1e3}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--schemas", type=int, default=200)
    ap.add_argument("--tool-prompts", type=int, default=50)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    engine = Engine.load(args.model, device=args.device, dtype=args.dtype)
    runner = Runner(engine, args.concurrency)
    try:
        runner.run([([{"role": "user", "content": "hi"}], 4, None, None)])  # warm-up
        v, res, schemas, jobs = validity(runner, args.schemas, args.seed, args.max_tokens)
        # the same prompts unconstrained, in the same engine: time per output token
        free = runner.run([(m, mt, None, t) for m, mt, _, t in jobs])
        tc = tool_calls(runner, args.tool_prompts, args.seed, args.max_tokens)
    finally:
        runner.se.close()
    tp_c = pct([r["tpot"] for r in res if r["tpot"]], 50)
    tp_f = pct([r["tpot"] for r in free if r["tpot"]], 50)
    masks = mask_times(engine, res, schemas)
    print_table(f"structured output, {args.model} on {args.device}, {args.concurrency} at a time",
                ["measure", "value"],
                [["json_schema answers valid / finished", f"{v['valid']} / {v['finished']}"],
                 ["cut by max_tokens", v["cut_by_max_tokens"]],
                 ["tool calls parsed / finished (required)", f"{tc['parsed']} / {tc['finished']}"],
                 ["tool arguments valid / finished", f"{tc['arguments_valid']} / {tc['finished']}"],
                 ["time per token, constrained (p50 ms)", round(tp_c * 1e3, 2)],
                 ["time per token, unconstrained (p50 ms)", round(tp_f * 1e3, 2)],
                 ["overhead per token", f"{(tp_c / tp_f - 1) * 100:+.1f} %"]]
                + [[f"{k} mask p50 / p99 (us)",
                    f"{m['mask_us_p50']:.0f} / {m['mask_us_p99']:.0f}"] for k, m in masks.items()])
    out = {"model": args.model, "device": args.device, "dtype": args.dtype,
           "concurrency": args.concurrency, "max_tokens": args.max_tokens,
           "validity": v, "tool_calls": tc, "tpot_constrained_p50_ms": tp_c * 1e3,
           "tpot_unconstrained_p50_ms": tp_f * 1e3, "overhead": tp_c / tp_f - 1,
           "mask_time": masks, "environment": environment(args.device)}
    write_json(f"structured_{engine.name}_{args.device.split(':')[0]}", out, args.out)


if __name__ == "__main__":
    main()
