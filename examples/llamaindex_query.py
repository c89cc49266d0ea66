"""A LlamaIndex query engine on the gateway: any index and retriever, with CtxCacheSynthesizer
sending the retrieved nodes as cacheable chunks (their KV is prefilled once, then reused).

    ctxcache serve &
    pip install -e adapters/llama-index-llms-ctxcache
    python examples/llamaindex_query.py
"""

from llama_index.core import Document, SimpleKeywordTableIndex
from llama_index.core.query_engine import RetrieverQueryEngine

from llama_index.llms.ctxcache import CtxCache, CtxCacheSynthesizer

llm = CtxCache(max_tokens=48, temperature=0.0)
docs = [Document(text=t) for t in (
    "The Danube rises in the Black Forest in Germany and flows into the Black Sea.",
    "The Rhine begins in the Swiss Alps and flows into the North Sea.",
    "The Seine flows through Paris into the English Channel.")]
index = SimpleKeywordTableIndex.from_documents(docs, llm=llm)  # keyword index: no embeddings
synth = CtxCacheSynthesizer(llm=llm)
engine = RetrieverQueryEngine(index.as_retriever(retriever_mode="simple"),
                              response_synthesizer=synth)
for q in ("Where does the Danube rise?", "Which river flows through Paris?"):
    r = engine.query(q)
    meta = synth.last_meta
    print(f"{q} -> {str(r).strip()} | {meta['strategy']}, reused {meta['reused_tokens']} "
          f"prompt tokens")
