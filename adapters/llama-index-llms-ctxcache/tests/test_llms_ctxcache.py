"""The LLM class (LlamaIndex's conventional checks) and a real query engine end to end."""

from llama_index.core.base.llms.base import BaseLLM
from llama_index.core.base.llms.types import ChatMessage

from llama_index.llms.ctxcache import CtxCache, CtxCacheSynthesizer
from llama_index.llms.ctxcache.base import ctxcache_meta

FACTS = [
    "Lake Baikal in Siberia is the deepest lake in the world, 1,642 metres at its deepest.",
    "Mount Everest, on the border of Nepal and China, is the highest mountain above sea level.",
    "The Nile and the Amazon are the two longest rivers on Earth.",
]


def test_class():
    names_of_base_classes = [b.__name__ for b in CtxCache.__mro__]
    assert BaseLLM.__name__ in names_of_base_classes
    llm = CtxCache(api_base="http://127.0.0.1:9/v1", category="code", semantic_cache=False)
    kw = llm._get_model_kwargs(passages=["p"], strategy="full")
    assert kw["extra_body"] == {"cache": False, "category": "code", "passages": ["p"],
                                "strategy": "full"}
    assert "passages" not in kw and llm.metadata.is_chat_model


def test_chat_complete_stream(gateway_url):
    llm = CtxCache(max_tokens=24, temperature=0.0, semantic_cache=False)
    r = llm.chat([ChatMessage(role="user", content="What is the capital of France?")])
    assert "Paris" in r.message.content
    assert ctxcache_meta(r)["cache"] == "off"
    assert "Paris" in llm.complete("What is the capital of France?").text
    streamed = "".join(x.delta or "" for x in llm.stream_chat(
        [ChatMessage(role="user", content="Which lake is the deepest in the world?")],
        passages=[FACTS[0]]))
    assert "Baikal" in streamed


def _engine(llm, streaming=False, strategy=None):
    from llama_index.core import Document, SimpleKeywordTableIndex
    from llama_index.core.query_engine import RetrieverQueryEngine

    index = SimpleKeywordTableIndex.from_documents(
        [Document(text=t, metadata={"source": f"facts/{i}"}) for i, t in enumerate(FACTS)],
        llm=llm)
    synth = CtxCacheSynthesizer(llm=llm, streaming=streaming, strategy=strategy)
    return RetrieverQueryEngine(index.as_retriever(retriever_mode="simple"),
                                response_synthesizer=synth), synth


def test_query_engine_reuses_retrieved_chunks(gateway_url):
    llm = CtxCache(max_tokens=24, temperature=0.0, semantic_cache=False)
    engine, synth = _engine(llm)
    first = engine.query("Which lake is the deepest?")
    assert "Baikal" in str(first)
    assert first.source_nodes and first.metadata["ctxcache"]["strategy"]
    again = engine.query("How deep is the deepest lake?")  # same chunk retrieved again
    assert synth.last_meta["reused_tokens"] > 0
    assert again.source_nodes
    s_engine, s_synth = _engine(llm, streaming=True, strategy="full")
    streamed = s_engine.query("Which lake is the deepest?")
    text = "".join(streamed.response_gen)
    assert "Baikal" in text and s_synth.last_meta["strategy"] == "full"


async def test_query_engine_async(gateway_url):
    llm = CtxCache(max_tokens=24, temperature=0.0, semantic_cache=False)
    engine, _ = _engine(llm)
    r = await engine.aquery("Which is the highest mountain above sea level?")
    assert "Everest" in str(r)
