"""The embedded engine: our own layer loop over an HF model's weights.

Why not ``model.generate``: every reuse strategy (CacheBlend, Cache-Craft, APE, KVCOMM) must
inject cached K/V at chosen positions and recompute only chosen tokens, which no stock
``generate`` allows. So the engine exposes the transformer as small steps (``layers.py``) and
composes them into ``prefill`` and the decode loop; strategies compose the same steps
differently, and the parity tests pin the composition to the HF forward.

Batch size is 1 throughout (one request's prompt); the service batches across requests by queueing.
"""

from __future__ import annotations

import bisect
import json
import os
import threading
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from ctxcache.engine.kvcache import KVCache
from ctxcache.engine.layers import LayerSteps
from ctxcache.engine.models import DEFAULT_MODEL, LoadedModel, load_model
from ctxcache.engine.rope import Rope
from ctxcache.engine.tokencache import PieceTokenizer
from ctxcache.engine.types import (  # noqa: F401 - re-exported
    ContextGroup, ModelSpec, PrefillOutput, parse_dtype, upload,
)
from ctxcache.errors import InvalidInputError, KVMismatchError, ModelLoadError



class Engine(LayerSteps):
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
             kernels: str = "auto", tokenizer: str | None = None) -> "Engine":
        return cls(load_model(name, dtype=parse_dtype(dtype), device=device, seed=seed,
                              tokenizer=tokenizer), kernels)

    # ------------------------------------------------------------------ structured output
    @property
    def grammar(self):
        """The grammar compiler over this model's tokenizer (built on first use, shared by
        engines over the same weights)."""
        g = getattr(self.loaded, "grammar", None)
        if g is None:
            from ctxcache.structured import GrammarCompiler

            g = self.loaded.grammar = GrammarCompiler(self._need_tokenizer(),
                                                      self.spec.vocab_size,
                                                      sorted(self.eos_token_ids))
        return g

    @property
    def tool_format(self):
        """How this model's chat template renders and its output carries tool calls."""
        f = getattr(self.loaded, "tool_format", None)
        if f is None:
            from ctxcache.structured import HermesFormat

            f = self.loaded.tool_format = HermesFormat(self.tokenizer, self.name)
        return f

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

    # ------------------------------------------------------------------ prefill
    @torch.inference_mode()
    def prefill(
        self,
        token_ids: Sequence[int] | Tensor,
        positions: Sequence[int] | Tensor | None = None,
        kv: KVCache | None = None,
        *,
        mask: Tensor | None = None,
        context_group: ContextGroup | None = None,
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

    # the longest text a prompt of ``max_positions`` tokens could be: checked before tokenizing,
    # so an oversized request is refused at once instead of after seconds of tokenizer work
    CHARS_PER_TOKEN_BOUND = 16

    def check_prompt_chars(self, n_chars: int) -> None:
        limit = self.spec.max_positions * self.CHARS_PER_TOKEN_BOUND
        if n_chars > limit:
            raise InvalidInputError(
                f"prompt of {n_chars} characters exceeds the model's context: {self.name} takes "
                f"{self.spec.max_positions} tokens (at most {limit} characters)")

    def chat_segments(self, messages: list[dict], tools: list[dict] | None = None
                      ) -> tuple[list[int], list[int]]:
        """Token ids of ``messages`` with a generation prompt, and the token offsets where
        each message's content ends (cut points for per-turn prefix caching).

        Linear in the conversation: the template is rendered once with a marker after each
        message's content and once without; the tokens are split where a marker was. Asking
        the template for every prefix of the conversation instead was quadratic (1,000
        messages took 13 s on one CPU). Where the template moves or drops a marker, or no token
        boundary falls on it, that cut is left out (the prompt is the same, only coarser)."""
        self._validate_messages(messages)
        tok = self._need_tokenizer()
        self.check_prompt_chars(sum(len(m["content"]) for m in messages)
                                + (len(json.dumps(tools)) if tools else 0))
        if tools:
            self.tool_format.check()
        if tok.chat_template is None:
            ids = self.chat_ids(messages, tools=tools)
            return ids, []
        kw = {"tools": tools} if tools else {}
        plain = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                        **kw)
        mark = "\ue000"
        cuts: list[int] = []
        if mark not in plain:
            # every message, the last one too: the next turn resends it and reuses up to its
            # end; an empty content stays empty (templates branch on "if message.content")
            marked = [dict(m, content=m["content"] + mark) if m["content"] else m
                      for m in messages]
            text = tok.apply_chat_template(marked, add_generation_prompt=True, tokenize=False,
                                           **kw)
            # a marker counts while the text before it is the plain rendering's
            same = len(os.path.commonprefix([text.replace(mark, ""), plain]))
            i = text.find(mark)
            while i >= 0 and i - len(cuts) <= same:
                cuts.append(i - len(cuts))  # its offset in the text without the markers
                i = text.find(mark, i + 1)
        if cuts and getattr(tok, "is_fast", False):
            # only the messages not seen before are tokenized (tokencache.py)
            if self.loaded.pieces is None:
                self.loaded.pieces = PieceTokenizer(tok)
            ids, starts = self.loaded.pieces.encode(plain)
            # the token that starts at or before each cut (the chained segment keys make a
            # boundary that moved by a token a cache miss, never a wrong reuse)
            token_cuts = sorted({j for j in (bisect.bisect_right(starts, c) - 1 for c in cuts)
                                 if j > 0})
            return ids, token_cuts
        return list(tok(plain, add_special_tokens=False)["input_ids"]), []

    def _validate_messages(self, messages: list[dict]) -> None:
        if not messages:
            raise InvalidInputError("messages must not be empty")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise InvalidInputError(f"message {i} needs 'role' and 'content'")
            if m["role"] not in ("system", "user", "assistant", "tool"):
                raise InvalidInputError(f"message {i} has unknown role {m['role']!r}")
            if not isinstance(m["content"], str):
                raise InvalidInputError(f"message {i} content must be a string")

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True,
                 tools: list[dict] | None = None) -> list[int]:
        """Token ids of ``messages`` through the model's own chat template (with ``tools``
        rendered by it, when given: see ``tool_format``)."""
        tok = self._need_tokenizer()
        self._validate_messages(messages)
        if tools:
            self.tool_format.check()
        if tok.chat_template is None:  # plain fallback for checkpoints without a template
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            return self.encode(text + ("assistant: " if add_generation_prompt else ""))
        kw = {"tools": tools} if tools else {}
        out = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                      tokenize=True, return_dict=True, **kw)
        return list(out["input_ids"])
