"""Command line: ``ctxcache generate``, ``ctxcache models`` (and more as parts land)."""

from __future__ import annotations

import sys
import time
from typing import List, Optional

import typer
from rich.console import Console

from ctxcache.engine.models import DEFAULT_MODEL, available_models
from ctxcache.errors import CtxCacheError

app = typer.Typer(help="ctxcache: context-caching gateway for RAG apps and agent teams.",
                  no_args_is_help=True, add_completion=False)
err = Console(stderr=True)


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The user message (or raw text with --raw)."),
    model: str = typer.Option(DEFAULT_MODEL, help="Packaged model, random:<config> or a checkpoint dir."),
    system: Optional[str] = typer.Option(None, help="System prompt (chat mode)."),
    max_tokens: int = typer.Option(128, min=1),
    temperature: float = typer.Option(0.0, min=0.0),
    top_p: float = typer.Option(1.0),
    top_k: int = typer.Option(0, min=0),
    seed: Optional[int] = typer.Option(None),
    stop: List[str] = typer.Option([], help="Stop sequence (repeatable)."),
    raw: bool = typer.Option(False, help="Complete the text as is, without the chat template."),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("float32"),
) -> None:
    """Generate with the embedded engine, streaming tokens to stdout."""
    from ctxcache.engine import Engine, SamplingParams, stream

    try:
        t0 = time.perf_counter()
        engine = Engine.load(model, device=device, dtype=dtype)
        err.print(f"[dim]loaded {engine.name} in {time.perf_counter() - t0:.1f}s[/dim]")
        if raw:
            ids = engine.encode(prompt)
        else:
            msgs = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}]
            ids = engine.chat_ids(msgs)
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, seed=seed, stop=list(stop))
        t0 = time.perf_counter()
        n = 0
        ttft = None
        finish = None
        for chunk in stream(engine, ids, params):
            if ttft is None:
                ttft = time.perf_counter() - t0
            n += chunk.token_id is not None
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            finish = chunk.finish_reason or finish
        sys.stdout.write("\n")
        dt = time.perf_counter() - t0
        err.print(f"[dim]{len(ids)} prompt tokens, {n} generated, TTFT {ttft * 1e3:.0f} ms, "
                  f"{n / dt:.1f} tok/s, finish={finish}[/dim]")
    except CtxCacheError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)


@app.command()
def models() -> None:
    """List the models that can be named without a checkpoint directory."""
    for name in available_models():
        print(name)


if __name__ == "__main__":
    app()
