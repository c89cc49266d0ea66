"""Plain-torch definitions of the hot-path operations — the meaning of "correct".

Every Triton kernel in ``triton_ops.py`` is tested against these functions with documented
tolerances. They compute in float32 and favour clarity over speed (explicit attention matrix).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _rotate_half(x: Tensor) -> Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rope_shift_ref(k: Tensor, delta: Tensor, inv_freq: Tensor) -> Tensor:
    """Keys ``k`` [..., T, D] rotated by ``delta`` [T] positions (RoPE, rotate-half layout)."""
    ang = delta.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]
    emb = torch.cat((ang, ang), dim=-1)
    kf = k.to(torch.float32)
    return (kf * emb.cos() + _rotate_half(kf) * emb.sin()).to(k.dtype)


def selective_attention_ref(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor,
                            scale: float, key_bias: Tensor | None = None) -> Tensor:
    """Attention of a gathered set of queries over a mixed K/V, causal by original positions.

    q [Hq, Tq, D], k/v [Hkv, Tk, D] (Hq multiple of Hkv, GQA), q_pos [Tq], k_pos [Tk],
    key_bias [Tk] added to every logit of that key (APE's log S). Returns [Hq, Tq, D] in q's dtype.
    A query with no visible key gets zeros.
    """
    hq, tq, d = q.shape
    if tq == 0:
        return q.new_zeros(hq, 0, d)
    g = hq // k.shape[0]
    kk = k.repeat_interleave(g, dim=0).float()
    vv = v.repeat_interleave(g, dim=0).float()
    s = torch.einsum("htd,hsd->hts", q.float(), kk) * scale
    if key_bias is not None:
        s = s + key_bias.float()[None, None, :]
    mask = k_pos[None, :] <= q_pos[:, None]
    s = s.masked_fill(~mask[None], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("hts,hsd->htd", p, vv).to(q.dtype)


def kv_deviation_ref(k_new: Tensor, v_new: Tensor, k_old: Tensor, v_old: Tensor) -> Tensor:
    """Per-token squared L2 distance of fresh vs cached K and V, summed over heads → [T] fp32."""
    dk = (k_new.float() - k_old.float()).pow(2).sum(dim=(0, 2))
    dv = (v_new.float() - v_old.float()).pow(2).sum(dim=(0, 2))
    return dk + dv


def topk_ref(dev: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest deviations (sorted, largest first)."""
    k = min(k, dev.numel())
    return torch.topk(dev, k).indices


def scatter_kv_ref(K: Tensor, V: Tensor, index: Tensor, k_rows: Tensor, v_rows: Tensor) -> None:
    """In place: K[:, index[i]] = k_rows[:, i] (and V), K/V [H, T, D], rows [H, n, D]."""
    K[:, index] = k_rows.to(K.dtype)
    V[:, index] = v_rows.to(V.dtype)


def assemble_kv_ref(K: Tensor, V: Tensor, sources: list[tuple[Tensor, Tensor]],
                    slot_src: Tensor, slot_tok: Tensor, slot_delta: Tensor,
                    inv_freq: Tensor) -> None:
    """In place: slot ``t`` of every layer/head of K/V [L, H, N, D] takes token
    ``slot_tok[t]`` of source ``slot_src[t]`` (sources are (k, v) pairs [L, H, T_s, D]), keys
    rotated by ``slot_delta[t]`` positions; slots whose source is −1 become zeros."""
    n = slot_src.numel()
    K[:, :, :n].zero_()
    V[:, :, :n].zero_()
    for s, (k, v) in enumerate(sources):
        at = torch.nonzero(slot_src == s).flatten()
        if at.numel() == 0:
            continue
        tok = slot_tok[at].to(k.device)
        kk = rope_shift_ref(k[:, :, tok].to(K.device), slot_delta[at].to(K.device), inv_freq)
        K[:, :, at.to(K.device)] = kk.to(K.dtype)
        V[:, :, at.to(K.device)] = v[:, :, tok].to(V.device, V.dtype)


def add_rms_norm_ref(h: Tensor, r: Tensor | None, w: Tensor, eps: float) -> Tensor:
    """``h += r`` in place (rounded to h's dtype, as a residual add is), then RMSNorm(h)·w."""
    if r is not None:
        h.add_(r)
    hf = h.float()
    y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * w.float()).to(h.dtype)


def silu_mul_ref(gu: Tensor) -> Tensor:
    """SwiGLU gate: ``silu(gu[:, :I]) · gu[:, I:]`` for gate/up fused as [T, 2I]."""
    i = gu.shape[-1] // 2
    g, u = gu[..., :i].float(), gu[..., i:].float()
    return (g * torch.sigmoid(g) * u).to(gu.dtype)


