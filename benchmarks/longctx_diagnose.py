"""Why reuse loses accuracy at long context: what differs between reused and full-prefill K/V.

On the long-context retrieval prompts of ``longctx.py`` (a needle fact in one chunk of a real
haystack, question at the end), with chunk caches warm, this measures:

* **K/V deviation per layer and position**: relative L2 distance of the reused K and V from
  full prefill's, per layer, for naive reuse and for each CacheBlend variant after recompute;
  by position inside the chunk (its first token, tokens 1–3, 4–15, the rest) and by chunk depth.
* **Attention on the needle**: at the prompt's last token (the one that produces the answer),
  per layer, the head-averaged attention mass on the needle fact's tokens, on the prompt's first
  token (the real attention sink) and on the first tokens of the other chunks (each one was its
  own sink when encoded alone) — under full prefill and under reuse.
* **Whether the recomputed set holds the tokens that matter**: the share of the needle's tokens
  and of the chunk heads among the rows CacheBlend recomputes to the last layer.
* **RoPE re-positioning precision**: real keys rotated to a far position directly (as full
  prefill does, bf16) vs rotated at the chunk's own position and shifted (as reuse does), both
  against an fp64 rotation, at positions up to 32K (Qwen2.5: theta 1e6).

    python benchmarks/longctx_diagnose.py --model qwen2.5-coder-0.5b-instruct --lengths 8192,32768
    python benchmarks/longctx_diagnose.py --plot benchmarks/results/longctx_diagnose_<model>.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import environment, print_table, write_json  # noqa: E402
from benchmarks.longctx import (  # noqa: E402
    HAYSTACKS, build_haystacks, haystack_paragraphs, segments,
)
from ctxcache.engine import Engine  # noqa: E402
from ctxcache.engine.rope import rotate_half  # noqa: E402
from ctxcache.fusion import FusionContext, make_strategy  # noqa: E402
from ctxcache.fusion.chunks import assemble, cached_mask, ids_array, lookup  # noqa: E402
from ctxcache.fusion.selective import (  # noqa: E402
    LoopInputs, SelectivePlan, _attention_probs, run_loop, selective_prefill,
)
from ctxcache.kv import KVStore, MemoryTier  # noqa: E402

VARIANTS = {"naive": ("naive", {}),
            "cacheblend 15%": ("cacheblend", {"recompute_ratio": 0.15, "sink_tokens": 0}),
            "cacheblend 15% sink4": ("cacheblend", {"recompute_ratio": 0.15, "sink_tokens": 4}),
            "cacheblend 15% per-chunk": ("cacheblend", {"recompute_ratio": 0.15,
                                                        "per_chunk": True,
                                                        "sink_tokens": 0}),
            "cacheblend 30%": ("cacheblend", {"recompute_ratio": 0.30, "sink_tokens": 0})}
BUCKETS = (("first", 0, 1), ("1-3", 1, 4), ("4-15", 4, 16), ("16+", 16, 1 << 30))


def eager_build(name: str, ctx: FusionContext, segs):
    """(K/V, slots recomputed to the last layer) of a reuse strategy, run eagerly (no CUDA
    graph, so the recomputed rows carry no padding)."""
    kind, kw = VARIANTS[name]
    strat = make_strategy(kind, **kw)
    stats, timer, pieces, ids = strat.start(ctx, segs)
    _, sources = lookup(ctx, pieces, stats)
    cached = cached_mask(len(ids), sources)
    if kind == "naive":
        rows = np.nonzero(~cached)[0]
        plan = SelectivePlan(rows, np.ones(rows.size, dtype=bool))
    else:
        plan = strat.plan(pieces, cached, ctx.engine.spec.num_layers)
    asm = assemble(ctx, len(ids), sources)
    out = selective_prefill(ctx.engine, list(ids_array(pieces)), asm.kv, plan, asm.ready)
    return out.kv, out.recomputed.cpu().numpy(), pieces


def rel_dev(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[L, T] relative L2 distance per layer and token (over heads and head dims)."""
    d = (a.float() - b.float()).pow(2).sum(dim=(1, 3)).sqrt()
    return d / b.float().pow(2).sum(dim=(1, 3)).sqrt().clamp_min(1e-6)


