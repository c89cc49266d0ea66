"""Prompt layouts made of segments: the RAG / agent-turn layout through the model's own chat
template — system prompt (a cached prefix), passages (reusable chunks), question (text)."""

from __future__ import annotations

from typing import Sequence

from ctxcache.engine.runner import Engine
from ctxcache.fusion.types import Segment


def rag_template(engine: Engine, system: str) -> tuple[list[int], str, str]:
    """Token ids of the prompt head (system + opening of the user turn) and the text that
    follows the passages, rendered through the model's own chat template."""
    marker = "\u2063CTXCACHE-PASSAGES\u2063"
    tok = engine.tokenizer
    if tok is None or tok.chat_template is None:
        head = f"system: {system}\nuser: "
        return engine.encode(head), "", "\nassistant: "
    rendered = tok.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": marker + "Q"}],
        add_generation_prompt=True, tokenize=False)
    head, tail = rendered.split(marker, 1)
    q_at = tail.index("Q")
    return engine.encode(head), tail[:q_at], tail[q_at + 1:]


def rag_segments(engine: Engine, system: str, passages: Sequence[str], question: str,
                 passage_ids: Sequence[Sequence[int]] | None = None) -> list[Segment]:
    """[prefix: system + opening of the user turn] [chunk per passage] [text: question + cue].
    Passages end with a blank line, so each is a self-contained chunk wherever it lands."""
    head, between, after = rag_template(engine, system)
    segs = [Segment.prefix(head)]
    ids_list = passage_ids or [engine.encode(p.rstrip() + "\n\n") for p in passages]
    segs += [Segment.chunk(ids) for ids in ids_list if ids]
    segs.append(Segment.text(engine.encode(between + question + after)))
    return segs
