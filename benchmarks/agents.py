"""Multi-agent context sharing: KVCOMM vs no sharing, prefix caching, naive reuse, CacheBlend.

The KVCOMM paper's setting, on offline data: a team of ``--agents`` agents (5) answers questions
about shared material. Per episode, a SQuAD v1.1 dev article supplies the shared context —
paragraphs posted to the team as messages (~``--shared`` tokens, 1K) — and each agent has its
own prefix of ~``--prefix`` tokens (512): a persona and private notes (paragraphs of other
articles). Agents take turns; each answers its own SQuAD question about the shared paragraphs,
so every shared message is read under five different prefixes.

Reported per strategy: share of shared-message tokens reused (not recomputed), TTFT of an
agent's turn (median over turns after the first agent of each episode), and answer agreement
with no sharing (same greedy answer; F1 against SQuAD's gold answers beside it).

    python benchmarks/agents.py --model random:llama-3-8b --device cuda --dtype bf16 --episodes 3
    python benchmarks/agents.py --model qwen2.5-coder-0.5b-instruct --episodes 8 --tokens 24
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import environment, print_table, write_json  # noqa: E402
from benchmarks.fidelity import f1  # noqa: E402
from ctxcache.agents.team import cache_message  # noqa: E402
from ctxcache.datasets import squad_dev  # noqa: E402
from ctxcache.engine import Engine, SamplingParams  # noqa: E402
from ctxcache.engine.generate import stream_from_kv  # noqa: E402
from ctxcache.fusion import FusionContext, Segment, make_strategy  # noqa: E402
from ctxcache.fusion.chunks import chunk_kv  # noqa: E402
from ctxcache.fusion.prompts import rag_segments  # noqa: E402
from ctxcache.fusion.types import FusionStats  # noqa: E402
from ctxcache.kv import KVStore, MemoryTier  # noqa: E402

ROLES = ["a historian", "a fact checker", "an editor", "a student", "a librarian",
         "a journalist", "a teacher", "a researcher"]
STRATEGIES = {"no sharing": ("full", {}), "prefix caching": ("prefix", {}),
              "naive": ("naive", {}), "cacheblend 15%": ("cacheblend", {"recompute_ratio": 0.15}),
              "kvcomm": ("kvcomm", {})}


def synthetic_episodes(engine: Engine, n: int, agents: int, shared: int, prefix: int,
                       seed: int):
    """Token ids of the same shape (for random-weight models, which have no tokenizer)."""
    g = torch.Generator().manual_seed(seed)
    vocab = engine.spec.vocab_size

    def toks(k):
        return torch.randint(0, vocab, (k,), generator=g).tolist()

    out = []
    for _ in range(n):
        msgs = [toks(shared // 4) for _ in range(4)]
        team = [{"segments": [Segment.prefix(toks(prefix))] + [Segment.chunk(m) for m in msgs]
                 + [Segment.text(toks(32))], "qa": None} for _ in range(agents)]
        out.append({"messages": msgs, "team": team, "text": False})
    return out


def episodes(engine: Engine, n: int, agents: int, shared: int, prefix: int, seed: int):
    if engine.tokenizer is None:
        return synthetic_episodes(engine, n, agents, shared, prefix, seed)
    rng = random.Random(seed)
    arts = [a for a in squad_dev() if len(a["paragraphs"]) >= 8]
    rng.shuffle(arts)
    out = []
    for art in arts[:n]:
        paras = list(art["paragraphs"])
        rng.shuffle(paras)
        msgs, used = [], 0
        for p in paras:  # shared messages, ~`shared` tokens
            if used >= shared:
                break
            msgs.append(p)
            used += len(engine.encode(p["context"]))
        qs = [qa for p in msgs for qa in p["qas"]]
        rng.shuffle(qs)
        others = [p["context"] for a in arts if a is not art for p in a["paragraphs"]]
        team = []
        for i in range(agents):
            notes, ntok = [], 0
            while ntok < prefix - 40:
                t = rng.choice(others)
                notes.append(t)
                ntok += len(engine.encode(t))
            system = (f"You are agent {i + 1}, {ROLES[i % len(ROLES)]} in a research team. "
                      f"Answer briefly from the team's messages.\nYour private notes:\n"
                      + "\n".join(notes))
            qa = qs[i % len(qs)]
            team.append({"segments": rag_segments(engine, system, [
                f"reader: {p['context']}" for p in msgs], f"Question: {qa['question']}"),
                "qa": qa})
        out.append({"messages": [p["context"] for p in msgs], "team": team, "text": True})
    return out


def answer(engine, res, n):
    return engine.decode_ids([c.token_id for c in stream_from_kv(
        engine, res.kv, res.logits, SamplingParams(max_tokens=n), storage=res.storage)
        if c.token_id is not None]).strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--episodes", type=int, default=4)
    ap.add_argument("--agents", type=int, default=5)
    ap.add_argument("--shared", type=int, default=1000)
    ap.add_argument("--prefix", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=24, help="answer tokens (0: TTFT only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kvcomm", default="0.95/0.05",
                    help="KVCOMM variants to compare, comma-separated min_similarity/recompute "
                         "ratio pairs, e.g. 0.95/0.05,0.8/0.15")
    ap.add_argument("--only", default=None,
                    help="comma-separated baselines to run besides kvcomm (default: all); "
                         "'no sharing' always runs: it is the reference")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    del STRATEGIES["kvcomm"]
    if args.only:
        keep = {"no sharing", *(x.strip() for x in args.only.split(","))}
        for name in list(STRATEGIES):
            if name not in keep:
                del STRATEGIES[name]
    for variant in args.kvcomm.split(","):
        sim, _, r = variant.partition("/")
        STRATEGIES[f"kvcomm sim≥{sim} r={r or 0.05}"] = (
            "kvcomm", {"min_similarity": float(sim), "recompute_ratio": float(r or 0.05)})
    engine = Engine.load(args.model, device=args.device, dtype=args.dtype)
    eps = episodes(engine, args.episodes, args.agents, args.shared, args.prefix, args.seed)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    rows = {name: {"ttft": [], "reuse": [], "agree": [], "f1": [], "routes": {},
                   "phases": {}}
            for name in STRATEGIES}
    ref_answers = {}
    t_start = time.perf_counter()
    for name, (strategy, params) in STRATEGIES.items():
        strat = make_strategy(strategy, **params)
        for ei, ep in enumerate(eps):
            # each strategy meets the episode fresh: its own store (no cross-run warmth)
            store = KVStore([MemoryTier(16 << 30, args.device)], eviction="lru")
            ctx = FusionContext(engine, store, reserve_tokens=max(args.tokens, 1))
            for m in ep["messages"]:  # posted once: encoded prefix-free for every agent
                if ep["text"]:
                    cache_message(engine, store, ctx.namespace, "reader", m)
                else:
                    chunk_kv(ctx, m, FusionStats("agent"))
            for ai, member in enumerate(ep["team"]):
                segs = member["segments"]
                prefix_only = [segs[0], segs[-1]]
                make_strategy("prefix").build(ctx, prefix_only)  # the agent's own prefix cached
                store.flush()
                sync()
                t0 = time.perf_counter()
                res = strat.build(ctx, segs)
                res.logits.argmax().item()
                sync()
                ttft = time.perf_counter() - t0
                store.flush()
                shared = sum(len(s.token_ids) for s in segs[1:-1])
                st = res.stats
                reuse = st.extra.get("shared_reuse_rate")
                if reuse is None:  # strategies that report reused prompt tokens only
                    reuse = max(0.0, min(1.0, (st.reused_tokens - len(segs[0].token_ids))
                                         / shared)) if shared else 0.0
                r = rows[name]
                if ai > 0:
                    r["ttft"].append(ttft)
                    for k, v in st.phases.items():  # host-side seconds per phase
                        r["phases"].setdefault(k, []).append(v)
                r["reuse"].append(reuse)
                for k, v in st.extra.get("routes", {}).items():
                    r["routes"][k] = r["routes"].get(k, 0) + v
                if args.tokens and ep["text"]:
                    text = answer(engine, res, args.tokens)
                    key = (ei, ai)
                    if name == "no sharing":
                        ref_answers[key] = text
                    r["agree"].append(float(text == ref_answers.get(key)))
                    r["f1"].append(max(f1(text, a["text"]) for a in member["qa"]["answers"]))
            store.close()
        print(f"  {name}: done at {time.perf_counter() - t_start:.0f}s", flush=True)

    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    base = statistics.median(rows["no sharing"]["ttft"])
    summary = []
    for name, r in rows.items():
        t = statistics.median(r["ttft"])
        summary.append({"strategy": name, "shared_reuse_rate": mean(r["reuse"]),
                        "ttft_ms": t * 1e3, "speedup_vs_no_sharing": base / t,
                        "agreement_with_no_sharing": mean(r["agree"]) if args.tokens else None,
                        "answer_f1": mean(r["f1"]) if args.tokens else None,
                        "routes": r["routes"],
                        "phases_ms": {k: statistics.median(v) * 1e3
                                      for k, v in r["phases"].items()}})
    print_table(f"multi-agent sharing — {engine.name} {args.dtype} on {args.device}: "
                f"{args.agents} agents × {len(eps)} episodes, ~{args.shared} shared tokens, "
                f"~{args.prefix}-token prefixes",
                ["strategy", "shared reused", "TTFT ms", "× vs no sharing",
                 "same answer as no sharing", "answer F1"],
                [[s["strategy"], s["shared_reuse_rate"], s["ttft_ms"],
                  s["speedup_vs_no_sharing"], s["agreement_with_no_sharing"], s["answer_f1"]]
                 for s in summary])
    tag = os.path.basename(args.model.split(":")[-1].rstrip("/")).removesuffix(".gguf")
    write_json(f"agents_{tag}", {"benchmark": "agents", "model": engine.name,
                                 "args": vars(args), "env": environment(args.device),
                                 "summary": summary, "wall_s": time.perf_counter() - t_start},
               args.out)


if __name__ == "__main__":
    main()
