"""CrewAI memory kept in botwire-stream: run it twice, the second run recalls the first's memories.

    pip install 'botwire-stream[crewai]'
    python examples/crewai_memory.py

Uses the embedded server (or BOTWIRE_URL). A real crew passes its LLM and embedder to
``Memory(...)`` and the memory to ``Crew(memory=...)``; this example stores and recalls directly,
with a toy embedder and explicit scope/categories/importance, so that it needs no model or key.
"""

from __future__ import annotations

import hashlib
import math
import re
import sys
from datetime import datetime

from crewai.memory import Memory

from botwire_stream.integrations.crewai import BotWireStorage, memory_tools


def toy_embedder(texts: list[str]) -> list[list[float]]:
    """Bag of words hashed into 64 dimensions (use a real embedding model in an app)."""
    out = []
    for text in texts:
        vec = [0.0] * 64
        for word in re.findall(r"[a-z0-9]+", text.lower()):
            vec[int(hashlib.sha256(word.encode()).hexdigest(), 16) % 64] += 1.0
        norm = math.sqrt(sum(x * x for x in vec)) or 1.0
        out.append([x / norm for x in vec])
    return out


def main() -> None:
    storage = BotWireStorage("crewai-example")
    memory = Memory(storage=storage, embedder=toy_embedder, llm="gpt-4o-mini")  # the LLM is not called here
    print("remembered before:", [m.record.content for m in memory.recall("when is the launch", depth="shallow")])
    fact = f"the launch review was held at {datetime.now():%H:%M:%S}"
    memory.remember(fact, scope="/project/launch", categories=["meeting"], importance=0.7)
    print("stored:", fact, "| records in /project:", storage.count("/project"))
    # tools an agent can call: Agent(..., tools=memory_tools("crewai-example-facts"))
    remember, recall, list_keys, forget = memory_tools("crewai-example-facts")
    print(remember.run(key="owner", value="Ada"), "|", recall.run(key="owner"), "|", list_keys.run())
    memory.close()
    storage.close()


if __name__ == "__main__":
    sys.exit(main())
