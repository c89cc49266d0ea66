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

import threading
from dataclasses import dataclass
from typing import Iterable, Sequence

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
        """Validate token ids and return them as a 1-D long tensor on the engine's device."""
        if torch.is_tensor(token_ids):
            ids = token_ids.reshape(-1).to(self.device, torch.long)
        else:
            try:
                ids = torch.tensor(list(token_ids), dtype=torch.long, device=self.device)
            except (TypeError, ValueError, RuntimeError, OverflowError) as e:
                raise InvalidInputError(f"token ids must be integers: {e}") from None
            ids = ids.reshape(-1)
        if ids.numel() == 0:
            raise InvalidInputError("empty prompt: at least one token is required")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.spec.vocab_size:
            bad = lo if lo < 0 else hi
            raise InvalidInputError(
                f"token id {bad} is out of range for vocabulary size {self.spec.vocab_size}"
            )
        return ids

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
            pos = torch.arange(start, start + n, device=self.device)
        else:
            pos = torch.as_tensor(positions, dtype=torch.long).reshape(-1).to(self.device)
            if pos.numel() != n:
                raise KVMismatchError(f"{n} tokens but {pos.numel()} positions")
        if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= self.spec.max_positions):
            raise InvalidInputError(
                f"positions must lie in [0, {self.spec.max_positions}) for model {self.name}"
            )
        return pos

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
                w["split"] = (nq, nk)
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

    def _rope(self, x: Tensor, positions: Tensor) -> Tensor:
        if self.ops.name == "triton":  # one in-place kernel: rotating by p = encoding at p
            x = self.ops.rope_shift(x, positions, self.rope.inv_freq_on(x.device))
            return x * self.rope.attention_scaling if self.rope.attention_scaling != 1.0 else x
        return self.rope.apply(x, positions)

    def qkv(self, layer: int, h: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Norm + Q/K/V projections + RoPE for hidden states ``h`` [T, hidden].

        Returns q [Hq, T, D], k [Hkv, T, D] (rotated to ``positions``), v [Hkv, T, D].
        """
        w = self._w[layer]
        x = self._rms(w["ln1"], h)
        t, d = x.shape[0], self.spec.head_dim
        qkv = F.linear(x, w["qkv"], w["qkv_b"])
        nq, nk = w["split"]
        q = qkv[:, :nq].view(t, -1, d)
        k = qkv[:, nq:nq + nk].view(t, -1, d)
        v = qkv[:, nq + nk:].view(t, -1, d)
        if w["q_norm"] is not None:  # Qwen3-style per-head norms
            q, k = w["q_norm"](q), w["k_norm"](k)
        # (the Triton RoPE works in place on these views of the fresh qkv buffer)
        q = self._rope(q.transpose(0, 1), positions)
        k = self._rope(k.transpose(0, 1), positions)
        return q, k, v.transpose(0, 1)

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

    def finish_layer(self, layer: int, h: Tensor, attn_out: Tensor) -> Tensor:
        """Output projection + residual + MLP block + residual."""
        w = self._w[layer]
        h = h + F.linear(attn_out, w["o"], w["o_b"])
        gu = F.linear(self._rms(w["ln2"], h), w["gate_up"])
        ni = w["inter"]
        return h + F.linear(F.silu(gu[:, :ni]) * gu[:, ni:], w["down"])

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

    @staticmethod
    def bias_mask(mask: Tensor, key_bias: Tensor, dtype: torch.dtype) -> Tensor:
        """Boolean mask [Tq, Tk] + per-key additive bias [Tk] → float mask for SDPA."""
        neg = torch.finfo(torch.float32).min
        return torch.where(mask, key_bias[None, :], torch.full_like(key_bias[None, :], neg)).to(
            dtype)

    # ------------------------------------------------------------------ prefill
    @torch.inference_mode()
    def prefill(
        self,
        token_ids: Sequence[int] | Tensor,
        positions: Sequence[int] | Tensor | None = None,
        kv: KVCache | None = None,
        *,
        mask: Tensor | None = None,
        key_bias: Tensor | None = None,
        logits: str = "last",
        return_hidden: bool = False,
    ) -> PrefillOutput:
        """Encode ``token_ids`` at ``positions`` attending to ``kv`` (if any) and to themselves.

        Default positions continue after ``kv`` (or start at 0). The default mask is causal by
        position; pass ``mask`` [T, len(kv)+T] to override (APE, parallel encoding).
        ``key_bias`` [len(kv)+T] is added to every query's attention logit of that key (APE's
        scaling factor on the context part, as log S).
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
        if key_bias is not None:
            key_bias = key_bias.to(self.device, torch.float32).reshape(-1)
            if key_bias.numel() != past + t:
                raise KVMismatchError(f"key_bias must have {past + t} entries")
        # the position-causal case runs on the gathered-query kernel (no mask, no K/V repeat)
        plan = None
        if self.ops.name == "triton" and not user_mask and (past or not contiguous) and (
                t == 1 or bool(torch.all(pos[1:] > pos[:-1]))):
            plan = self.ops.plan(pos, k_pos, self.spec.head_dim, None,
                                 self.spec.num_heads // self.spec.num_kv_heads)
        elif not user_mask and (past or not contiguous or key_bias is not None):
            mask = self.position_mask(pos, k_pos, t)
        if key_bias is not None and plan is None:
            mask = self.bias_mask(mask, key_bias, self.dtype)
        s = self.spec
        out_k = torch.empty(s.num_layers, s.num_kv_heads, t, s.head_dim, dtype=self.dtype,
                            device=self.device)
        out_v = torch.empty_like(out_k)
        with self.lock:
            h = self.embed(ids)
            for i in range(s.num_layers):
                q, k, v = self.qkv(i, h, pos)
                out_k[i], out_v[i] = k, v
                if past:
                    k = torch.cat([kv.k[i], k], dim=1)
                    v = torch.cat([kv.v[i], v], dim=1)
                if plan is not None:
                    a = self.ops.selective_attention(q, k, v, pos, k_pos, self.scaling,
                                                     key_bias, plan=plan)
                    a = a.transpose(0, 1).reshape(t, -1)
                else:
                    a = self.attend(q, k, v, mask=mask, causal=mask is None)
                h = self.finish_layer(i, h, a)
            hn = self.norm(h)
            lg = None
            if logits == "all":
                lg = self.lm_head(hn).float()
            elif logits == "last":
                lg = self.lm_head(hn[-1:]).float()
        return PrefillOutput(KVCache(out_k, out_v, pos), lg, hn if return_hidden else None)

    # ------------------------------------------------------------------ text helpers
    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise InvalidInputError(f"model {self.name} has no tokenizer; pass token ids")
        return self.tokenizer

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str) or not text:
            raise InvalidInputError("empty prompt: text must be a non-empty string")
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
