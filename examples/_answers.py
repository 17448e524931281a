"""What the FastAPI examples share: the model, and an answer produced apart from the request.

``start_answer`` appends the user's message to the conversation (``AsyncChatHistory``), creates
the answer's token stream (``AsyncTokenStream``) and starts a background task that writes the
model's pieces into it, then appends the finished answer to the conversation. A client that
disconnects stops nothing: it resumes the stream from its last offset. ``fastapi_sse.py`` and
``fastapi_ws.py`` import it (``uvicorn ... --app-dir examples`` puts this folder on the path).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any

from botwire_stream import AsyncChatHistory, AsyncTokenStream
from botwire_stream.server.model import FakeModel

NAMESPACE = "examples"
# Your LLM goes here: anything that yields text pieces for a list of {"role", "content"} messages.
model = FakeModel(pace=float(os.environ.get("BOTWIRE_FAKE_PACE", "0.03")))

_producing: set[asyncio.Task[None]] = set()  # keep a reference to each running producer


async def produce(session: str, answer: str, history: list[dict[str, Any]]) -> None:
    """The model's pieces into the answer's stream, then the whole answer into the conversation."""
    stream = AsyncTokenStream(f"answers/{answer}")
    chat = AsyncChatHistory(session, namespace=NAMESPACE)
    pieces: list[str] = []
    try:
        async for piece in model.stream(history):
            pieces.append(piece)
            await stream.append(piece)
        await stream.close_stream()
        await chat.append({"role": "assistant", "content": "".join(pieces), "meta": {"answer": answer}})
    finally:
        await stream.close()
        await chat.close()


async def start_answer(session: str, content: str) -> str:
    """Append the user's ``content`` to ``session``, start producing the answer: its id (the
    stream ``answers/{id}``, followed from offset ``-1``). ``BotWireError`` when refused."""
    answer = uuid.uuid4().hex
    stream = AsyncTokenStream(f"answers/{answer}")
    history = AsyncChatHistory(session, namespace=NAMESPACE)
    try:
        await stream.create(content_type="text/plain", ttl=3600)  # gone an hour after its last read
        seq = await history.append({"role": "user", "content": content, "meta": {"answer": answer}})
        # up to this question: one posted at the same moment may already follow it
        recent = await history.entries(last=51)
        context = [{"role": e.message["role"], "content": e.message["content"]} for e in recent if e.seq <= seq][-50:]
    finally:
        await stream.close()
        await history.close()
    task = asyncio.create_task(produce(session, answer, context))
    _producing.add(task)
    task.add_done_callback(_producing.discard)
    return answer
