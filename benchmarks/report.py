"""Render the committed benchmark JSON (benchmarks/results/) as the Markdown tables of README.md.

    python benchmarks/report.py > /tmp/results.md
"""

from __future__ import annotations

import json
from pathlib import Path

R = Path(__file__).resolve().parent / "results"


def load(name: str):
    p = R / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def table(headers, rows) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        out.append("| " + " | ".join(_f(c) for c in r) + " |")
    return "\n".join(out)


def _f(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "–"
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "–" if v is None else str(v)


def engine() -> str:
    parts = []
    for name, title in (("engine_cuda_llama-3-8b", "GPU (H100), random Llama-3-8B weights, bf16"),
                        ("engine_cpu_smollm2-135m-instruct", "CPU (2 cores), SmolLM2-135M, fp32")):
        d = load(name)
        if not d:
            continue
        parts.append(f"**{title}**\n\n" + table(
            ["context", "prefill ours (ms)", "prefill HF (ms)", "ours / HF", "decode step ours (ms)",
             "decode step HF DynamicCache (ms)", "decode speed-up"],
            [[r["context"], r["prefill_ours_s"] * 1e3, r["prefill_hf_s"] * 1e3,
              r["prefill_ratio_ours_over_hf"], r["decode_step_ours_s"] * 1e3,
              r["decode_step_hf_s"] * 1e3, r["decode_speedup_vs_hf"]] for r in d["rows"]]))
    return "\n\n".join(parts)


def kvstore() -> str:
    parts = []
    for name, title in (("kvstore_cuda", "GPU machine"), ("kvstore_cpu", "CPU machine")):
        d = load(name)
        if not d:
            continue
        parts.append(f"**{title}** — {d['tokens']} tokens × 128 KiB = "
                     f"{d['kv_bytes'] / 2**30:.2f} GiB per operation\n\n" + table(
                         ["tier", "op", "store (ms)", "raw (ms)", "raw operation", "store / raw"],
                         [[r["tier"], r["op"], r["store_s"] * 1e3, r["raw_s"] * 1e3, r["raw"],
                           r["store_over_raw_time"]] for r in d["tiers"]]))
        if d.get("codecs"):
            parts.append("Codecs on the real SmolLM2 K/V of a real passage:\n\n" + table(
                ["codec", "compression", "rel. error K", "rel. error V", "next-token KL",
                 "same top-1"],
                [[c["codec"], c["compression"], c["rel_err_k"], c["rel_err_v"],
                  c["next_token_kl"], c["same_argmax"]] for c in d["codecs"]]))
    return "\n\n".join(parts)


def fidelity() -> str:
    parts = []
    for name in ("fidelity_qwen2.5-coder-0.5b-instruct",
                 "before/fidelity_qwen2.5-coder-0.5b-instruct_h100", "fidelity"):
        d = load(name)
        if not d:
            continue
        env = d.get("env") or {}
        a = d.get("args") or {}
        title = (f"{d['model']} ({a.get('dtype', '')}, {env.get('gpu') or env.get('device', '')})"
                 + (" — earlier run" if name.startswith("before/") else ""))
        parts.append(
            f"**{title}** — SQuAD v1.1 dev, {d['prompts']} prompts of 4–10 passages (mean "
            f"{d['mean_prompt_tokens']:.0f} tokens), greedy {a.get('tokens', 32)} tokens:\n\n"
            + table(
                ["strategy", "first-token KL", "top-1 agree", "greedy answer exact",
                 "matching tokens", "F1 vs gold", "F1 vs full answer", "F1 % of full",
                 "prefill FLOPs share"],
                [[s["strategy"], s["first_token_kl"], s["top1_agreement"], s["greedy32_exact"],
                  s["greedy_match_tokens"], s["f1_gold"], s["f1_vs_full_answer"],
                  (s["f1_gold_share_of_full"] or 0) * 100, s["compute_fraction"]]
                 for s in d["summary"]]))
        if d.get("auto"):
            parts.append(f"`auto` served: {d['auto']['served']}")
        agreement = (d.get("auto") or {}).get("answer_agreement")
        if agreement:
            parts.append("`auto`'s answer agreement with full prefill while proving "
                         "(strategy, length bucket: checks, mean F1, share with F1 ≥ 0.8, "
                         "its 90 % lower bound): " + "; ".join(
                             f"{k}: {v['n']}, {v['mean_f1']:.2f}, {v['agreement']:.2f}, "
                             f"{v['agreement_lower_bound']:.2f}" for k, v in agreement.items()))
    return "\n\n".join(parts) or "(not run)"


def ttft() -> str:
    parts = []
    for name in ("ttft_qwen2.5-coder-0.5b-instruct", "ttft_llama-3-8b"):
        d = load(name)
        if not d:
            continue
        hw = d["hardware"]
        full = {r["context"]: r for r in d["rows"] if r["strategy"] == "full prefill (ours)"}
        hf = {r["context"]: r for r in d["rows"] if r["strategy"] == "full prefill (HF SDPA)"}
        ctxs = sorted(full)
        names = list(dict.fromkeys(r["strategy"] for r in d["rows"] if r["mode"] != "-"))
        rows = [["full prefill, ours (ms)", "-"] + [full[c]["ttft_s"] * 1e3 for c in ctxs],
                ["full prefill, HF SDPA (ms)", "-"] + [hf[c]["ttft_s"] * 1e3 for c in ctxs]]
        for mode in ("gpu", "pinned"):
            for n in names:
                cells = [next((f"{r['ttft_s'] * 1e3:.1f} ms ({r['speedup_vs_full']:.2f}×)"
                               for r in d["rows"] if r["strategy"] == n and r["mode"] == mode
                               and r["context"] == c), "–") for c in ctxs]
                if any(c != "–" for c in cells):
                    rows.append([n, mode] + cells)
        parts.append(f"**{d['model']}** (bf16; same run: bf16 matmul {hw['bf16_tflops']:.0f} "
                     f"TFLOP/s, pinned host→GPU {hw['h2d_GBps']:.0f} GB/s). TTFT and speed-up "
                     "over our full prefill:\n\n" + table(
                         ["strategy", "chunk KV in"] + [f"{c // 1024}K" for c in ctxs], rows))
    return "\n\n".join(parts) or "(not run)"


def profile() -> str:
    """Where TTFT goes: before (the first version) and now, same GPU, per phase."""
    rows = []
    for label, path in (("before", "before/profile_ttft_qwen2.5-0.5b"),
                        ("now", "profile_ttft_qwen2.5-coder-0.5b-instruct"),
                        ("before", "before/profile_ttft_llama-3-8b"),
                        ("now", "profile_ttft_llama-3-8b")):
        d = load(path)
        if not d:
            continue
        for r in d["rows"]:
            ph = r.get("phases_ms", {})
            rows.append([label, r["model"].replace("random:", "") + " (random)"
                         if r["model"].startswith("random") else r["model"], r["context"],
                         r["strategy"], r["wall_ms"], r["kernels"], r["host_syncs"],
                         ph.get("resolve"), ph.get("lookup"),
                         ph.get("assembly", ph.get("load")),
                         ph.get("layers", ph.get("recompute", ph.get("prefill")))])
    return table(["", "model", "context", "strategy", "TTFT (ms)", "kernels", "host syncs",
                  "resolve (ms)", "lookup (ms)", "assembly (ms)", "layer loop (ms)"], rows)


def longctx() -> str:
    d = load("longctx_qwen2.5-coder-0.5b-instruct")
    if not d:
        return "(not run)"
    s = d["summary"]
    lengths = sorted({r["length"] for r in s})
    names = list(dict.fromkeys(r["strategy"] for r in s))
    rows = []
    for n in names:
        by = {r["length"]: r for r in s if r["strategy"] == n}
        rows.append([n] + [f"{by[x]['accuracy'] * 100:.0f} % ({by[x]['ttft_ms']:.0f} ms)"
                           for x in lengths])
    gpu = (d.get("env") or {}).get("gpu") or "GPU"
    return (f"{d['model']}, bf16 on the {gpu}; {d['args']['per_cell']} needles per (length, "
            f"depth) × {len(d['args']['depths'].split(','))} depths = "
            f"{s[0]['n']} prompts per length. Accuracy (median TTFT):\n\n"
            + table(["strategy"] + [f"{round(x / 1024)}K" for x in lengths], rows))


def kernels() -> str:
    d = load("kernels_gpu")
    if not d:
        return "(not run)"
    return (f"HBM copy bandwidth measured: {d['hbm_copy_GBps']:.0f} GB/s.\n\n" + table(
        ["kernel", "tokens", "Triton (ms)", "torch (ms)", "GB/s", "of HBM", "TFLOP/s"],
        [[r["kernel"], r["T"], r["triton_ms"], r["torch_ms"], r["GBps"], r["of_hbm"],
          r.get("TFLOPs")] for r in d["rows"]]) + "\n\nMax error vs the torch reference at full "
            "size: " + ", ".join(f"{c[0]} {c[2]:.2g}" for c in d["checks"][:6]))


def semantic() -> str:
    d = load("semantic")
    if not d:
        return "(not run)"
    q = d["quality"]["summary"]
    return ("Scale (synthetic 384-d vectors, SQLite payloads, lookup excludes embedding; MiniLM "
            f"embedding on this CPU: {d['embed_ms_per_query']:.1f} ms/query):\n\n" + table(
                ["entries", "inserts/s", "hit p50 (ms)", "hit p99 (ms)", "miss p50 (ms)",
                 "miss p99 (ms)", "near-duplicate recall"],
                [[r["entries"], r["insert_per_s"], r["hit_p50_ms"], r["hit_p99_ms"],
                  r["miss_p50_ms"], r["miss_p99_ms"], r["near_duplicate_recall"]]
                 for r in d["scale"]]) +
            f"\n\nQuality on the {d['quality']['pairs']} labelled pairs of `fow-cache` (2-fold: "
            "thresholds calibrated on one half for ≤ 5 % false hits, evaluated on the other):\n\n"
            + table(["policy", "hit rate", "false-hit rate"],
                    [["category-aware", q["category_aware"]["hit_rate"],
                      q["category_aware"]["false_hit_rate"]],
                     ["global threshold at the same false-hit rate",
                      q["global_same_fhr"]["hit_rate"], q["global_same_fhr"]["false_hit_rate"]],
                     ["global threshold calibrated alike", q["global_calibrated"]["hit_rate"],
                      q["global_calibrated"]["false_hit_rate"]]]))


def semantic_scale() -> str:
    d = load("semantic_scale")
    if not d:
        return "(not run)"
    rows = d["rows"]
    return (f"{rows[0]['queries']} casual rewrites of stored sentences looked up in indexes of "
            "real MiniLM vectors of distinct real sentences (BIG-bench); lookup = the whole "
            "`SemanticCache.lookup` (HNSW + SQLite payload + policy + language gate), embedding "
            "excluded; index = the HNSW query alone; 2 CPU cores:\n\n" + table(
                ["entries", "M", "ef", "ANN recall@1", "paraphrase@1 exact",
                 "paraphrase@1 HNSW", "lookup p50 (ms)", "lookup p99 (ms)", "index p50 (ms)",
                 "index p99 (ms)", "build (s)"],
                [[r["entries"], r["M"], r["ef"], r["ann_recall_at_1"],
                  r["paraphrase_recall_at_1_exact"], r["paraphrase_recall_at_1_hnsw"],
                  r["p50_ms"], r["p99_ms"], r["index_p50_ms"], r["index_p99_ms"],
                  r["build_s"]] for r in rows]))


def semantic_multidomain() -> str:
    d = load("semantic_multidomain")
    if not d:
        return "(not run)"
    names = {"category_aware": "category-aware, thresholds calibrated per category",
             "global_same_fhr": "one global threshold at the same false hits (oracle)",
             "global_calibrated": "one global threshold calibrated alike",
             "shipped_thresholds": "shipped per-category defaults",
             "gptcache_default": "GPTCache 0.1.44 default (0.8)"}
    for bound in d["max_error_rate"]:
        names[f"verified_{bound:g}_both_passes"] = (f"verified, ≤ {bound:.0%} wrong hits, "
                                                    "learned online (both passes)")
        names[f"verified_{bound:g}_second_pass"] = f"verified, ≤ {bound:.0%} wrong hits (2nd pass)"
    make = "; ".join(f"{dom}: " + ", ".join(f"{n} {k}" for k, n in kinds.items())
                     for dom, kinds in d["make_up"].items())
    return (f"{d['queries']} labelled queries over {d['stored']} stored requests ({make}). "
            "2-fold: calibrated on one half, evaluated on the other; false-hit rate = wrong "
            "hits / all lookups:\n\n" + table(
                ["policy", "hit rate", "false-hit rate", "wrong among hits"],
                [[names.get(k, k), v["hit_rate"], v["false_hit_rate"], v["error_among_hits"]]
                 for k, v in d["summary"].items()]))


def gateway() -> str:
    d = load("gateway")
    if not d:
        return "(not run)"
    keys = ["hit_exact_p50_ms", "hit_exact_p99_ms", "hit_paraphrase_p50_ms",
            "hit_paraphrase_p99_ms", "paraphrase_hit_rate", "embedding_p50_ms",
            "miss_gateway_p50_ms", "miss_direct_p50_ms", "miss_overhead_p50_ms",
            "miss_overhead_minus_embedding_ms"]
    return table(["metric", "value"], [[k, d.get(k)] for k in keys]) + "\n\n" + table(
        ["concurrent clients", "requests", "req/s", "200", "429"],
        [[c["clients"], c["requests"], c["req_per_s"], c["ok"], c["429"]]
         for c in d["concurrency"]])


def reliability() -> str:
    d = load("reliability")
    if not d:
        return "(not run)"
    o = d["overload"]
    return (f"Open-loop arrivals at {o['factor']:g}× the sustainable rate "
            f"({o['sustainable_req_per_s']:.2f} req/s, CPU, SmolLM2):\n\n" + table(
                ["metric", "value"], [[k, v] for k, v in o.items()]))


def agents() -> str:
    parts = []
    for path in sorted(R.glob("agents_*.json")):
        d = json.loads(path.read_text())
        a = d["args"]
        parts.append(
            f"**{d['model']}** ({a['dtype']}, {d['env'].get('device', a['device'])}): "
            f"{a['agents']} agents × {a['episodes']} episodes, ~{a['shared']} shared tokens "
            f"under ~{a['prefix']}-token private prefixes\n\n" + table(
                ["strategy", "shared tokens reused", "TTFT (ms)", "× vs no sharing",
                 "same answer as no sharing", "answer F1"],
                [[s["strategy"], s["shared_reuse_rate"], s["ttft_ms"], s["speedup_vs_no_sharing"],
                  s["agreement_with_no_sharing"], s["answer_f1"]] for s in d["summary"]]))
    return "\n\n".join(parts) or "(not run)"


if __name__ == "__main__":
    for title, fn in (("Embedded engine (`benchmarks/engine.py`)", engine),
                      ("TTFT of reuse strategies (`benchmarks/ttft.py`)", ttft),
                      ("Where TTFT goes (`benchmarks/profile_ttft.py`)", profile),
                      ("Long-context retrieval (`benchmarks/longctx.py`)", longctx),
                      ("Triton kernels (`benchmarks/kernels_gpu.py`)", kernels),
                      ("Reuse fidelity (`benchmarks/fidelity.py`)", fidelity),
                      ("Agents sharing context (`benchmarks/agents.py`)", agents),
                      ("Chunk KV store (`benchmarks/kvstore.py`)", kvstore),
                      ("Semantic cache (`benchmarks/semantic.py`)", semantic),
                      ("Semantic cache at 1M real sentences (`benchmarks/semantic_scale.py`)",
                       semantic_scale),
                      ("Semantic cache, multi-domain (`benchmarks/semantic_multidomain.py`)",
                       semantic_multidomain),
                      ("Gateway (`benchmarks/gateway.py`)", gateway),
                      ("Overload (`benchmarks/overload.py`)", reliability)):
        print(f"### {title}\n\n{fn()}\n")
