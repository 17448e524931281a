"""Models for the chat endpoint's tests, named by ``BOTWIRE_CHAT_MODEL=tests.chat_models:<name>``,
and a stand-in OpenAI-compatible server (``python -m uvicorn tests.chat_models:openai_app``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

OPENAI_KEY = "sk-test-botwire"
OPENAI_PIECES = ["Hello", " from", " an", " OpenAI-compatible", " endpoint", "."]


def langchain_model() -> GenericFakeChatModel:
    """LangChain's own fake chat model: streams its message word by word."""
    return GenericFakeChatModel(messages=iter([AIMessage(content="Hello from a LangChain chat model")]))


class _Failing:
    """Streams three pieces, then fails as a model whose connection broke."""

    async def astream(self, messages: Any) -> AsyncIterator[AIMessage]:
        for word in ["partial", " answer", " then"]:
            await asyncio.sleep(0.01)
            yield AIMessage(content=word)
        raise ConnectionError("the model's connection broke")


failing = _Failing()


async def _completions(request: Request) -> Response:
    if request.headers.get("authorization") != f"Bearer {OPENAI_KEY}":
        return JSONResponse({"error": {"message": "bad key"}}, 401)
    body = await request.json()
    assert body["stream"] is True and body["messages"][-1]["role"] == "user"

    async def events() -> AsyncIterator[bytes]:
        yield b'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n'
        for piece in OPENAI_PIECES:
            yield b"data: " + json.dumps({"choices": [{"delta": {"content": piece}}]}).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


openai_app = Starlette(routes=[Route("/v1/chat/completions", _completions, methods=["POST"])])
