"""Our layer loop against the HF forward / generate on the real model (fp32, CPU)."""

from __future__ import annotations

import torch

from ctxcache.engine import SamplingParams, generate
from ctxcache.engine.generate import DecodeBuffer, decode_step

PROMPTS = [
    "What is the capital of France?",
    "Explain in one sentence why the sky is blue.",
    "def fibonacci(n):\n    # return the n-th Fibonacci number",
]
TOL = 1e-3


def _hf_logits(engine, ids):
    with torch.no_grad():
        return engine.hf(torch.tensor([ids])).logits[0].float()


def test_logits_match_hf_forward(engine):
    for p in PROMPTS:
        ids = engine.chat_ids([{"role": "user", "content": p}])
        ours = engine.prefill(ids, logits="all").logits
        ref = _hf_logits(engine, ids)
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() <= TOL, p


def test_random_architectures_match_hf(tiny_engines):
    g = torch.Generator().manual_seed(1)
    for name, eng in tiny_engines.items():
        ids = torch.randint(0, eng.spec.vocab_size, (37,), generator=g).tolist()
        ours = eng.prefill(ids, logits="all").logits
        ref = _hf_logits(eng, ids)
        assert (ours - ref).abs().max().item() <= TOL, name


def test_prefill_with_past_kv_equals_full_prefill(engine):
    a = engine.encode("The Eiffel Tower is in Paris. It was completed in 1889.")
    b = engine.encode(" Its height is about 330 metres, and it is made of iron.")
    full = engine.prefill(a + b, logits="all")
    pa = engine.prefill(a)
    pb = engine.prefill(b, kv=pa.kv, logits="all")
    assert torch.equal(pb.kv.positions, torch.arange(len(a), len(a) + len(b)))
    assert (pb.logits - full.logits[len(a):]).abs().max().item() <= TOL
    assert (pb.kv.k - full.kv.k[:, :, len(a):]).abs().max().item() <= TOL
    assert (pb.kv.v - full.kv.v[:, :, len(a):]).abs().max().item() <= TOL
    assert (pa.kv.k - full.kv.k[:, :, : len(a)]).abs().max().item() <= TOL


def test_rope_shift_moves_cached_chunk_exactly(engine):
    a = engine.encode("Retrieved passage one talks about the Rhine river.")
    b = engine.encode("Passage two is about the Danube, which flows to the Black Sea.")
    alone = engine.prefill(b)  # cached at positions 0..len(b)-1
    after = engine.prefill(a + b).kv.slice(len(a))  # B encoded after A
    shifted = engine.rope.shift(alone.kv.k[0], len(a))
    # Layer 0's K depends only on the token and its position, so the shift must be exact.
    assert (shifted - after.k[0]).abs().max().item() <= 1e-4
    # per-token deltas (a tensor) give the same result
    delta = torch.full((len(b),), len(a))
    assert torch.allclose(engine.rope.shift(alone.kv.k[0], delta), shifted)
    # and shifting back restores the original
    back = engine.rope.shift(shifted, -len(a))
    assert (back - alone.kv.k[0]).abs().max().item() <= 1e-4


def test_explicit_positions_equal_shifted_prefill(engine):
    b = engine.encode("Passage two is about the Danube.")
    at_10 = engine.prefill(b, positions=torch.arange(10, 10 + len(b)))
    at_0 = engine.prefill(b)
    assert torch.allclose(engine.rope.shift(at_0.kv.k[0], 10), at_10.kv.k[0], atol=1e-4)


def test_greedy_decode_matches_hf_generate(engine):
    for p in ["Write a short poem about the sea.", "List three uses of copper."]:
        ids = engine.chat_ids([{"role": "user", "content": p}])
        ours = generate(engine, ids, SamplingParams(max_tokens=32))
        with torch.no_grad():
            hf = engine.hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)
        hf_ids = [t for t in hf[0, len(ids):].tolist() if t not in engine.eos_token_ids]
        assert ours.token_ids == hf_ids, p
        assert len(ours.token_ids) == 32 and ours.finish_reason == "length"


def test_decode_step_equals_prefill_of_extended_sequence(engine):
    ids = engine.encode("Counting: one, two, three,")
    pre = engine.prefill(ids)
    buf = DecodeBuffer(engine, len(ids) + 4)
    buf.load(pre.kv)
    nxt = int(pre.logits[-1].argmax())
    step_logits = decode_step(engine, buf, nxt)
    full = engine.prefill(ids + [nxt]).logits[-1]
    assert (step_logits - full).abs().max().item() <= TOL
    assert buf.length == len(ids) + 1


def test_answer_is_correct_on_real_model(engine):
    ids = engine.chat_ids([{"role": "user", "content": "What is the capital of France?"}])
    out = generate(engine, ids, SamplingParams(max_tokens=24))
    assert "Paris" in out.text
    assert out.finish_reason == "stop"
