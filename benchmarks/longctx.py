"""Long-context retrieval with every reuse strategy: does the answer survive reuse at 4K–32K?

Haystacks are real text: SQuAD v1.1 dev paragraphs (shipped in the ``bigbench`` package),
grouped into retrieval chunks of about ``--chunk`` tokens. The *needle* is a fact — a code with
a random number for a named place ("The access code for the east tower is 48213.") — written
into one real paragraph at a random sentence; that paragraph is its own chunk, placed at a depth
of 0–100 % of the context. The question asks for the code, so the answer is unambiguous and a
model that reads the context finds it (SQuAD's own questions would measure the model's reading
comprehension, not the reuse). The prompt is the RAG layout the gateway uses: system prompt,
chunks, question.

Per (length, depth, strategy): accuracy (a gold answer appears in the greedy answer),
agreement with full prefill (same answer correctness, and the same first tokens), TTFT on the
GPU, and the share of prefill FLOPs computed. Chunk caches are warm (built on a first pass) as
in steady-state RAG traffic. Writes JSON and one heat map (depth × length) per strategy.

    python benchmarks/longctx.py --model qwen2.5-coder-0.5b-instruct --lengths 4096,8192,16384,32768
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import environment, print_table, write_json  # noqa: E402
from benchmarks.fidelity import SYSTEM, normalize  # noqa: E402
from ctxcache.datasets import (  # noqa: E402
    DatasetUnavailableError, coqa_stories, python_docs, squad_dev,
)
from ctxcache.engine import Engine, SamplingParams  # noqa: E402
from ctxcache.engine.generate import stream_from_kv  # noqa: E402
from ctxcache.fusion import FusionContext, Segment, make_strategy  # noqa: E402
from ctxcache.fusion.planner import serving_planner  # noqa: E402
from ctxcache.kv import KVStore, MemoryTier  # noqa: E402

FIXED = {"long_temperature": None}
# "full (repeat)": full prefill again on the same prompt right after the others (is the first
# build of a prompt slower than a repeat? the timing of every row depends on it)
STRATEGIES = {"full": ("full", {}), "full (repeat)": ("full", {}), "naive": ("naive", {}),
              "cacheblend 5%": ("cacheblend", {"recompute_ratio": 0.05, "sink_tokens": 0}),
              "cacheblend 15%": ("cacheblend", {"recompute_ratio": 0.15, "sink_tokens": 0}),
              "cacheblend 30%": ("cacheblend", {"recompute_ratio": 0.30, "sink_tokens": 0}),
              "cacheblend 15% sink4": ("cacheblend", {"recompute_ratio": 0.15,
                                                      "sink_tokens": 4}),
              "cacheblend 15% per-chunk": ("cacheblend", {"recompute_ratio": 0.15,
                                                          "per_chunk": True,
                                                          "sink_tokens": 0}),
              "cacheblend 15% sink4 per-chunk": ("cacheblend", {
                  "recompute_ratio": 0.15, "sink_tokens": 4, "per_chunk": True}),
              "cacheblend 15% sink16": ("cacheblend", {"recompute_ratio": 0.15,
                                                       "sink_tokens": 16}),
              # question focus (CacheBlend's module docstring), on at every length here
              "cacheblend 15% focus T=0.5": ("cacheblend", {
                  "recompute_ratio": 0.15, "query_temperature": 0.5, "focus_from": 0}),
              "cacheblend 15% focus T=0.7": ("cacheblend", {
                  "recompute_ratio": 0.15, "query_temperature": 0.7, "focus_from": 0}),
              "cacheblend 15% sink16 focus T=0.7": ("cacheblend", {
                  "recompute_ratio": 0.15, "sink_tokens": 16, "query_temperature": 0.7,
                  "focus_from": 0}),
              "cachecraft 15%": ("cachecraft", {"base_ratio": 0.15}),
              "ape": ("ape", {}),
              # APE's temperature / scale, for the sweep of the APE quality gate (one T at
              # every length: no long-context switch)
              "ape T=1 S=1": ("ape", {"temperature": 1.0, "scale": 1.0, **FIXED}),
              "ape T=0.7 S=0.9": ("ape", {"temperature": 0.7, "scale": 0.9, **FIXED}),
              "ape T=0.5 S=0.9": ("ape", {"temperature": 0.5, "scale": 0.9, **FIXED}),
              "ape T=0.9 S=0.5": ("ape", {"temperature": 0.9, "scale": 0.5, **FIXED})}
DEFAULT = ["full", "naive", "cacheblend 5%", "cacheblend 15%", "cacheblend 30%",
           "cachecraft 15%", "ape", "default", "auto"]
# planners, as the gateway builds them (``serving_planner``): its configured default strategy
# (CacheBlend, routed to APE from 24K tokens) under the cost guard, and ``auto`` proving
# strategies by answer agreement
PLANNERS = {"default": ("cacheblend", {}), "auto": ("auto", {})}


KINDS = ("access", "security", "storage", "entry", "vault", "alarm", "gate", "locker")
PLACES = ("east tower", "north warehouse", "blue laboratory", "archive room", "marina office",
          "old library", "river station", "west garage", "harbour depot", "signal house",
          "glass pavilion", "stone chapel", "valley clinic", "copper mill", "summit hut")


def needle(rng: random.Random, paragraph: str) -> tuple[str, str, str, str]:
    """(paragraph with the fact written in, question, answer, the fact)."""
    kind, place = rng.choice(KINDS), rng.choice(PLACES)
    code = str(rng.randint(10000, 99999))
    fact = f"The {kind} code for the {place} is {code}."
    parts = paragraph.split(". ")
    at = rng.randint(0, len(parts))
    text = ". ".join(parts[:at] + [fact.rstrip(".")] + parts[at:])
    return text, f"What is the {kind} code for the {place}?", code, fact


HAYSTACKS = ("squad", "coqa", "python-docs")


def haystack_paragraphs(name: str) -> list[str]:
    """Real paragraphs to build haystacks from: ``squad`` (Wikipedia, SQuAD v1.1 dev),
    ``coqa`` (CoQA stories: literature, news, exams, Reddit, Wikipedia) — both downloaded once
    — or ``python-docs`` (the Python language reference, shipped with Python: technical prose
    with grammar and code, available on any machine)."""
    try:
        if name == "squad":
            return [p["context"] for a in squad_dev() for p in a["paragraphs"]]
        if name == "coqa":
            return coqa_stories()
    except DatasetUnavailableError as e:
        raise SystemExit(f"{e}\n(--haystack python-docs needs no download)") from None
    if name == "python-docs":
        return [p for paras in python_docs(300).values() for p in paras]
    raise SystemExit(f"unknown haystack {name!r}: one of {', '.join(HAYSTACKS)}")


def build_haystacks(engine: Engine, lengths: list[int], depths: list[float], per_cell: int,
                    chunk: int, seed: int, paragraphs: list[str] | None = None) -> list[dict]:
    rng = random.Random(seed)
    paras = list(paragraphs if paragraphs is not None else haystack_paragraphs("squad"))
    rng.shuffle(paras)
    toks = [engine.encode(f"{p}\n\n") for p in paras]
    overhead = len(engine.encode(SYSTEM)) + 40
    out = []
    for n in lengths:
        for depth in depths:
            for _ in range(per_cell):
                hi = rng.randrange(len(paras))
                text, question, code, fact = needle(rng, paras[hi])
                gold = engine.encode(f"{text}\n\n")
                budget = n - overhead - len(gold)
                fillers, cur, used = [], [], 0
                order = [i for i in range(len(paras)) if i != hi]
                rng.shuffle(order)
                for i in order:  # other paragraphs, packed into ~chunk-token chunks
                    t = toks[i]
                    if used + len(t) > budget:
                        break
                    cur += t
                    used += len(t)
                    if len(cur) >= chunk:
                        fillers.append(cur)
                        cur = []
                if cur:
                    fillers.append(cur)
                at = round(depth * len(fillers))
                chunks = fillers[:at] + [gold] + fillers[at:]
                out.append({"length": n, "depth": depth, "question": question,
                            "answers": [code], "chunks": chunks, "gold_index": at,
                            "fact": fact})
    return out


def segments(engine: Engine, h: dict) -> list[Segment]:
    segs = [Segment.prefix(engine.encode(SYSTEM))]
    segs += [Segment.chunk(c) for c in h["chunks"]]
    segs.append(Segment.text(engine.encode(
        f"Question: {h['question']}<|im_end|>\n<|im_start|>assistant\n")))
    return segs


def answer(engine: Engine, res, n: int) -> list[int]:
    return [c.token_id for c in stream_from_kv(engine, res.kv, res.logits,
                                               SamplingParams(max_tokens=n),
                                               context_group=res.context_group,
                                               storage=res.storage) if c.token_id is not None]


def correct(text: str, answers: list[str]) -> bool:
    t = normalize(text)
    return any(normalize(a) and normalize(a) in t for a in answers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--lengths", default="4096,8192,16384,32768")
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--per-cell", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--strategies", default=",".join(DEFAULT))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--haystack", default="squad", choices=HAYSTACKS,
                    help="real text around the needle (python-docs needs no download)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    engine = Engine.load(args.model, device=args.device, dtype=args.dtype)
    # a "32K" haystack on a 32K-context model leaves room for the answer
    lengths = [min(int(x), engine.spec.max_positions - args.tokens - 64)
               for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    hay = build_haystacks(engine, lengths, depths, args.per_cell, args.chunk, args.seed,
                          haystack_paragraphs(args.haystack))
    # interleaved lengths: a planner sees traffic of every length from the start
    k = len(hay) // len(lengths)
    hay = [hay[j * k + i] for i in range(k) for j in range(len(lengths))]
    names = args.strategies.split(",")
    strats = {k: make_strategy(STRATEGIES[k][0], **STRATEGIES[k][1]) for k in names
              if k in STRATEGIES}
    planners = {k: serving_planner(engine, default=PLANNERS[k][0], cacheblend=PLANNERS[k][1],
                                   seed=args.seed)
                for k in names if k in PLANNERS}
    store = KVStore([MemoryTier(40 << 30, args.device)], eviction="lru")
    ctx = FusionContext(engine, store, reserve_tokens=args.tokens)
    warm_full = make_strategy("full")
    cells: dict = collections.defaultdict(list)
    t_start = time.perf_counter()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for i, h in enumerate(hay):
        segs = segments(engine, h)
        # warm pass (steady-state RAG traffic): chunk caches exist, Cache-Craft has seen them
        for s in strats.values():
            if s.name in ("naive", "cachecraft", "ape"):
                s.build(ctx, segs)
        # and one untimed full prefill of this prompt, so every row is timed in the same state:
        # on the H200 the first build on a new prompt was ~40 ms slower than a repeat of it
        # (0.5B: 53 vs 9.6 ms at 4K, 188 vs 143 ms at 32K; results/..._repeat.json), which
        # made the full row (timed first) look slower than it is under load
        warm_full.build(ctx, segs)
        sync()
        ref_text, ref_ok = None, None
        for name in list(strats) + list(planners):
            sync()
            t0 = time.perf_counter()
            res = planners[name].run(ctx, segs) if name in planners else \
                strats[name].build(ctx, segs)
            res.logits.argmax().item()
            ttft = time.perf_counter() - t0
            ids = answer(engine, res, args.tokens)
            if name in planners:  # its answer checks run after the request (idle time)
                planners[name].drain()
            text = engine.decode_ids(ids)
            ok = correct(text, h["answers"])
            if name == "full":
                ref_text, ref_ok = text, ok
            cells[(name, h["length"], h["depth"])].append({
                "ok": ok, "agree": (ok == ref_ok) if ref_ok is not None else None,
                "same_text": text == ref_text if ref_text is not None else None,
                "ttft_s": ttft, "compute": res.stats.compute_fraction,
                "served": res.stats.strategy})
        if (i + 1) % 10 == 0 or i == len(hay) - 1:
            print(f"  {i + 1}/{len(hay)} prompts, {time.perf_counter() - t_start:.0f}s",
                  flush=True)

    def mean(xs):
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else float("nan")

    summary = []
    for name in list(strats) + list(planners):
        for n in lengths:
            rs = [r for d in depths for r in cells[(name, n, d)]]
            full_rs = [r for d in depths for r in cells[("full", n, d)]]
            acc, full_acc = mean([r["ok"] for r in rs]), mean([r["ok"] for r in full_rs])
            slower = sum(r["ttft_s"] > f["ttft_s"] for r, f in zip(rs, full_rs))
            summary.append({
                "strategy": name, "length": n, "n": len(rs), "accuracy": acc,
                "accuracy_share_of_full": acc / full_acc if full_acc else None,
                "agreement_with_full": mean([r["agree"] for r in rs]),
                "same_answer_text": mean([r["same_text"] for r in rs]),
                "ttft_ms": 1e3 * sorted(r["ttft_s"] for r in rs)[len(rs) // 2],
                "speedup_vs_full": (sorted(f["ttft_s"] for f in full_rs)[len(rs) // 2]
                                    / sorted(r["ttft_s"] for r in rs)[len(rs) // 2]),
                "slower_than_full": slower,
                "compute_fraction": mean([r["compute"] for r in rs]),
                "by_depth": {str(d): mean([r["ok"] for r in cells[(name, n, d)]])
                             for d in depths},
                "served": dict(collections.Counter(r["served"] for r in rs)),
            })
    print_table(f"long-context retrieval — {args.model} {args.dtype} on {args.device}, "
                f"{args.per_cell} prompts per (length, depth)",
                ["strategy", "length", "accuracy", "% of full", "agrees w/ full", "same text",
                 "TTFT ms", "FLOPs share"],
                [[s["strategy"], s["length"], s["accuracy"],
                  100 * (s["accuracy_share_of_full"] or 0), s["agreement_with_full"],
                  s["same_answer_text"], s["ttft_ms"], s["compute_fraction"]] for s in summary])
    for k, pl in planners.items():
        print(f"{k}: {pl.describe()}")
    tag = os.path.basename(args.model.rstrip("/")).removesuffix(".gguf")
    if args.haystack != "squad":  # results over another haystack sit beside the SQuAD ones
        tag += f"_{args.haystack}"
    path = write_json(f"longctx_{tag}", {
        "benchmark": "longctx", "model": engine.name, "dtype": args.dtype,
        "env": environment(args.device), "args": vars(args), "summary": summary,
        "planners": {k: pl.describe() for k, pl in planners.items()}, "wall_s": time.perf_counter() - t_start},
        args.out)
    plot(summary, lengths, depths, path.with_suffix(".png"))


def plot(summary, lengths, depths, path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = list(dict.fromkeys(s["strategy"] for s in summary))
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        grid = [[next(s for s in summary if s["strategy"] == name and s["length"] == n)
                 ["by_depth"][str(d)] for n in lengths] for d in depths]
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{int(d * 100)}%" for d in depths], fontsize=7)
        ax.set_title(name, fontsize=8)
        for yi, row in enumerate(grid):
            for xi, v in enumerate(row):
                ax.text(xi, yi, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w")
    axes[0][0].set_ylabel("needle depth")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
