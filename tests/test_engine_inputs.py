"""Bad inputs raise typed errors with clear messages; sampling and stop handling."""

from __future__ import annotations

import pytest
import torch

from ctxcache.engine import Engine, KVCache, SamplingParams, generate, load_model, stream
from ctxcache.engine.textstream import TextStream
from ctxcache.errors import InvalidInputError, KVMismatchError, UnknownModelError


def test_empty_prompt(engine):
    with pytest.raises(InvalidInputError, match="empty prompt"):
        engine.prefill([])
    with pytest.raises(InvalidInputError, match="empty prompt"):
        engine.encode("")


def test_token_out_of_range(engine):
    with pytest.raises(InvalidInputError, match="out of range"):
        engine.prefill([1, 2, engine.spec.vocab_size])
    with pytest.raises(InvalidInputError, match="out of range"):
        engine.prefill([-1])
    with pytest.raises(InvalidInputError, match="integers"):
        engine.prefill(["a", "b"])


def test_positions_length_mismatch(engine):
    with pytest.raises(KVMismatchError, match="positions"):
        engine.prefill([1, 2, 3], positions=[0, 1])


def test_kv_shape_mismatch(engine, tiny_engines):
    other = tiny_engines["tiny-llama"].prefill([1, 2, 3]).kv
    with pytest.raises(KVMismatchError, match="does not fit"):
        engine.prefill([5, 6], kv=other)
    with pytest.raises(KVMismatchError, match="positions"):
        KVCache(other.k, other.v, torch.arange(5))
    with pytest.raises(KVMismatchError):
        KVCache(other.k, other.v[:, :, :2], other.positions)


def test_mask_shape_checked(engine):
    with pytest.raises(KVMismatchError, match="mask"):
        engine.prefill([1, 2, 3], mask=torch.ones(3, 4, dtype=torch.bool))


def test_positions_out_of_model_range(engine):
    with pytest.raises(InvalidInputError, match="positions"):
        engine.prefill([1, 2], positions=[0, engine.spec.max_positions])


def test_unknown_model_name():
    with pytest.raises(UnknownModelError, match="unknown model"):
        load_model("no-such-model")
    with pytest.raises(UnknownModelError, match="unknown random config"):
        load_model("random:gpt-17")
    with pytest.raises(UnknownModelError):
        Engine.load("")


def test_bad_sampling_params():
    with pytest.raises(InvalidInputError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(InvalidInputError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(InvalidInputError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(InvalidInputError, match="stop"):
        SamplingParams(stop=[""])


def test_prompt_longer_than_context(tiny_engines):
    eng = tiny_engines["tiny-llama"]
    with pytest.raises(InvalidInputError, match="context"):
        generate(eng, [1] * 10, SamplingParams(max_tokens=eng.spec.max_positions))


def test_bad_chat_messages(engine):
    with pytest.raises(InvalidInputError):
        engine.chat_ids([])
    with pytest.raises(InvalidInputError, match="role"):
        engine.chat_ids([{"content": "x"}])
    with pytest.raises(InvalidInputError, match="unknown role"):
        engine.chat_ids([{"role": "wizard", "content": "x"}])


def test_seeded_sampling_is_reproducible(engine):
    ids = engine.chat_ids([{"role": "user", "content": "Tell me a story."}])
    p = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=7)
    a = generate(engine, ids, p)
    b = generate(engine, ids, p)
    assert a.token_ids == b.token_ids and len(a.token_ids) > 0


def test_stop_sequence_truncates_and_streams_consistently(engine):
    ids = engine.chat_ids([{"role": "user", "content": "What is the capital of France?"}])
    out = generate(engine, ids, SamplingParams(max_tokens=24, stop=["Paris"]))
    assert out.finish_reason == "stop"
    assert "Paris" not in out.text and out.text.strip().startswith("The capital")
    streamed = "".join(c.text for c in stream(engine, ids, SamplingParams(max_tokens=24, stop=["Paris"])))
    assert streamed == out.text


def test_textstream_holds_back_possible_stop_prefix():
    pieces = ["Hel", "lo wor", "ld", "!"]
    ts = TextStream(lambda ids: "".join(pieces[: len(ids)]), stop=["world"])
    out = [ts.push(i) for i in range(3)]
    assert out[0] == "Hel" and ts.stopped
    assert "".join(out) == "Hello "


def test_textstream_holds_partial_utf8():
    texts = ["caf", "caf\ufffd", "café"]
    ts = TextStream(lambda ids: texts[len(ids) - 1])
    assert [ts.push(i) for i in range(3)] == ["caf", "", "é"]


def test_random_model_takes_a_real_tokenizer(engine, tmp_path):
    """Speed runs of the chat/tool paths in a real shape: random weights, a real tokenizer."""
    engine.tokenizer.save_pretrained(tmp_path)
    loaded = load_model("random:tiny-llama", tokenizer=str(tmp_path))
    msgs = [{"role": "user", "content": "hello"}]
    assert loaded.tokenizer.apply_chat_template(msgs, tokenize=False) == \
        engine.tokenizer.apply_chat_template(msgs, tokenize=False)
    with pytest.raises(UnknownModelError, match="only to random"):
        load_model("smollm2-135m-instruct", tokenizer=str(tmp_path))
    with pytest.raises(UnknownModelError, match="does not exist"):
        load_model("random:tiny-llama", tokenizer=str(tmp_path / "missing"))