@torch.inference_mode()
def attention_at_last(engine: Engine, kv, ids: list[int]) -> torch.Tensor:
    """[L, N] head-averaged attention of the prompt's last token over the prompt, per layer,
    through the engine's own layers over the given K/V (a copy: the loop writes the row)."""
    n = len(ids)
    K, V = kv.k[:, :, :n].clone(), kv.v[:, :, :n].clone()
    kpos = kv.positions[:n]
    slot = torch.tensor([n - 1], device=engine.device)
    inp = LoopInputs(torch.tensor([ids[-1]], device=engine.device), slot,
                     torch.ones(1, dtype=torch.bool, device=engine.device),
                     torch.full((1,), -1, device=engine.device))
    out = []
    for layer in range(engine.spec.num_layers):
        plan = SelectivePlan(np.array([n - 1]), np.ones(1, dtype=bool), probe_layer=layer)
        res = run_loop(engine, K, V, kpos, inp, plan, {})
        out.append(res.probe[0].float())
    return torch.stack(out)


def needle_slots(engine: Engine, pieces, chunk_tokens: list[int], fact: str) -> np.ndarray:
    """Prompt slots of the needle fact's tokens (located by decoded character offsets)."""
    piece = next(p for p in pieces if p.role == "chunk" and p.token_ids == chunk_tokens)
    text = engine.decode_ids(chunk_tokens)
    at = text.find(fact.rstrip("."))
    ends = [len(engine.decode_ids(chunk_tokens[:i + 1])) for i in range(len(chunk_tokens))]
    starts = [0] + ends[:-1]
    inside = [i for i, (s, e) in enumerate(zip(starts, ends))
              if e > at and s < at + len(fact) - 1]
    return piece.start + np.asarray(inside, dtype=np.int64)


