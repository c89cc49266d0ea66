"""Fidelity of every KV reuse strategy vs full prefill, on a real RAG set and a real model.

Data: SQuAD v1.1 dev (shipped in the ``bigbench`` package). Each prompt = system prompt + the
gold paragraph and 3–9 other paragraphs of the same article (shuffled) + the question. Several
questions are drawn per article, so passages recur across prompts as in real RAG traffic (chunk
caches are built on first sight and hit afterwards).

Model: any (``--model``; SmolLM2-135M-Instruct fp32 on CPU by default, Qwen2.5-Coder-0.5B on
the GPU for the figures that a 135M model is too weak to give). For each strategy and recompute
ratio: first-token KL vs full prefill, top-1 agreement, greedy match of the first 32 tokens
(exact and prefix length), answer F1 vs the gold answers and vs the full-prefill answer, share
of prefill FLOPs computed. ``auto`` is the planner proving strategies by shadow full prefills as
it serves (what it served is reported).

    python benchmarks/fidelity.py --prompts 100
    python benchmarks/fidelity.py --model qwen2.5-coder-0.5b-instruct --device cuda --dtype bf16 \
        --prompts 200
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import re
import string
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import environment, print_table, write_json  # noqa: E402
from ctxcache.datasets import squad_dev  # noqa: E402
from ctxcache.engine import Engine, SamplingParams  # noqa: E402
from ctxcache.engine.generate import stream_from_kv  # noqa: E402
from ctxcache.fusion import (  # noqa: E402
    APE, CacheBlend, CacheCraft, FullPrefill, FusionContext, NaiveReuse, Planner, PrefixReuse,
    Segment, first_token_kl,
)
from ctxcache.fusion.planner import serving_planner  # noqa: E402
from ctxcache.kv import KVStore, MemoryTier  # noqa: E402

SYSTEM = ("<|im_start|>system\nYou answer questions using the passages given. Reply with a "
          "short answer taken from the passages.<|im_end|>\n<|im_start|>user\n")


def normalize(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1(pred: str, gold: str) -> float:
    p, g = normalize(pred).split(), normalize(gold).split()
    common = collections.Counter(p) & collections.Counter(g)
    same = sum(common.values())
    if not p or not g:
        return float(p == g)
    if same == 0:
        return 0.0
    prec, rec = same / len(p), same / len(g)
    return 2 * prec * rec / (prec + rec)


def build_prompts(n: int, per_article: int, seed: int, min_pass: int, max_pass: int,
                  max_para_chars: int) -> list[dict]:
    rng = random.Random(seed)
    articles = squad_dev()
    rng.shuffle(articles)
    prompts = []
    for art in articles:
        paras = [p for p in art["paragraphs"] if len(p["context"]) <= max_para_chars]
        if len(paras) < max_pass:
            continue
        for _ in range(per_article):
            gold = rng.choice(paras)
            qa = rng.choice(gold["qas"])
            k = rng.randint(min_pass, max_pass)
            others = rng.sample([p for p in paras if p is not gold], k - 1)
            passages = [gold] + others
            rng.shuffle(passages)
            prompts.append({"title": art["title"], "question": qa["question"],
                            "answers": [a["text"] for a in qa["answers"]],
                            "passages": [p["context"] for p in passages]})
            if len(prompts) >= n:
                return prompts
    return prompts


def segments_for(engine: Engine, p: dict, order: list[int] | None = None) -> list[Segment]:
    passages = p["passages"] if order is None else [p["passages"][i] for i in order]
    segs = [Segment.prefix(engine.encode(SYSTEM))]
    segs += [Segment.chunk(engine.encode(f"Passage: {t}\n")) for t in passages]
    segs.append(Segment.text(engine.encode(
        f"Question: {p['question']}<|im_end|>\n<|im_start|>assistant\n")))
    return segs


def greedy(engine: Engine, res, n: int) -> list[int]:
    out = []
    for c in stream_from_kv(engine, res.kv, res.logits, SamplingParams(max_tokens=n),
                            context_group=res.context_group, storage=res.storage):
        if c.token_id is not None:
            out.append(c.token_id)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--per-article", type=int, default=5)
    ap.add_argument("--min-passages", type=int, default=4)
    ap.add_argument("--max-passages", type=int, default=10)
    ap.add_argument("--max-para-chars", type=int, default=700)
    ap.add_argument("--ratios", default="0,0.05,0.1,0.15,0.3,0.5")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--ape-grid", action="store_true", help="also sweep APE T and S")
    ap.add_argument("--only", default=None,
                    help="comma-separated variant names to run (e.g. cacheblend,default,auto)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    torch.manual_seed(0)
    engine = Engine.load(args.model, device=args.device, dtype=args.dtype)
    store = KVStore([MemoryTier(8 << 30, args.device)])
    ctx = FusionContext(engine, store, reserve_tokens=args.tokens)
    prompts = build_prompts(args.prompts, args.per_article, args.seed, args.min_passages,
                            args.max_passages, args.max_para_chars)
    ratios = [float(r) for r in args.ratios.split(",")]
    variants: list[tuple[str, float | None, object]] = [
        ("prefix", None, PrefixReuse()), ("naive", 0.0, NaiveReuse())]
    variants += [("cacheblend", r, CacheBlend(r, sink_tokens=0)) for r in ratios]
    variants += [("cacheblend sink4", 0.15, CacheBlend(0.15, sink_tokens=4)),
                 ("cacheblend sink4 per-chunk", 0.15,
                  CacheBlend(0.15, sink_tokens=4, per_chunk=True))]
    variants += [("cachecraft", 0.15, CacheCraft(0.15)), ("ape", None, APE())]
    if args.ape_grid:
        variants += [(f"ape T={t} S={s}", None, APE(t, s, long_temperature=None))
                     for t in (0.5, 0.7, 0.9, 1.0) for s in (0.7, 0.9, 1.0)]
    # the planners as the gateway builds them: its default strategy under the cost guard, and
    # ``auto`` proving strategies by answer agreement
    default = serving_planner(engine, seed=args.seed)
    auto = serving_planner(engine, default="auto", seed=args.seed)
    variants += [("default", None, default), ("auto", None, auto)]
    if args.only:
        keep = set(args.only.split(","))
        variants = [v for v in variants if v[0] in keep]
    full = FullPrefill()
    rows: dict[str, list[dict]] = collections.defaultdict(list)
    per_prompt = []
    t_start = time.perf_counter()
    rng = random.Random(args.seed + 1)
    for i, p in enumerate(prompts):
        segs = segments_for(engine, p)
        # prefix caching sees the same documents in another retrieval order first
        order = list(range(len(p["passages"])))
        rng.shuffle(order)
        PrefixReuse().build(ctx, segments_for(engine, p, order))
        t0 = time.perf_counter()
        ref = full.build(ctx, segs)
        t_full = time.perf_counter() - t0
        ref_ids = greedy(engine, ref, args.tokens)
        ref_text = engine.decode_ids(ref_ids)
        gold_f1 = max(f1(ref_text, a) for a in p["answers"])
        rows["full"].append({"kl": 0.0, "top1": 1.0, "exact32": 1.0, "prefix_len": len(ref_ids),
                             "f1_gold": gold_f1, "f1_full": 1.0, "compute": 1.0,
                             "time_ratio": 1.0})
        rec = {"question": p["question"], "answers": p["answers"], "tokens": len(ref.token_ids),
               "passages": len(p["passages"]), "full": ref_text, "strategies": {}}
        for name, r, strat in variants:
            label = name if r is None or name == "naive" else f"{name} r={r:g}"
            if name.startswith(("cacheblend", "cachecraft")):
                label = f"{name} r={r:g}"
            t0 = time.perf_counter()
            res = strat.run(ctx, segs) if isinstance(strat, Planner) else strat.build(ctx, segs)
            dt = time.perf_counter() - t0
            ids = greedy(engine, res, args.tokens)
            if isinstance(strat, Planner):  # its answer checks run after the request
                strat.drain()
            text = engine.decode_ids(ids)
            match = 0
            for a, b in zip(ids, ref_ids):
                if a != b:
                    break
                match += 1
            rows[label].append({
                "kl": first_token_kl(ref.logits, res.logits),
                "top1": float(res.logits.argmax() == ref.logits.argmax()),
                "exact32": float(ids == ref_ids), "prefix_len": match,
                "f1_gold": max(f1(text, a) for a in p["answers"]),
                "f1_full": f1(text, ref_text), "compute": res.stats.compute_fraction,
                "time_ratio": dt / t_full,
            })
            rec["strategies"][label] = text
        per_prompt.append(rec)
        if (i + 1) % 10 == 0 or i == len(prompts) - 1:
            print(f"  {i + 1}/{len(prompts)} prompts, {time.perf_counter() - t_start:.0f}s",
                  flush=True)

    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    summary = []
    full_f1 = mean([r["f1_gold"] for r in rows["full"]])
    for label, rs in rows.items():
        summary.append({
            "strategy": label, "n": len(rs), "first_token_kl": mean([r["kl"] for r in rs]),
            "top1_agreement": mean([r["top1"] for r in rs]),
            "greedy32_exact": mean([r["exact32"] for r in rs]),
            "greedy_match_tokens": mean([r["prefix_len"] for r in rs]),
            "f1_gold": mean([r["f1_gold"] for r in rs]),
            "f1_vs_full_answer": mean([r["f1_full"] for r in rs]),
            "f1_gold_share_of_full": mean([r["f1_gold"] for r in rs]) / full_f1 if full_f1 else None,
            "compute_fraction": mean([r["compute"] for r in rs]),
            "time_vs_full_cpu": mean([r["time_ratio"] for r in rs]),
        })
    print_table(
        f"fidelity vs full prefill — {engine.name} {args.dtype}, SQuAD dev, {len(prompts)} prompts "
        f"(mean {mean([r['tokens'] for r in per_prompt]):.0f} tokens)",
        ["strategy", "KL", "top-1", "greedy32 exact", "match tok", "F1 gold", "F1 vs full",
         "F1 % of full", "FLOPs share"],
        [[s["strategy"], s["first_token_kl"], s["top1_agreement"], s["greedy32_exact"],
          s["greedy_match_tokens"], s["f1_gold"], s["f1_vs_full_answer"],
          (s["f1_gold_share_of_full"] or 0) * 100, s["compute_fraction"]] for s in summary])
    print(f"default: {default.describe()}\nauto: {auto.describe()}")
    payload = {"benchmark": "fidelity", "model": engine.name, "prompts": len(prompts),
               "mean_prompt_tokens": mean([r["tokens"] for r in per_prompt]),
               "env": environment(args.device), "summary": summary, "args": vars(args),
               "default": default.describe(), "auto": auto.describe(), "examples": per_prompt[:10],
               "wall_s": time.perf_counter() - t_start}
    name = "fidelity" if args.model == "smollm2-135m-instruct" else \
        "fidelity_" + os.path.basename(args.model.rstrip("/")).removesuffix(".gguf")
    path = write_json(name, payload, args.out)
    plot(summary, ratios, path.with_suffix(".png"))


def plot(summary: list[dict], ratios: list[float], path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    by = {s["strategy"]: s for s in summary}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, title in ((axes[0], "f1_gold", "answer F1 vs gold"),
                              (axes[1], "first_token_kl", "first-token KL vs full")):
        xs = [r * 100 for r in ratios]
        ys = [by[f"cacheblend r={r:g}"][metric] for r in ratios]
        ax.plot(xs, ys, "o-", label="cacheblend")
        for name, marker in (("full", "k--"), ("naive", "r:"), ("prefix", "g-."), ("ape", "m--")):
            if name in by:
                ax.axhline(by[name][metric], linestyle=marker[1:], color=marker[0], label=name)
        cc = [s for s in summary if s["strategy"].startswith("cachecraft")]
        if cc:
            ax.plot([cc[0]["compute_fraction"] * 100], [cc[0][metric]], "s", label="cachecraft")
        ax.set_xlabel("recompute ratio r (%)  [cachecraft at its FLOPs share]")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
