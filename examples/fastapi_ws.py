"""A FastAPI chat endpoint over a WebSocket whose answers survive disconnects and restarts.

Run: ``pip install botwire-stream fastapi 'uvicorn[standard]'`` then
``uvicorn fastapi_ws:app --app-dir examples``.

On ``/ws/{session}`` the client sends ``{"content": "..."}`` to ask, or
``{"resume": "<answer>", "offset": "<offset>"}`` to get the rest of an answer after a reconnect.
The server sends ``{"answer": id}``, then ``{"token": text, "offset": offset}`` per piece (keep
the last offset), then ``{"done": true}``; a refusal is ``{"error": "..."}``. The conversation is an
``AsyncChatHistory``, the answer in flight an ``AsyncTokenStream`` written by a background task.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from botwire_stream import AsyncChatHistory, AsyncTokenStream
from botwire_stream.errors import BotWireError
from botwire_stream.server.model import FakeModel
from botwire_stream.tokens import parse_offset

NAMESPACE = "examples"
# Your LLM goes here: anything that yields text pieces for a list of {"role", "content"} messages.
model = FakeModel(pace=float(os.environ.get("BOTWIRE_FAKE_PACE", "0.03")))

app = FastAPI(title="botwire-stream WebSocket chat")
_producing: set[asyncio.Task[None]] = set()


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


async def ask(session: str, content: str) -> str:
    answer = uuid.uuid4().hex
    stream = AsyncTokenStream(f"answers/{answer}")
    history = AsyncChatHistory(session, namespace=NAMESPACE)
    try:
        await stream.create(content_type="text/plain", ttl=3600)
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


@app.websocket("/ws/{session}")
async def chat(websocket: WebSocket, session: str) -> None:
    await websocket.accept()
    try:
        while True:
            request = await websocket.receive_json()
            try:
                if isinstance(request.get("resume"), str):
                    answer, offset = request["resume"], str(request.get("offset", "-1"))
                elif isinstance(request.get("content"), str) and request["content"].strip():
                    answer, offset = await ask(session, request["content"]), "-1"
                else:
                    await websocket.send_json({"error": "send {'content': text} or {'resume': answer, 'offset': offset}"})
                    continue
                stream = AsyncTokenStream(f"answers/{answer}")
                try:
                    parse_offset(offset)  # InvalidOffset, before anything is sent
                    await stream.info()  # StreamNotFound
                    await websocket.send_json({"answer": answer})
                    async for read in stream.follow(offset):
                        if read.chunks:
                            await websocket.send_json({"token": read.data.decode(), "offset": read.next_offset})
                        if read.closed:
                            await websocket.send_json({"done": True})
                            break
                finally:
                    await stream.close()
            except BotWireError as exc:  # an unknown answer, a malformed offset...
                await websocket.send_json({"error": str(exc).split("\n", 1)[0]})
    except WebSocketDisconnect:
        pass  # the answer goes on being produced; the client resumes it from its last offset
