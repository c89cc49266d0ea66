"""An agent team in plain Python on the embedded engine (no server): every message is encoded
once and reused by each agent under its own system prompt; KVCOMM corrects the K/V of the
shared messages from its anchor pool.

    python examples/agents_python.py            # SmolLM2 on CPU
    CTXCACHE_MODEL=qwen2.5-coder-0.5b-instruct python examples/agents_python.py
"""

import os

from ctxcache.agents.team import Team
from ctxcache.engine import Engine

engine = Engine.load(os.environ.get("CTXCACHE_MODEL", "smollm2-135m-instruct"))
team = Team(engine, shared_context="The team plans a three-day trip to Japan in spring.",
            agents={"planner": "You are the planner. Propose concrete day plans.",
                    "budget": "You are the budget officer. Comment on costs.",
                    "critic": "You are the critic. Point out one risk."})
team.say("user", "We land in Tokyo on Friday morning and leave from Osaka on Sunday night.")
for round_ in range(2):
    for agent in ("planner", "budget", "critic"):
        reply = team.generate(agent, max_tokens=48)
        s = reply.stats
        print(f"[{agent}] {reply.text}\n    routes {s['routes']}, shared tokens reused "
              f"{s['shared_reuse_rate']:.0%}, recomputed {s['recomputed_tokens']} of "
              f"{s['prompt_tokens']} prompt tokens")