def rope_qkv_ref(qkv: Tensor, pos: Tensor, inv_freq: Tensor, hq: int, hkv: int,
                 scaling: float = 1.0) -> Tensor:
    """Fused Q/K/V rows [T, (Hq+2Hkv)·D] with Q and K rotated to ``pos`` (fp32 math) and
    multiplied by ``scaling``; V unchanged. Returns a new tensor."""
    t = qkv.shape[0]
    d = qkv.shape[1] // (hq + 2 * hkv)
    x = qkv.view(t, hq + 2 * hkv, d)
    qk = x[:, : hq + hkv].transpose(0, 1)  # [H, T, D]
    rot = rope_shift_ref(qk, pos, inv_freq).float() * scaling
    out = x.clone()
    out[:, : hq + hkv] = rot.to(qkv.dtype).transpose(0, 1)
    return out.view(t, -1)


def kv_deviation_at_ref(k_new: Tensor, v_new: Tensor, K: Tensor, V: Tensor,
                        slots: Tensor) -> Tensor:
    """``kv_deviation_ref`` against the cached rows ``K[:, slots]`` / ``V[:, slots]``."""
    return kv_deviation_ref(k_new, v_new, K[:, slots], V[:, slots])


def grouped_attention_ref(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor,
                          scale: float, lo: int, hi: int, temperature: float,
                          log_scale: float) -> Tensor:
    """APE attention: keys [lo, hi) are the parallel-encoded contexts. Their logits are divided
    by ``temperature`` and their part of the softmax is weighted as one term whose log-sum-exp
    is ``temperature · LSE(ctx / T) + log S``; the other keys (shared prefix, query, answer)
    form the second term. Causal by position. q [Hq, Tq, D], k/v [Hkv, Tk, D] → [Hq, Tq, D]."""
    hq, tq, d = q.shape
    g = hq // k.shape[0]
    kk = k.repeat_interleave(g, dim=0).float()
    vv = v.repeat_interleave(g, dim=0).float()
    s = torch.einsum("htd,hsd->hts", q.float(), kk) * scale
    vis = (k_pos[None, :] <= q_pos[:, None])[None]
    in_ctx = torch.zeros(k.shape[1], dtype=torch.bool, device=k.device)
    in_ctx[lo:hi] = True
    neg = float("-inf")
    s_ctx = (s / temperature).masked_fill(~(vis & in_ctx), neg)
    s_oth = s.masked_fill(~(vis & ~in_ctx), neg)
    lse_ctx = torch.logsumexp(s_ctx, -1, keepdim=True)
    lse_oth = torch.logsumexp(s_oth, -1, keepdim=True)
    o_ctx = torch.einsum("hts,hsd->htd", torch.softmax(s_ctx, -1).nan_to_num(0.0), vv)
    o_oth = torch.einsum("hts,hsd->htd", torch.softmax(s_oth, -1).nan_to_num(0.0), vv)
    w = torch.softmax(torch.cat([lse_oth, temperature * lse_ctx + log_scale], -1), -1)
    w = w.nan_to_num(0.0)
    return (w[..., :1] * o_oth + w[..., 1:] * o_ctx).to(q.dtype)


def paged_decode_attention_ref(q: Tensor, K: Tensor, V: Tensor, block_tables: Tensor,
                               seq_lens: Tensor, block_size: int, scale: float,
                               groups: tuple | None = None) -> Tensor:
    """One query per sequence over its paged K/V (decode): q [B, Hq, D]; K/V [Hkv, slots, D]
    (one layer of a ``PagedKVPool``); block_tables [B, W] (block ids, row b's first
    ceil(seq_lens[b] / block_size) entries valid); seq_lens [B] keys per sequence (the new
    token's own row included). Every key of a sequence is visible to its query (the new token
    sits after all of them). Returns [B, Hq, D]; a sequence of length 0 gets zeros."""
    b_, hq, d = q.shape
    g = hq // K.shape[0]
    out = q.new_zeros(b_, hq, d)
    lens = seq_lens.tolist()
    tables = block_tables.tolist()
    for b in range(b_):
        n = int(lens[b])
        if n <= 0:
            continue
        blocks = torch.as_tensor(tables[b][:-(-n // block_size)], dtype=torch.long)
        slots = (blocks[:, None] * block_size + torch.arange(block_size)[None]).reshape(-1)[:n]
        slots = slots.to(K.device)
        kk = K.index_select(1, slots).repeat_interleave(g, dim=0).float()  # [Hq, n, D]
        if groups is not None and int(groups[0][b]) < int(groups[1][b]):
            kp = torch.arange(n, device=K.device)
            out[b] = grouped_attention_ref(
                q[b][:, None], K.index_select(1, slots), V.index_select(1, slots),
                kp[-1:], kp, scale, int(groups[0][b]), int(groups[1][b]),
                float(groups[2][b]), float(groups[3][b]))[:, 0]
            continue
        vv = V.index_select(1, slots).repeat_interleave(g, dim=0).float()
        s = torch.einsum("hd,hnd->hn", q[b].float(), kk) * scale
        out[b] = torch.einsum("hn,hnd->hd", torch.softmax(s, -1), vv).to(q.dtype)
    return out
