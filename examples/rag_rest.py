"""A small RAG app over the native REST API: ingest documents once (their chunk KV is
precomputed and cached), then ask questions that reuse it.

    ctxcache serve &            # in another terminal
    python examples/rag_rest.py
"""

import os

import httpx

URL = os.environ.get("CTXCACHE_URL", "http://127.0.0.1:8000")
headers = {"Authorization": f"Bearer {os.environ['CTXCACHE_API_KEY']}"} \
    if "CTXCACHE_API_KEY" in os.environ else {}
client = httpx.Client(base_url=URL, headers=headers, timeout=300)

docs = [
    {"title": "danube", "text": "The Danube is Europe's second-longest river. It rises in the "
     "Black Forest in Germany and flows into the Black Sea through Romania and Ukraine."},
    {"title": "rhine", "text": "The Rhine begins in the Swiss Alps, forms part of the border "
     "between Germany and France, and flows into the North Sea in the Netherlands."},
    {"title": "seine", "text": "The Seine flows through Paris and reaches the English Channel "
     "at Le Havre."},
]
ids = [d["id"] for d in client.post("/v1/documents", json={"documents": docs}).json()["data"]]
print("documents:", ids)

for question in ("Where does the Danube end?", "Which river flows through Paris?",
                 "Where does the Rhine begin?"):
    for strategy in ("full", "cacheblend"):
        r = client.post("/v1/rag", json={"question": question, "document_ids": ids,
                                          "strategy": strategy, "cache": False,
                                          "max_tokens": 48}).json()
        meta = r["ctxcache"]
        print(f"{strategy:>10}: {r['answer']!r}  (reused {meta['reused_tokens']} of "
              f"{r['usage']['prompt_tokens']} prompt tokens, TTFT {meta.get('ttft_ms')} ms)")
