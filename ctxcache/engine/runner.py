"""The embedded engine: our own layer loop over an HF model's weights.

Why not ``model.generate``: every reuse strategy (CacheBlend, Cache-Craft, APE, KVCOMM) must
inject cached K/V at chosen positions and recompute only chosen tokens, which no stock
``generate`` allows. So the engine exposes the transformer as small steps — ``embed``,
``qkv`` (norm + projections + RoPE at explicit positions), ``attend`` (attention of some queries
over any K/V with a position-based mask), ``finish_layer`` (output projection, residual, MLP) and
``logits`` — and composes them into ``prefill`` and the decode loop. Strategies compose the same
steps differently, and the parity tests pin the composition to the HF forward.

Batch size is 1 throughout (one request's prompt); the service batches across requests by queueing.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ctxcache.engine.kvcache import KVCache
from ctxcache.engine.models import DEFAULT_MODEL, LoadedModel, load_model
from ctxcache.engine.rope import Rope
from ctxcache.errors import InvalidInputError, KVMismatchError, ModelLoadError

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise InvalidInputError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


@dataclass(frozen=True)
class ModelSpec:
    """Shape facts that K/V caches and kernels must agree on."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_positions: int
    intermediate_size: int = 0

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        elt = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elt


@dataclass(frozen=True)
class ContextGroup:
    """APE's adjustment of attention to parallel-encoded contexts: keys [start, end) are the
    contexts; their logits are divided by ``temperature`` and their share of the softmax is
    weighted like one term whose log-sum-exp is ``temperature · LSE + log(scale)`` (as in the
    APE paper's reference implementation). Kept for the whole decode."""

    start: int
    end: int
    temperature: float = 1.0
    scale: float = 1.0


