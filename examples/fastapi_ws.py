"""A FastAPI chat endpoint over a WebSocket whose answers survive disconnects and restarts.

Run: ``pip install botwire-stream fastapi 'uvicorn[standard]'`` then
``uvicorn fastapi_ws:app --app-dir examples``.

On ``/ws/{session}`` the client sends ``{"content": "..."}`` to ask, or
``{"resume": "<answer>", "offset": "<offset>"}`` to get the rest of an answer after a reconnect.
The server sends ``{"answer": id}``, then ``{"token": text, "offset": offset}`` per piece (keep
the last offset), then ``{"done": true}``; a refusal is ``{"error": "..."}``. The conversation is an
``AsyncChatHistory``, the answer in flight an ``AsyncTokenStream`` written by a background task
(the model and that producer are in ``_answers.py`` beside this file, shared with ``fastapi_sse.py``).
"""

from __future__ import annotations

from _answers import start_answer  # the model and the background producer, shared with fastapi_sse.py
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from botwire_stream import AsyncTokenStream
from botwire_stream.errors import BotWireError
from botwire_stream.tokens import parse_offset

app = FastAPI(title="botwire-stream WebSocket chat")


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
                    answer, offset = await start_answer(session, request["content"]), "-1"
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
