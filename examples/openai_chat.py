"""Chat with the gateway through the official openai client (start it with `ctxcache serve`).

    python examples/openai_chat.py
The second identical question is answered from the semantic cache (see the `ctxcache` field).
"""

import os
import time

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("CTXCACHE_URL", "http://127.0.0.1:8000") + "/v1",
                api_key=os.environ.get("CTXCACHE_API_KEY", "none"))
model = client.models.list().data[0].id
for attempt in range(2):
    t0 = time.perf_counter()
    r = client.chat.completions.create(model=model, max_tokens=48, messages=[
        {"role": "user", "content": "What is the capital of France?"}])
    print(f"[{(time.perf_counter() - t0) * 1e3:.0f} ms] {r.choices[0].message.content!r} "
          f"{(r.model_extra or {}).get('ctxcache')}")

print("streaming: ", end="")
for chunk in client.chat.completions.create(model=model, max_tokens=48, stream=True, messages=[
        {"role": "user", "content": "Name three primary colors."}]):
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