def upload(values, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Host values → a device tensor without stalling the device queue: staged in pinned
    memory and copied asynchronously (a plain copy from pageable memory waits for every
    queued kernel first)."""
    t = torch.as_tensor(values, dtype=dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


@dataclass
class PrefillOutput:
    kv: KVCache  # K/V of the *new* tokens only
    logits: Tensor | None  # [T, vocab] or [1, vocab] (last) or None
    hidden: Tensor | None = None  # final normed hidden states when asked for


class Engine:
    """Runs one HF causal LM with explicit positions and injectable K/V."""

    def __init__(self, loaded: LoadedModel, kernels: str = "auto"):
        from ctxcache.kernels import get_ops

        self.loaded = loaded
        self.hf = loaded.hf_model
        self.tokenizer = loaded.tokenizer
        self.name = loaded.name
        self.fingerprint = loaded.fingerprint
        cfg = self.hf.config
        core = self.hf.model
        self.layers = list(core.layers)
        self.embed_tokens = core.embed_tokens
        self.norm = core.norm
        self.lm_head = self.hf.lm_head
        self.rope = Rope.from_hf(core.rotary_emb)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.spec = ModelSpec(
            num_layers=cfg.num_hidden_layers,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim,
            hidden_size=cfg.hidden_size,
            vocab_size=self.embed_tokens.num_embeddings,
            max_positions=getattr(cfg, "max_position_embeddings", 1 << 30),
            intermediate_size=getattr(cfg, "intermediate_size", 4 * cfg.hidden_size),
        )
        self.scaling = self.layers[0].self_attn.scaling
        self.device = self.embed_tokens.weight.device
        self.dtype = self.embed_tokens.weight.dtype
        self.eos_token_ids = self._eos_ids()
        # hot-path ops of chunk reuse: Triton kernels on CUDA, plain torch otherwise
        self.ops = get_ops(kernels, self.device)
        act = getattr(cfg, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ModelLoadError(f"model {self.name} uses activation {act!r}; only SiLU is supported")
        self._w = loaded.fused if getattr(loaded, "fused", None) else self._fuse_weights()
        loaded.fused = self._w  # a second Engine over the same weights shares them
        # One forward at a time: the HF modules and our buffers are not re-entrant.
        self.lock = threading.RLock()

    @classmethod
    def load(cls, name: str = DEFAULT_MODEL, *, device: str = "cpu",
             dtype: str | torch.dtype = torch.float32, seed: int = 0,
             kernels: str = "auto") -> "Engine":
        return cls(load_model(name, dtype=parse_dtype(dtype), device=device, seed=seed), kernels)

    # ------------------------------------------------------------------ validation
    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        gc = getattr(self.hf, "generation_config", None)
        for src in (getattr(gc, "eos_token_id", None), getattr(self.hf.config, "eos_token_id", None),
                    getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(src, int):
                ids.add(src)
            elif isinstance(src, (list, tuple)):
                ids.update(int(i) for i in src)
        return ids

    def as_ids(self, token_ids: Sequence[int] | Tensor) -> Tensor:
        """Validate token ids and return them as a 1-D long tensor on the engine's device.

        Lists are checked on the host and uploaded without stalling the device queue; a
        tensor already on the device is checked there (one synchronisation)."""
        if torch.is_tensor(token_ids):
            ids = token_ids.reshape(-1).to(torch.long)
            if not ids.numel():
                raise InvalidInputError("empty prompt: at least one token is required")
            self._check_range(int(ids.min()), int(ids.max()))
            return ids.to(self.device)
        vals = self.check_ids(token_ids)
        return upload(vals, torch.long, self.device)

    def check_ids(self, token_ids: Sequence[int]) -> np.ndarray:
        """Host-side validation of token ids (no device work): integers in the vocabulary.
        Returns them as an int64 array."""
        try:
            vals = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        except (TypeError, ValueError, OverflowError) as e:
            raise InvalidInputError(f"token ids must be integers: {e}") from None
        if not vals.size:
            raise InvalidInputError("empty prompt: at least one token is required")
        self._check_range(int(vals.min()), int(vals.max()))
        return vals

    def _check_range(self, lo: int, hi: int) -> None:
        if lo < 0 or hi >= self.spec.vocab_size:
            bad = lo if lo < 0 else hi
            raise InvalidInputError(
                f"token id {bad} is out of range for vocabulary size {self.spec.vocab_size}"
            )

    def check_kv(self, kv: KVCache) -> None:
        s = self.spec
        want = (s.num_layers, s.num_kv_heads, s.head_dim)
        got = (kv.k.shape[0], kv.k.shape[1], kv.k.shape[3])
        if got != want:
            raise KVMismatchError(
                f"KV of shape (layers, kv_heads, head_dim)={got} does not fit model {self.name} "
                f"which needs {want}"
            )

    def _positions(self, n: int, positions, start: int) -> Tensor:
        if positions is None:
            if start + n > self.spec.max_positions:
                raise InvalidInputError(
                    f"positions must lie in [0, {self.spec.max_positions}) for model {self.name}")
            return torch.arange(start, start + n, device=self.device)
        pos = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
        if pos.numel() != n:
            raise KVMismatchError(f"{n} tokens but {pos.numel()} positions")
        if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= self.spec.max_positions):
            raise InvalidInputError(
                f"positions must lie in [0, {self.spec.max_positions}) for model {self.name}"
            )
        return pos.to(self.device)

    # ------------------------------------------------------------------ building blocks
    def embed(self, ids: Tensor) -> Tensor:
        return self.embed_tokens(ids)  # [T, hidden]

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

    def group_plan(self, q_pos: Tensor, k_pos: Tensor, group: "ContextGroup"):
        """Attention plan of APE's two-group attention (split-K on the Triton ops)."""
        return self.ops.plan(q_pos, k_pos, self.spec.head_dim, False,
                             self.spec.num_heads // self.spec.num_kv_heads, self.scaling,
                             (group.start, group.end, group.temperature))

    def attend_grouped(self, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor,
                       group: "ContextGroup", plan=None) -> Tensor:
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

    # ------------------------------------------------------------------ prefill
    @torch.inference_mode()
    def prefill(
        self,
        token_ids: Sequence[int] | Tensor,
        positions: Sequence[int] | Tensor | None = None,
        kv: KVCache | None = None,
        *,
        mask: Tensor | None = None,
        context_group: "ContextGroup | None" = None,
        logits: str = "last",
        return_hidden: bool = False,
    ) -> PrefillOutput:
        """Encode ``token_ids`` at ``positions`` attending to ``kv`` (if any) and to themselves.

        Default positions continue after ``kv`` (or start at 0). The default mask is causal by
        position; pass ``mask`` [T, len(kv)+T] to override (parallel encoding).
        ``context_group`` marks keys of ``kv`` as APE's parallel contexts (temperature and
        scale on their share of attention).
        Returns the K/V of the new tokens only; ``logits`` is "last", "all" or "none".
        """
        if logits not in ("last", "all", "none"):
            raise InvalidInputError("logits must be 'last', 'all' or 'none'")
        ids = self.as_ids(token_ids)
        t = ids.numel()
        past = 0
        if kv is not None:
            self.check_kv(kv)
            kv = kv.to(self.device, self.dtype)
            past = kv.num_tokens
        start = int(kv.positions.max()) + 1 if kv is not None and past else 0
        pos = self._positions(t, positions, start)
        contiguous = positions is None or bool(
            torch.equal(pos, torch.arange(int(pos[0]), int(pos[0]) + t, device=pos.device))
        )
        user_mask = mask is not None
        if mask is not None:
            mask = mask.to(self.device, torch.bool)
            if mask.shape != (t, past + t):
                raise KVMismatchError(f"mask must be [{t}, {past + t}], got {tuple(mask.shape)}")
        k_pos = torch.cat([kv.positions.to(self.device), pos]) if past else pos
        if context_group is not None and (user_mask or not past):
            raise InvalidInputError("a context group needs past K/V and the default mask")
        # the position-causal case runs on the gathered-query kernel (no mask, no K/V repeat)
        plan = None
        if context_group is None and self.ops.name == "triton" and not user_mask and (
                past or not contiguous) and (t == 1 or bool(torch.all(pos[1:] > pos[:-1]))):
            plan = self.ops.plan(pos, k_pos, self.spec.head_dim, None,
                                 self.spec.num_heads // self.spec.num_kv_heads, self.scaling)
        elif context_group is None and not user_mask and (past or not contiguous):
            mask = self.position_mask(pos, k_pos, t)
        s = self.spec
        out_k = torch.empty(s.num_layers, s.num_kv_heads, t, s.head_dim, dtype=self.dtype,
                            device=self.device)
        out_v = torch.empty_like(out_k)
        pos32 = pos.to(torch.int32)
        gplan = self.group_plan(pos, k_pos, context_group) if context_group else None
        with self.lock:
            h = self.embed(ids)
            resid = None
            for i in range(s.num_layers):
                qkv = self.layer_in(i, h, resid)
                q, k, v = self.rope_rows(qkv, pos, pos32, out_k[i], out_v[i])
                if past:
                    k = torch.cat([kv.k[i], out_k[i]], dim=1)
                    v = torch.cat([kv.v[i], out_v[i]], dim=1)
                else:
                    k, v = out_k[i], out_v[i]
                if context_group is not None:
                    a = self.attend_grouped(q, k, v, pos, k_pos, context_group, gplan)
                elif plan is not None:
                    a = self.ops.selective_attention(q, k, v, pos, k_pos, self.scaling,
                                                     plan=plan)
                    a = a.transpose(0, 1).reshape(t, -1)
                else:
                    a = self.attend(q, k, v, mask=mask, causal=mask is None)
                resid = self.layer_out(i, h, a)
            lg = None
            if logits == "all" or return_hidden:
                hn = self.final_hidden(h, resid)
                lg = self.lm_head(hn).float() if logits == "all" else (
                    self.lm_head(hn[-1:]).float() if logits == "last" else None)
            else:
                hn = None
                if logits == "last":
                    lg = self.lm_head(self.final_hidden(h[-1:], resid[-1:])).float()
        return PrefillOutput(KVCache(out_k, out_v, pos), lg, hn if return_hidden else None)

    # ------------------------------------------------------------------ text helpers
    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise InvalidInputError(f"model {self.name} has no tokenizer; pass token ids")
        return self.tokenizer

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str) or not text:
            raise InvalidInputError("empty prompt: text must be a non-empty string")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInputError("text contains an unpaired UTF-16 surrogate, which is not "
                                    "valid Unicode") from None
        return list(self._need_tokenizer().encode(text, add_special_tokens=add_special_tokens))

    def decode_ids(self, ids: Iterable[int]) -> str:
        return self._need_tokenizer().decode(list(ids), skip_special_tokens=True)

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of ``messages`` through the model's own chat template."""
        tok = self._need_tokenizer()
        if not messages:
            raise InvalidInputError("messages must not be empty")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise InvalidInputError(f"message {i} needs 'role' and 'content'")
            if m["role"] not in ("system", "user", "assistant", "tool"):
                raise InvalidInputError(f"message {i} has unknown role {m['role']!r}")
            if not isinstance(m["content"], str):
                raise InvalidInputError(f"message {i} content must be a string")
        if tok.chat_template is None:  # plain fallback for checkpoints without a template
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            return self.encode(text + ("assistant: " if add_generation_prompt else ""))
        out = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                      tokenize=True, return_dict=True)
        return list(out["input_ids"])
