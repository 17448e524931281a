"""A scripted CrewAI LLM and a deterministic embedder for the CrewAI tests (no network, no model).

Also a worker: ``python -m tests.crewai_fakes URL NAMESPACE FACT`` runs a one-agent crew whose
memory is a ``BotWireStorage`` and prints JSON: the answer, and what the LLM saw of past memories.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from typing import Any

from crewai.llms.base_llm import BaseLLM
from crewai.utilities.i18n import I18N_DEFAULT


def embed(texts: list[str]) -> list[list[float]]:
    """Bag of words hashed into 64 dimensions, normalised: the same text gives the same vector in
    every process, and texts sharing words are close."""
    out = []
    for text in texts:
        vec = [0.0] * 64
        for word in re.findall(r"[a-z0-9]+", text.lower()):
            vec[int(hashlib.sha256(word.encode()).hexdigest(), 16) % 64] += 1.0
        norm = math.sqrt(sum(x * x for x in vec)) or 1.0
        out.append([x / norm for x in vec])
    return out


def _prompt(key: str) -> str:
    return str(I18N_DEFAULT.memory(key))


class ScriptedLLM(BaseLLM):
    """Answers CrewAI's memory prompts with fixed JSON and an agent's prompt with the next scripted
    reply (``{seen}`` in a reply is replaced by the memories the prompt carried, or "nothing")."""

    replies: list[str] = []
    prompts: list[str] = []

    def call(
        self,
        messages: Any,
        tools: Any = None,
        callbacks: Any = None,
        available_functions: Any = None,
        from_task: Any = None,
        from_agent: Any = None,
        response_model: Any = None,
    ) -> str:
        msgs = [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
        system = next((str(m.get("content")) for m in msgs if m.get("role") == "system"), "")
        text = "\n".join(str(m.get("content")) for m in msgs)
        if system == _prompt("extract_memories_system"):
            facts = re.findall(r"FACT: ([^\n.]+)", text)
            return json.dumps({"memories": facts[-1:]})
        if system == _prompt("save_system"):
            return json.dumps({"suggested_scope": "/facts", "categories": ["fact"], "importance": 0.9})
        if system == _prompt("query_system"):
            return json.dumps({"keywords": [], "suggested_scopes": ["/"], "complexity": "simple", "recall_queries": []})
        if system == _prompt("consolidation_system"):
            return json.dumps({"actions": [], "insert_new": True})
        self.prompts.append(text)
        seen = (
            re.findall(r"FACT: [^\n]*|- (?:\S.*colour.*)", text.split("# Memories from past conversations:")[-1])
            if "# Memories from past conversations:" in text
            else []
        )
        reply = self.replies.pop(0) if self.replies else "Thought: done\nFinal Answer: done"
        return reply.replace("{seen}", "; ".join(seen) or "nothing")

    def supports_function_calling(self) -> bool:
        return False


def run_crew(url: str, namespace: str, fact: str) -> dict[str, Any]:
    from crewai import Agent, Crew, Task
    from crewai.memory import Memory

    from botwire_stream.integrations.crewai import BotWireStorage

    llm = ScriptedLLM(model="scripted")
    llm.replies = [f"Thought: I know it\nFinal Answer: remembered before: {{seen}}. FACT: {fact}."]
    storage = BotWireStorage(namespace, url=url)
    memory = Memory(storage=storage, llm=llm, embedder=embed)
    agent = Agent(role="Assistant", goal="Remember what the user says", backstory="A careful note taker", llm=llm)
    task = Task(description="What is the user's favourite colour?", expected_output="One sentence", agent=agent)
    crew = Crew(agents=[agent], tasks=[task], memory=memory)
    result = crew.kickoff()
    memory.drain_writes()
    return {"answer": str(result), "records": [r.content for r in storage.list_records()]}


if __name__ == "__main__":
    print(json.dumps(run_crew(sys.argv[1], sys.argv[2], sys.argv[3])))
