"""The decode loop: preallocated KV buffer, sampling, stop sequences, streaming.

The KV of prompt and answer lives in one buffer sized up front (prompt + max_tokens), and each
step writes its K/V row in place. HF's DynamicCache concatenates per step instead, which copies
the whole cache every token — quadratic traffic that dominates decode at long context.

Decoding starts from any KV (``stream_from_kv``), so a prompt assembled by a reuse strategy
decodes exactly like a freshly prefilled one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from ctxcache.engine.kvcache import KVCache
from ctxcache.engine.runner import ContextGroup, Engine, upload
from ctxcache.engine.sampling import Sampler, SamplingParams
from ctxcache.engine.textstream import TextStream
from ctxcache.errors import InvalidInputError


@dataclass
class GenerationChunk:
    """One streamed step: new text (may be empty while held back) and the token behind it."""

    text: str
    token_id: int | None
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" on the last chunk


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float = 0.0
    total_s: float = 0.0
    extra: dict = field(default_factory=dict)


class DecodeBuffer:
    """K/V for a whole sequence, allocated once: [layers, kv_heads, capacity, head_dim]."""

    def __init__(self, engine: Engine, capacity: int, storage: KVCache | None = None):
        s = engine.spec
        if storage is not None and storage.num_tokens >= capacity:
            # a reuse strategy assembled the prompt into a buffer with room for the answer:
            # decode in place instead of copying the whole prompt K/V again
            self.k, self.v = storage.k, storage.v
            capacity = storage.num_tokens
        else:
            self.k = torch.empty(s.num_layers, s.num_kv_heads, capacity, s.head_dim,
                                 dtype=engine.dtype, device=engine.device)
            self.v = torch.empty_like(self.k)
        self.capacity = capacity
        self.length = 0
        self.next_position = 0
        self.group: ContextGroup | None = None  # APE's context adjustment, or None
        self._pos: Tensor | None = None  # positions of the keys (only needed with a group)

    def load(self, kv: KVCache, context_group: ContextGroup | None = None) -> None:
        n = kv.num_tokens
        if n > self.capacity:
            raise InvalidInputError(f"KV of {n} tokens exceeds buffer capacity {self.capacity}")
        if kv.k.data_ptr() != self.k.data_ptr():  # not already in place
            self.k[:, :, :n].copy_(kv.k)
            self.v[:, :, :n].copy_(kv.v)
        self.length = n
        self.next_position = int(kv.positions.max()) + 1 if n else 0
        self.group = context_group
        if context_group is not None:
            self._pos = torch.empty(self.capacity, dtype=torch.long, device=self.k.device)
            self._pos[:n] = kv.positions.to(self.k.device)

    def view(self) -> KVCache:
        pos = torch.arange(self.length, device=self.k.device)  # informational only
        return KVCache(self.k[:, :, : self.length], self.v[:, :, : self.length], pos)


@torch.inference_mode()
def decode_step(engine: Engine, buf: DecodeBuffer, token_id: int) -> Tensor:
    """Append one token at the next position; return its logits [vocab] (float32).

    No mask is needed: the new token's position is after every cached one.
    """
    if buf.length >= buf.capacity:
        raise InvalidInputError("decode buffer is full")
    t = buf.length
    step = upload([token_id, buf.next_position, t], torch.long, engine.device)
    ids, pos, slot = step[0:1], step[1:2], step[2:3]
    pos32, slot32 = pos.to(torch.int32), slot.to(torch.int32)
    gplan = None
    if buf.group is not None:
        buf._pos[t] = buf.next_position
        gplan = engine.group_plan(pos, buf._pos[: t + 1], buf.group)
    with engine.lock:
        h = engine.embed(ids)
        resid = None
        for i in range(engine.spec.num_layers):
            qkv = engine.layer_in(i, h, resid)
            q, _, _ = engine.rope_rows(qkv, pos, pos32, buf.k[i], buf.v[i], slot32)
            k, v = buf.k[i, :, : t + 1], buf.v[i, :, : t + 1]
            if buf.group is not None:
                a = engine.attend_grouped(q, k, v, pos, buf._pos[: t + 1], buf.group, gplan)
            else:
                a = engine.attend(q, k, v)
            resid = engine.layer_out(i, h, a)
        logits = engine.lm_head(engine.final_hidden(h, resid)).float()[0]
    buf.length += 1
    buf.next_position += 1
    return logits


def _check_room(engine: Engine, n_prompt: int, params: SamplingParams) -> None:
    limit = engine.spec.max_positions
    if n_prompt + params.max_tokens > limit:
        raise InvalidInputError(
            f"prompt of {n_prompt} tokens + max_tokens {params.max_tokens} exceeds the model's "
            f"context of {limit} tokens"
        )


def stream_from_kv(
    engine: Engine,
    kv: KVCache,
    last_logits: Tensor,
    params: SamplingParams,
    *,
    should_stop: Callable[[], bool] | None = None,
    context_group: ContextGroup | None = None,
    storage: KVCache | None = None,
) -> Iterator[GenerationChunk]:
    """Decode after a prompt whose K/V is ``kv`` and whose last-token logits are given.

    ``context_group`` keeps APE's attention adjustment on the prompt's contexts for the whole
    decode. ``storage`` is a buffer whose leading tokens are ``kv`` itself with room after
    them (from the reuse strategy): decoding continues in place when it is large enough.
    """
    engine.check_kv(kv)
    _check_room(engine, kv.num_tokens, params)
    buf = DecodeBuffer(engine, kv.num_tokens + params.max_tokens, storage)
    buf.load(kv.to(engine.device, engine.dtype), context_group)
    sampler = Sampler(params, engine.device)
    text = TextStream(engine.decode_ids if engine.tokenizer is not None else (lambda ids: ""),
                      params.stop)
    logits = last_logits.reshape(-1)
    for step in range(params.max_tokens):
        if should_stop is not None and should_stop():
            yield GenerationChunk(text.flush(), None, "cancelled")
            return
        tok = sampler(logits)
        if tok in engine.eos_token_ids and not params.ignore_eos:
            yield GenerationChunk(text.flush(), None, "stop")
            return
        delta = text.push(tok)
        if text.stopped:
            yield GenerationChunk(delta, tok, "stop")
            return
        if step == params.max_tokens - 1:
            yield GenerationChunk(delta + text.flush(), tok, "length")
            return
        yield GenerationChunk(delta, tok)
        logits = decode_step(engine, buf, tok)


def stream(
    engine: Engine,
    prompt_ids: Sequence[int] | Tensor,
    params: SamplingParams,
    *,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[GenerationChunk]:
    """Full prefill of the prompt, then decode."""
    ids = engine.as_ids(prompt_ids)
    _check_room(engine, ids.numel(), params)
    out = engine.prefill(ids)
    yield from stream_from_kv(engine, out.kv, out.logits[-1], params, should_stop=should_stop)


def collect(chunks: Iterator[GenerationChunk], n_prompt: int, t0: float) -> GenerationResult:
    """Drain a chunk stream into a ``GenerationResult`` with timings measured from ``t0``."""
    parts: list[str] = []
    ids: list[int] = []
    ttft = 0.0
    finish = "length"
    for c in chunks:
        if not ttft:
            ttft = time.perf_counter() - t0
        parts.append(c.text)
        if c.token_id is not None:
            ids.append(c.token_id)
        if c.finish_reason:
            finish = c.finish_reason
    return GenerationResult("".join(parts), ids, finish, n_prompt, len(ids), ttft,
                            time.perf_counter() - t0)


def generate(engine: Engine, prompt_ids: Sequence[int] | Tensor,
             params: SamplingParams | None = None) -> GenerationResult:
    params = params or SamplingParams()
    t0 = time.perf_counter()
    ids = engine.as_ids(prompt_ids)
    return collect(stream(engine, ids, params), ids.numel(), t0)
