"""Three agents sharing one conversation over the REST API: each message's KV is computed once
and reused by every agent under its own system prompt (KVCOMM by default).

    ctxcache serve &
    python examples/agents_team.py
"""

import os

import httpx

client = httpx.Client(base_url=os.environ.get("CTXCACHE_URL", "http://127.0.0.1:8000"),
                      timeout=300)
session = client.post("/v1/agents/sessions", json={
    "shared_context": "The team is planning a three-day trip to Japan in spring.",
    "agents": {"planner": "You are the planner. Propose concrete day plans.",
               "budget": "You are the budget officer. Comment on costs.",
               "critic": "You are the critic. Point out one risk."}}).json()
sid = session["id"]
client.post(f"/v1/agents/sessions/{sid}/messages",
            json={"agent": "user", "content": "We land in Tokyo on Friday morning."})
for round_ in range(2):
    for agent in ("planner", "budget", "critic"):
        out = client.post(f"/v1/agents/sessions/{sid}/generate",
                          json={"agent": agent, "max_tokens": 60}).json()
        meta = out["ctxcache"]
        print(f"[{agent}] {out['content'].strip()}\n    {meta['strategy']}: reused "
              f"{meta['reused_tokens']} prompt tokens, recomputed {meta['recomputed_tokens']}")
