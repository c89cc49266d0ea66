"""The transformer's building blocks as the engine composes them: one layer is
``layer_in`` (residual + input norm → fused Q/K/V) → ``rope_rows`` (RoPE, optionally writing K/V
into a cache at given slots) → attention → ``layer_out`` (output projection + residual + MLP).
The residual of each block is added at the start of the next (``add_norm``), which the Triton
path does in the same pass as the norm. Full prefill, decoding and every reuse strategy are
compositions of these steps; the parity tests pin them to the HF forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ctxcache.engine.types import ContextGroup


class LayerSteps:
    """Mixed into ``Engine``: needs ``layers``, ``spec``, ``ops``, ``rope``, ``scaling``,
    ``norm``, ``lm_head`` and ``_w`` (the fused weights)."""

    def _fuse_weights(self) -> list[dict]:
        """Per layer: Q/K/V and gate/up weights concatenated into one matrix each, so a layer
        runs 4 GEMMs instead of 7, called through F.linear without module overhead. The module
        weights become views into the fused tensors: no extra memory, HF forward unchanged."""
        out = []
        for blk in self.layers:
            a, mlp = blk.self_attn, blk.mlp
            w = {}
            with torch.no_grad():
                qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
                nq, nk = a.q_proj.weight.shape[0], a.k_proj.weight.shape[0]
                a.q_proj.weight.data = qkv[:nq]
                a.k_proj.weight.data = qkv[nq:nq + nk]
                a.v_proj.weight.data = qkv[nq + nk:]
                w["qkv"] = qkv
                w["qkv_b"] = None
                if a.q_proj.bias is not None:
                    b = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
                    a.q_proj.bias.data, a.k_proj.bias.data = b[:nq], b[nq:nq + nk]
                    a.v_proj.bias.data = b[nq + nk:]
                    w["qkv_b"] = b
                gu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
                ni = mlp.gate_proj.weight.shape[0]
                mlp.gate_proj.weight.data, mlp.up_proj.weight.data = gu[:ni], gu[ni:]
                w["gate_up"] = gu
                w["inter"] = ni
            w["o"], w["down"] = a.o_proj.weight, mlp.down_proj.weight
            w["o_b"] = a.o_proj.bias
            w["ln1"], w["ln2"] = blk.input_layernorm, blk.post_attention_layernorm
            w["q_norm"] = getattr(a, "q_norm", None)
            w["k_norm"] = getattr(a, "k_norm", None)
            out.append(w)
        return out

    def _rms(self, norm, x: Tensor) -> Tensor:
        """RMSNorm with torch's fused kernel. In float32 (the CPU parity path) this is HF's
        computation; in bf16/fp16 the fused kernel accumulates in fp32 and applies the weight
        before the final rounding (HF rounds first) — one kernel instead of six."""
        eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
        if x.dtype == torch.float32:
            return norm.weight * F.rms_norm(x, (x.shape[-1],), eps=eps)
        return F.rms_norm(x, (x.shape[-1],), norm.weight, eps)

    def add_norm(self, norm, h: Tensor, resid: Tensor | None) -> Tensor:
        """``h += resid`` in place (the residual connection), then the RMSNorm ``norm`` of h.

        The residual of one block is added at the start of the next, so the Triton path does
        both in one pass over the rows."""
        if self.ops.name == "triton":
            eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
            return self.ops.add_rms_norm(h, resid, norm.weight, eps)
        if resid is not None:
            h.add_(resid)
        return self._rms(norm, h)

    def layer_in(self, layer: int, h: Tensor, resid: Tensor | None) -> Tensor:
        """Residual from the previous block + input norm → the fused Q/K/V rows [T, (Hq+2Hkv)·D]
        (Qwen3's per-head Q/K norms applied in place)."""
        w = self._w[layer]
        x = self.add_norm(w["ln1"], h, resid)
        qkv = F.linear(x, w["qkv"], w["qkv_b"])
        if w["q_norm"] is not None:
            t, d, nq = qkv.shape[0], self.spec.head_dim, self.spec.num_heads
            nk = self.spec.num_kv_heads
            rows = qkv.view(t, -1, d)
            rows[:, :nq] = w["q_norm"](rows[:, :nq])
            rows[:, nq:nq + nk] = w["k_norm"](rows[:, nq:nq + nk])
        return qkv

    def rope_rows(self, qkv: Tensor, pos: Tensor, pos32: Tensor | None = None,
                  K: Tensor | None = None, V: Tensor | None = None,
                  slots: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """RoPE on the Q and K heads of ``qkv`` at ``pos``; with K/V [Hkv, N, D] also write each
        row's K and V into them at ``slots`` (RoPE + scatter in one launch on Triton).

        Returns q [Hq, T, D], k, v [Hkv, T, D] (views into ``qkv`` on the Triton path)."""
        s = self.spec
        t, hq, hkv = qkv.shape[0], s.num_heads, s.num_kv_heads
        x = qkv.view(t, hq + 2 * hkv, s.head_dim)
        if self.ops.rope_qkv is not None:
            if pos32 is None:
                pos32 = pos.to(torch.int32)
            if K is not None and slots is None:
                slots = torch.arange(t, dtype=torch.int32, device=qkv.device)
            self.ops.rope_qkv(qkv, pos32, self.rope.inv_freq_on(qkv.device), hq, hkv,
                              self.rope.attention_scaling, K, V, slots)
            return (x[:, :hq].transpose(0, 1), x[:, hq:hq + hkv].transpose(0, 1),
                    x[:, hq + hkv:].transpose(0, 1))
        q = self.rope.apply(x[:, :hq].transpose(0, 1), pos)
        k = self.rope.apply(x[:, hq:hq + hkv].transpose(0, 1), pos)
        v = x[:, hq + hkv:].transpose(0, 1)
        if K is not None:
            if slots is None:
                K[:, :t] = k
                V[:, :t] = v
            else:
                self.ops.scatter_kv(K, V, slots.long(), k, v)
        return q, k, v

    def layer_out(self, layer: int, h: Tensor, attn_out: Tensor) -> Tensor:
        """Output projection added to ``h`` in place, then the MLP block; returns the MLP's
        output, the residual the next ``layer_in`` (or ``final_logits``) adds."""
        w = self._w[layer]
        x = self.add_norm(w["ln2"], h, F.linear(attn_out, w["o"], w["o_b"]))
        gu = F.linear(x, w["gate_up"])
        if self.ops.name == "triton":
            m = self.ops.silu_mul(gu)
        else:
            ni = w["inter"]
            m = F.silu(gu[:, :ni]) * gu[:, ni:]
        return F.linear(m, w["down"])

    def final_hidden(self, h: Tensor, resid: Tensor | None) -> Tensor:
        """The last residual add and the final norm (rows given by the caller)."""
        return self.add_norm(self.norm, h, resid)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
               causal: bool = False) -> Tensor:
        """Attention of queries q [Hq, Tq, D] over k/v [Hkv, Tk, D] → [Tq, Hq*D].

        ``mask`` is boolean [Tq, Tk] (True = may attend) or an additive float bias broadcastable
        to [Tq, Tk]; ``causal`` means the plain top-left
        causal mask (only valid when queries and keys are the same tokens).
        """
        hq, hkv = q.shape[0], k.shape[0]
        if mask is None:
            out = F.scaled_dot_product_attention(
                q[None], k[None], v[None], is_causal=causal, scale=self.scaling,
                enable_gqa=hq != hkv,
            )
        else:
            if hq != hkv:  # fused kernels take a mask only without GQA: expand K/V as HF does
                k = k.repeat_interleave(hq // hkv, dim=0)
                v = v.repeat_interleave(hq // hkv, dim=0)
            out = F.scaled_dot_product_attention(
                q[None], k[None], v[None], attn_mask=mask, scale=self.scaling
            )
        return out[0].transpose(0, 1).reshape(q.shape[1], -1)

    def group_plan(self, q_pos: Tensor, k_pos: Tensor, group: ContextGroup):
        """Attention plan of APE's two-group attention (split-K on the Triton ops)."""
        return self.ops.plan(q_pos, k_pos, self.spec.head_dim, False,
                             self.spec.num_heads // self.spec.num_kv_heads, self.scaling,
                             (group.start, group.end, group.temperature))

    def attend_grouped(self, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor,
                       group: ContextGroup, plan=None) -> Tensor:
        """APE attention (see ``ContextGroup``) → [Tq, Hq*D]: the contexts and the other keys
        are two softmax terms combined by their log-sum-exps (one split-K kernel + combine on
        the Triton ops)."""
        if plan is None:
            plan = self.group_plan(q_pos, k_pos, group)
        out = self.ops.selective_attention(q, k, v, q_pos, k_pos, self.scaling, plan=plan,
                                           log_scale=math.log(group.scale),
                                           temperature=group.temperature,
                                           context=(group.start, group.end))
        return out.transpose(0, 1).reshape(q.shape[1], -1)

    def logits(self, h: Tensor) -> Tensor:
        return self.lm_head(self.norm(h)).float()

    @staticmethod
    def position_mask(q_pos: Tensor, k_pos: Tensor, n_new: int) -> Tensor:
        """Causal-by-position mask: a query sees keys at positions ≤ its own.

        The last ``n_new`` keys are the queries themselves; among those, index order also holds,
        so tokens sharing a position never see the ones after them.
        """
        mask = k_pos[None, :] <= q_pos[:, None]
        if n_new:
            tq = q_pos.numel()
            idx = torch.arange(n_new, device=q_pos.device)
            own = idx[None, :] <= idx[:, None] if tq == n_new else None
            if own is not None:
                mask[:, -n_new:] &= own
        return mask
