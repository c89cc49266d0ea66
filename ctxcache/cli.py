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
console = Console()


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
def serve(
    host: Optional[str] = typer.Option(None, help="Bind address (default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, help="Port (default 8000)."),
    model: Optional[str] = typer.Option(None, help="Model for the embedded engine."),
    backend: Optional[str] = typer.Option(None, help="embedded | sglang"),
    sglang_url: Optional[str] = typer.Option(None, help="SGLang server URL (backend sglang)."),
    log_level: str = typer.Option("info"),
) -> None:
    """Run the gateway (OpenAI-compatible + native API). Settings: CTXCACHE_* env vars or
    a config file named by CTXCACHE_CONFIG; options here override both."""
    import uvicorn

    from ctxcache.service.app import create_app
    from ctxcache.service.settings import Settings

    overrides = {k: v for k, v in dict(host=host, port=port, model=model, backend=backend,
                                       sglang_url=sglang_url).items() if v is not None}
    settings = Settings.load(**overrides)
    err.print(f"[bold]ctxcache[/bold] gateway on http://{settings.host}:{settings.port} "
              f"(backend {settings.backend}, model {settings.model}) — loading…")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=log_level)


@app.command()
def engine(
    api: str = typer.Option("sglang", help="HTTP schema to speak (sglang)."),
    model: str = typer.Option(DEFAULT_MODEL),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(30000),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("float32"),
) -> None:
    """Serve the embedded engine alone behind SGLang's HTTP API (/generate, …)."""
    import uvicorn

    from ctxcache.engine import Engine
    from ctxcache.service.sglang_server import create_sglang_app

    if api != "sglang":
        err.print("[red]error:[/red] only --api sglang is supported")
        raise typer.Exit(2)
    eng = Engine.load(model, device=device, dtype=dtype)
    uvicorn.run(create_sglang_app(eng), host=host, port=port, log_level="warning")


def _client(url: str, key: Optional[str]):
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=600)


@app.command()
def ingest(
    paths: List[str] = typer.Argument(..., help="Text/Markdown files or directories."),
    url: str = typer.Option("http://127.0.0.1:8000", envvar="CTXCACHE_URL"),
    key: Optional[str] = typer.Option(None, envvar="CTXCACHE_API_KEY"),
    public: bool = typer.Option(False, help="Share with every tenant."),
) -> None:
    """Send documents to a running gateway: chunked, prefilled and cached there."""
    from pathlib import Path

    from rich.progress import Progress

    files = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            files += sorted(f for f in path.rglob("*") if f.suffix in (".txt", ".md", ".rst"))
        elif path.is_file():
            files.append(path)
        else:
            err.print(f"[red]error:[/red] {p} does not exist")
            raise typer.Exit(2)
    if not files:
        err.print("[red]error:[/red] no .txt/.md/.rst files found")
        raise typer.Exit(2)
    with _client(url, key) as c, Progress(console=err) as progress:
        task = progress.add_task("ingesting", total=len(files))
        for f in files:
            r = c.post("/v1/documents", json={"documents": [
                {"text": f.read_text(errors="replace"), "title": f.name}], "public": public})
            if r.status_code != 200:
                err.print(f"[red]{f}: {r.status_code} {r.text[:200]}[/red]")
                raise typer.Exit(1)
            d = r.json()["data"][0]
            progress.console.print(f"{f.name}: {d['id']} ({d['chunks']} chunks, "
                                   f"{d['tokens']} tokens{'' if d['created'] else ', existed'})")
            progress.advance(task)


cache_app = typer.Typer(help="Inspect and manage a running gateway's caches.")
app.add_typer(cache_app, name="cache")


@cache_app.command("stats")
def cache_stats(url: str = typer.Option("http://127.0.0.1:8000", envvar="CTXCACHE_URL"),
                key: Optional[str] = typer.Option(None, envvar="CTXCACHE_API_KEY")) -> None:
    """Per-category semantic cache and per-tier KV statistics."""
    from rich.table import Table

    with _client(url, key) as c:
        r = c.get("/v1/cache/stats")
    if r.status_code != 200:
        err.print(f"[red]{r.status_code}: {r.text[:300]}[/red]")
        raise typer.Exit(1)
    data = r.json()
    out = Console()
    if "semantic" in data:
        t = Table(title="semantic cache")
        for col in ("category", "entries", "lookups", "hits", "hit rate", "p50 ms"):
            t.add_column(col)
        for cat, s in data["semantic"].items():
            p50 = s.get("latency_ms_p50")
            t.add_row(cat, str(s["entries"]), str(s["lookups"]), str(s["hits"]),
                      f"{s['hit_rate']:.2f}", "-" if p50 is None else f"{p50:.2f}")
        out.print(t)
    if "kv" in data:
        t = Table(title="chunk KV store")
        for col in ("tier", "entries", "used MiB", "capacity MiB", "hits", "healthy"):
            t.add_column(col)
        for tier in data["kv"]["tiers"]:
            t.add_row(tier["name"], str(tier["entries"]), f"{tier['used_bytes'] / 2**20:.1f}",
                      f"{tier['capacity_bytes'] / 2**20:.0f}", str(tier["hits"]),
                      str(tier["healthy"]))
        out.print(t)


@app.command()
def bench(name: str = typer.Argument(..., help="engine | kvstore | fidelity | semantic | gateway | ttft"),
          args: List[str] = typer.Argument(None, help="Arguments passed to the benchmark.")) -> None:
    """Run one of the scripts in benchmarks/ (from a source checkout)."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    if not script.is_file():
        err.print(f"[red]error:[/red] no benchmark {name!r} (needs a source checkout)")
        raise typer.Exit(2)
    raise typer.Exit(subprocess.call([sys.executable, str(script), *(args or [])]))


@app.command()
def models() -> None:
    """List the models that can be named without a checkpoint directory, and which are installed
    (a GGUF file path or an HF checkpoint directory can always be given instead)."""
    from rich.markup import escape
    from rich.table import Table

    from ctxcache.engine.packaged import installed

    table = Table("model", "status", "what it is")
    for name, status, desc in installed():
        table.add_row(name, escape(status), desc)
    for name in available_models():
        if name.startswith("random:"):
            table.add_row(name, "built in", "random weights in this shape (speed benchmarks)")
    console.print(table)


if __name__ == "__main__":
    app()
