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