def rope_precision(engine: Engine, full_kv, positions=(1024, 4096, 16384, 32000),
                   chunk_len: int = 512, layer: int | None = None) -> list[dict]:
    """Relative error of far-position keys: direct bf16 rotation (full prefill's path) and
    rotation at the chunk's own positions + a float32 shift cast to bf16 (reuse's path), both
    against an fp64 rotation of the same pre-RoPE keys; and the resulting error of q·k logits."""
    layer = engine.spec.num_layers // 2 if layer is None else layer
    rope = engine.rope
    inv64 = rope.inv_freq.to(torch.float64).to(engine.device)
    k_post = full_kv.k[layer, :, :chunk_len].to(torch.float64)  # [H, T, D] at 0..chunk_len
    p0 = full_kv.positions[:chunk_len].to(engine.device)

    def rot64(x, p):
        f = p.to(torch.float64)[:, None] * inv64[None, :]
        e = torch.cat((f, f), dim=-1)
        return x * e.cos() + rotate_half(x) * e.sin()

    x = rot64(k_post, -p0)  # pre-RoPE keys (fp64)
    q = torch.randn_like(x[:, :64])  # generic queries for the logit error
    out = []
    for far in positions:
        if far + chunk_len > engine.spec.max_positions:
            continue
        p = p0 + far
        exact = rot64(x, p)
        direct = rope.apply(x.to(engine.dtype), p).double()  # bf16 math, as at encode time
        local = rope.apply(x.to(engine.dtype), p0)
        shifted = rope.shift(local, far).double()  # fp32 shift of the bf16 cache, cast back

        def err(y):
            return float((y - exact).norm() / exact.norm())

        def logit_err(y):
            s_ex = torch.einsum("htd,hsd->hts", q, exact)
            s_y = torch.einsum("htd,hsd->hts", q, y)
            return float((s_y - s_ex).abs().mean() / s_ex.abs().mean())

        out.append({"position": int(far), "direct_bf16_rel_err": err(direct),
                    "shifted_rel_err": err(shifted), "direct_logit_rel_err": logit_err(direct),
                    "shifted_logit_rel_err": logit_err(shifted)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--lengths", default="8192,16384,32768")
    ap.add_argument("--depths", default="0.25,0.5,0.75")
    ap.add_argument("--per-cell", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--haystack", default="squad", choices=HAYSTACKS)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None, help="only plot an earlier run's JSON")
    args = ap.parse_args()
    if args.plot:
        plot(json.loads(open(args.plot).read()), args.plot.removesuffix(".json") + ".png")
        return
    t_start = time.perf_counter()
    engine = Engine.load(args.model, device=args.device, dtype=args.dtype)
    L = engine.spec.num_layers
    lengths = [min(int(x), engine.spec.max_positions - 128) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    hay = build_haystacks(engine, lengths, depths, args.per_cell, args.chunk, args.seed,
                          haystack_paragraphs(args.haystack))
    variants = args.variants.split(",")
    store = KVStore([MemoryTier(40 << 30, args.device)], eviction="lru")
    ctx = FusionContext(engine, store)
    full = make_strategy("full")
    prompts = []
    rope_rows = None
    for h in hay:
        segs = segments(engine, h)
        ref = full.build(ctx, segs)
        n = len(ref.token_ids)
        ref_kv = ref.kv
        attn_full = attention_at_last(engine, ref_kv, ref.token_ids)
        if rope_rows is None:
            rope_rows = rope_precision(engine, ref_kv)
        rec = {"length": h["length"], "depth": h["depth"], "variants": {}}
        pieces = None
        for name in variants:
            kv, recomputed, pieces = eager_build(name, ctx, segs)
            chunk_rows = np.concatenate([np.arange(p.start, p.end) for p in pieces
                                         if p.role == "chunk"])
            heads = np.asarray([p.start for p in pieces if p.role == "chunk"])
            nd = needle_slots(engine, pieces, h["chunks"][h["gold_index"]], h["fact"])
            dk = rel_dev(kv.k[:, :, :n], ref_kv.k[:, :, :n])[:, chunk_rows]
            dv = rel_dev(kv.v[:, :, :n], ref_kv.v[:, :, :n])[:, chunk_rows]
            offs = np.concatenate([np.arange(len(p.token_ids)) for p in pieces
                                   if p.role == "chunk"])
            by_bucket = {}
            for label, lo, hi in BUCKETS:
                sel = torch.from_numpy((offs >= lo) & (offs < hi)).to(dk.device)
                by_bucket[label] = {"k": dk[:, sel].mean(1).tolist(),
                                    "v": dv[:, sel].mean(1).tolist()}
            chunk_idx = np.concatenate([np.full(len(p.token_ids), ci) for ci, p in enumerate(
                [p for p in pieces if p.role == "chunk"])])
            quart = np.minimum(3, 4 * chunk_idx // max(1, chunk_idx.max() + 1))
            by_depth = [float(dk[L // 2, torch.from_numpy(quart == qi).to(dk.device)].mean())
                        for qi in range(4)]
            attn = attention_at_last(engine, kv, ref.token_ids)
            rset = set(recomputed.tolist())
            rec["variants"][name] = {
                "k_dev_by_layer": dk.mean(1).tolist(), "v_dev_by_layer": dv.mean(1).tolist(),
                "dev_by_position_in_chunk": by_bucket, "k_dev_mid_layer_by_depth": by_depth,
                "needle_k_dev_by_layer": rel_dev(kv.k[:, :, nd], ref_kv.k[:, :, nd]).mean(1)
                .tolist(),
                "attn_needle_by_layer": attn[:, nd].sum(1).tolist(),
                "attn_sink_by_layer": attn[:, 0].tolist(),
                "attn_chunk_heads_by_layer": attn[:, heads].sum(1).tolist(),
                "recomputed_share": len(rset & set(chunk_rows.tolist())) / len(chunk_rows),
                "needle_recomputed_share": sum(int(s) in rset for s in nd) / max(len(nd), 1),
                "chunk_heads_recomputed_share": sum(int(s) in rset for s in heads)
                / max(len(heads), 1),
            }
        nd = needle_slots(engine, pieces, h["chunks"][h["gold_index"]], h["fact"])
        heads = np.asarray([p.start for p in pieces if p.role == "chunk"])
        rec["full"] = {"attn_needle_by_layer": attn_full[:, nd].sum(1).tolist(),
                       "attn_sink_by_layer": attn_full[:, 0].tolist(),
                       "attn_chunk_heads_by_layer": attn_full[:, heads].sum(1).tolist()}
        prompts.append(rec)
        print(f"  {len(prompts)}/{len(hay)} prompts, {time.perf_counter() - t_start:.0f}s",
              flush=True)
    summary = summarize(prompts, lengths, variants, L)
    print_table(f"long-context diagnosis — {args.model} on {args.device}",
                ["length", "strategy", "K dev (mean)", "K dev first tok", "needle attn",
                 "needle attn full", "chunk-head attn", "head attn full", "needle recomputed",
                 "heads recomputed"],
                [[s["length"], s["strategy"], s["k_dev"], s["k_dev_first_token"],
                  s["attn_needle"], s["attn_needle_full"], s["attn_chunk_heads"],
                  s["attn_chunk_heads_full"], s["needle_recomputed_share"],
                  s["chunk_heads_recomputed_share"]] for s in summary])
    print_table("RoPE re-positioning precision (relative error vs fp64)",
                ["position", "direct bf16", "shifted", "logit direct", "logit shifted"],
                [[r["position"], r["direct_bf16_rel_err"], r["shifted_rel_err"],
                  r["direct_logit_rel_err"], r["shifted_logit_rel_err"]] for r in rope_rows])
    tag = os.path.basename(args.model.rstrip("/")).removesuffix(".gguf")
    path = write_json(f"longctx_diagnose_{tag}", {
        "benchmark": "longctx_diagnose", "model": engine.name, "dtype": args.dtype,
        "env": environment(args.device), "args": vars(args), "summary": summary,
        "rope": rope_rows, "prompts": prompts, "wall_s": time.perf_counter() - t_start},
        args.out)
    plot(json.loads(path.read_text()), str(path.with_suffix(".png")))


def summarize(prompts: list[dict], lengths: list[int], variants: list[str], L: int
              ) -> list[dict]:
    def m(xs):
        return float(np.mean(xs)) if xs else float("nan")

    rows = []
    for n in lengths:
        ps = [p for p in prompts if p["length"] == n]
        for name in variants:
            vs = [p["variants"][name] for p in ps]
            rows.append({
                "length": n, "strategy": name,
                "k_dev": m([np.mean(v["k_dev_by_layer"][1:]) for v in vs]),
                "v_dev": m([np.mean(v["v_dev_by_layer"][1:]) for v in vs]),
                "k_dev_first_token": m([np.mean(v["dev_by_position_in_chunk"]["first"]["k"][1:])
                                        for v in vs]),
                "k_dev_rest": m([np.mean(v["dev_by_position_in_chunk"]["16+"]["k"][1:])
                                 for v in vs]),
                "needle_k_dev": m([np.mean(v["needle_k_dev_by_layer"][1:]) for v in vs]),
                "attn_needle": m([np.mean(v["attn_needle_by_layer"]) for v in vs]),
                "attn_needle_full": m([np.mean(p["full"]["attn_needle_by_layer"]) for p in ps]),
                "attn_chunk_heads": m([np.mean(v["attn_chunk_heads_by_layer"]) for v in vs]),
                "attn_chunk_heads_full": m([np.mean(p["full"]["attn_chunk_heads_by_layer"])
                                            for p in ps]),
                "attn_sink": m([np.mean(v["attn_sink_by_layer"]) for v in vs]),
                "attn_sink_full": m([np.mean(p["full"]["attn_sink_by_layer"]) for p in ps]),
                "needle_recomputed_share": m([v["needle_recomputed_share"] for v in vs]),
                "chunk_heads_recomputed_share": m([v["chunk_heads_recomputed_share"]
                                                   for v in vs]),
                "recomputed_share": m([v["recomputed_share"] for v in vs]),
            })
    return rows


def plot(data: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    prompts = data["prompts"]
    n_max = max(p["length"] for p in prompts)
    ps = [p for p in prompts if p["length"] == n_max]
    names = list(ps[0]["variants"])
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for name in names:
        ax[0].plot(np.mean([p["variants"][name]["k_dev_by_layer"] for p in ps], 0), label=name)
        ax[2].plot(np.mean([p["variants"][name]["attn_needle_by_layer"] for p in ps], 0),
                   label=name)
    ax[2].plot(np.mean([p["full"]["attn_needle_by_layer"] for p in ps], 0), "k--",
               label="full prefill")
    naive = "naive" if "naive" in names else names[0]
    for label in ("first", "1-3", "4-15", "16+"):
        ax[1].plot(np.mean([p["variants"][naive]["dev_by_position_in_chunk"][label]["k"]
                            for p in ps], 0), label=f"tokens {label}")
    ax[0].set_title(f"K deviation from full prefill by layer ({n_max} tokens)")
    ax[1].set_title(f"{naive}: K deviation by position in chunk")
    ax[2].set_title("attention of the last token on the needle")
    for a in ax:
        a.set_xlabel("layer")
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
