"""Piecewise (cached) tokenization of chat prompts equals tokenizing the whole prompt."""

from __future__ import annotations

import copy

from tokenizers import AddedToken

from ctxcache.engine.tokencache import PieceTokenizer, _piecewise_safe


def _conversation(turns: int) -> list[dict]:
    msgs = [{"role": "system", "content": "You answer briefly.  Trailing spaces   "}]
    for i in range(turns):
        msgs += [{"role": "user", "content": f"Question {i}: ¿qué es π×{i}?\n\n  indented\t"},
                 {"role": "assistant", "content": f" Answer {i} — done.\n"}]
    return msgs


def test_piecewise_equals_whole_and_reuses_earlier_messages(engine):
    tok = engine.tokenizer
    pt = PieceTokenizer(tok)
    assert pt.enabled
    for turns in (1, 2, 5):
        text = tok.apply_chat_template(_conversation(turns), add_generation_prompt=True,
                                       tokenize=False)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, starts = pt.encode(text)
        assert ids == list(enc["input_ids"])
        assert starts == [a for a, _ in enc["offset_mapping"]]
    # the 5-turn prompt found every piece of the 2-turn one in the cache
    assert pt.hits > 0 and pt.enabled


def test_chat_segments_unchanged_by_the_cache(engine):
    msgs = _conversation(3)
    first = engine.chat_segments(msgs)
    again = engine.chat_segments(msgs)
    text = engine.tokenizer.apply_chat_template(msgs, add_generation_prompt=True,
                                                tokenize=False)
    assert first == again
    assert first[0] == list(engine.tokenizer(text, add_special_tokens=False)["input_ids"])


def test_tokenizers_that_strip_left_of_an_added_token_are_tokenized_whole(engine):
    tok = copy.deepcopy(engine.tokenizer)
    tok.add_tokens([AddedToken("<sep>", lstrip=True)])
    assert not _piecewise_safe(tok)
    pt = PieceTokenizer(tok)
    text = "a  <sep> b"
    assert pt.encode(text)[0] == list(tok(text, add_special_tokens=False)["input_ids"])
    assert pt.hits == pt.misses == 0
