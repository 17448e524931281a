"""A FastAPI chat endpoint that streams its answer with SSE and survives disconnects and restarts.

Run: ``pip install botwire-stream fastapi uvicorn`` then ``uvicorn fastapi_sse:app --app-dir examples``.

- ``POST /chat/{session}`` ``{"content": "..."}``: the user message goes into the conversation
  (``AsyncChatHistory``), the answer is produced by a background task into a token stream
  (``AsyncTokenStream``), and the response streams it as SSE: first ``event: answer`` (its id),
  then one ``data:`` event per piece with ``id:`` = the offset after it, then ``event: done``.
- ``GET /answers/{answer}`` with ``Last-Event-ID`` (what ``EventSource`` sends on reconnect) or
  ``?offset=``: the rest of the answer from there: nothing twice, nothing missing.
- ``GET /chat/{session}``: the conversation, from any process.

The answer is produced apart from the request, so a client that disconnects (or a worker that
serves the reconnect) loses nothing; the finished answer is appended to the conversation.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Header, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from botwire_stream import AsyncChatHistory, AsyncTokenStream
from botwire_stream.errors import BotWireError, InvalidOffset, StreamNotFound
from botwire_stream.server.model import FakeModel
from botwire_stream.tokens import parse_offset

NAMESPACE = "examples"
# Your LLM goes here: anything that yields text pieces for a list of {"role", "content"} messages.
model = FakeModel(pace=float(os.environ.get("BOTWIRE_FAKE_PACE", "0.03")))

app = FastAPI(title="botwire-stream SSE chat")
_producing: set[asyncio.Task[None]] = set()  # keep a reference to each running producer


class Message(BaseModel):
    content: str = Field(min_length=1, max_length=32_000)


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


async def events(answer: str, offset: str) -> AsyncIterator[str]:
    stream = AsyncTokenStream(f"answers/{answer}")
    try:
        yield f"event: answer\ndata: {answer}\n\n"
        async for read in stream.follow(offset):
            if read.chunks:
                yield f"id: {read.next_offset}\ndata: {json.dumps(read.data.decode())}\n\n"
            if read.closed:
                yield "event: done\ndata: {}\n\n"
                return
    finally:
        await stream.close()


@app.post("/chat/{session}")
async def chat(session: str, message: Message) -> StreamingResponse:
    answer = uuid.uuid4().hex
    stream = AsyncTokenStream(f"answers/{answer}")
    history = AsyncChatHistory(session, namespace=NAMESPACE)
    try:
        await stream.create(content_type="text/plain", ttl=3600)  # gone an hour after its last read
        seq = await history.append({"role": "user", "content": message.content, "meta": {"answer": answer}})
        # up to this question: one posted at the same moment may already follow it
        recent = await history.entries(last=51)
        context = [{"role": e.message["role"], "content": e.message["content"]} for e in recent if e.seq <= seq][-50:]
    except BotWireError as exc:
        raise HTTPException(exc.http_status, str(exc)) from None
    finally:
        await stream.close()
        await history.close()
    task = asyncio.create_task(produce(session, answer, context))
    _producing.add(task)
    task.add_done_callback(_producing.discard)
    return StreamingResponse(events(answer, "-1"), media_type="text/event-stream")


@app.get("/answers/{answer}")
async def resume(answer: str, offset: str = "-1", last_event_id: str | None = Header(None)) -> StreamingResponse:
    start = last_event_id or offset
    try:
        parse_offset(start)
        async with AsyncTokenStream(f"answers/{answer}") as stream:
            await stream.info()
    except InvalidOffset as exc:
        raise HTTPException(400, str(exc)) from None
    except StreamNotFound:
        raise HTTPException(404, f"no answer {answer!r}") from None
    except BotWireError as exc:  # an answer id no stream can have (control characters, too long): 400
        raise HTTPException(exc.http_status, str(exc)) from None
    return StreamingResponse(events(answer, start), media_type="text/event-stream")


@app.get("/chat/{session}")
async def conversation(session: str) -> list[dict[str, Any]]:
    async with AsyncChatHistory(session, namespace=NAMESPACE) as history:
        return await history.messages()
