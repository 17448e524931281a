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
serves the reconnect) loses nothing; the finished answer is appended to the conversation. The
model and that producer are in ``_answers.py`` beside this file (shared with ``fastapi_ws.py``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from _answers import NAMESPACE, start_answer  # the model and the background producer, shared with fastapi_ws.py
from fastapi import FastAPI, Header, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from botwire_stream import AsyncChatHistory, AsyncTokenStream
from botwire_stream.errors import BotWireError, InvalidOffset, StreamNotFound
from botwire_stream.tokens import parse_offset

app = FastAPI(title="botwire-stream SSE chat")


class Message(BaseModel):
    content: str = Field(min_length=1, max_length=32_000)


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
    try:
        answer = await start_answer(session, message.content)
    except BotWireError as exc:
        raise HTTPException(exc.http_status, str(exc)) from None
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
