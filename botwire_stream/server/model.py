"""Chat models behind one small interface: ``stream(messages)`` yields the answer's text pieces.

- ``FakeModel`` (the default): deterministic local text with a configurable delay per token, so
  the demo and the tests need no network and no key; ``pace=0`` streams at full speed.
- ``LangChainModel``: any LangChain chat model (its ``astream``).
- ``OpenAIModel``: an OpenAI-compatible ``/chat/completions`` endpoint, streamed with httpx.

``model_from_env()`` picks one from ``BOTWIRE_CHAT_MODEL`` (``fake``, ``openai``, or
``module:attribute`` naming a LangChain chat model or a factory of one).
"""

from __future__ import annotations

import asyncio
import importlib
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Protocol

import msgspec

from ..errors import InvalidArgument

__all__ = ["ChatModel", "FakeModel", "LangChainModel", "OpenAIModel", "model_from_env"]

Message = Mapping[str, Any]

_WORDS = (
    "Every token of this answer is appended to a durable stream in NATS as it is produced, so a "
    "reader that reloads the page resumes from its last offset and misses nothing. The "
    "conversation itself is an append-only log: it survives reloads, server restarts and a "
    "second tab, and any process that opens the same namespace reads the same history. If the "
    "process producing an answer dies, its lease expires and another process closes the stream, "
    "keeping the partial answer marked incomplete."
).split(" ")


class ChatModel(Protocol):
    """What the chat endpoint needs of a model: the answer to ``messages`` as text pieces."""

    def stream(self, messages: Sequence[Message]) -> AsyncIterator[str]: ...


class FakeModel:
    """A deterministic stand-in for an LLM: ``tokens`` words (default: one paragraph, 82) after
    an echo of the last user message, each after ``pace`` seconds (default 0.03 s, about a real
    model's speed)."""

    def __init__(self, *, pace: float = 0.03, tokens: int = len(_WORDS)) -> None:
        if pace < 0 or tokens < 1:
            raise InvalidArgument("FakeModel needs pace >= 0 and tokens >= 1")
        self.pace = pace
        self.tokens = tokens

    def answer(self, messages: Sequence[Message]) -> list[str]:
        """The whole answer, piece by piece (what ``stream`` yields): the tests compare with it."""
        last = next((str(m.get("content", "")) for m in reversed(messages) if m.get("role") == "user"), "")
        echo = " ".join(last.split()[:12])
        pieces = [f"You said: {echo}."] if echo else []
        for i in range(self.tokens):
            pieces.append(" " + _WORDS[i % len(_WORDS)])
        return pieces

    async def stream(self, messages: Sequence[Message]) -> AsyncIterator[str]:
        for piece in self.answer(messages):
            if self.pace:
                await asyncio.sleep(self.pace)
            yield piece


class LangChainModel:
    """Any LangChain chat model (``BaseChatModel``): messages go in as (role, content) pairs."""

    def __init__(self, model: Any) -> None:
        if not hasattr(model, "astream"):
            raise InvalidArgument(f"{model!r} is not a LangChain chat model (no astream)")
        self.model = model

    async def stream(self, messages: Sequence[Message]) -> AsyncIterator[str]:
        pairs = [(str(m.get("role", "user")), str(m.get("content", ""))) for m in messages]
        async for chunk in self.model.astream(pairs):
            text = chunk.content if isinstance(chunk.content, str) else str(chunk.text)
            if text:
                yield text


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta = msgspec.field(default_factory=_Delta)


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = msgspec.field(default_factory=list)


class OpenAIModel:
    """An OpenAI-compatible endpoint (``base_url`` ending in ``/v1``), streamed with httpx."""

    def __init__(self, *, base_url: str, api_key: str | None, model: str, timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.model = model
        self.timeout = timeout

    async def stream(self, messages: Sequence[Message]) -> AsyncIterator[str]:
        import httpx  # only this adapter needs it

        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        body = {
            "model": self.model,
            "stream": True,
            "messages": [{"role": str(m.get("role", "user")), "content": str(m.get("content", ""))} for m in messages],
        }
        decoder = msgspec.json.Decoder(_Chunk)
        async with httpx.AsyncClient(timeout=self.timeout) as client:
            async with client.stream("POST", f"{self.base_url}/chat/completions", json=body, headers=headers) as r:
                if r.status_code >= 400:
                    detail = (await r.aread())[:300].decode("utf-8", "replace")
                    raise RuntimeError(f"the model endpoint answered {r.status_code}: {detail}")
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    for choice in decoder.decode(data).choices:
                        if choice.delta.content:
                            yield choice.delta.content


def model_from_env(env: Mapping[str, str] | None = None) -> ChatModel:
    """The model ``BOTWIRE_CHAT_MODEL`` names: ``fake`` (default; ``BOTWIRE_FAKE_PACE`` seconds per
    token, ``BOTWIRE_FAKE_TOKENS``), ``openai`` (``OPENAI_BASE_URL``, ``OPENAI_API_KEY``,
    ``BOTWIRE_OPENAI_MODEL``), or ``package.module:attribute`` (a LangChain chat model, or a
    callable returning one)."""
    env = os.environ if env is None else env
    kind = env.get("BOTWIRE_CHAT_MODEL", "").strip() or "fake"
    try:
        if kind == "fake":
            return FakeModel(pace=float(env.get("BOTWIRE_FAKE_PACE", "0.03")), tokens=int(env.get("BOTWIRE_FAKE_TOKENS", str(len(_WORDS)))))
    except ValueError:
        raise InvalidArgument("BOTWIRE_FAKE_PACE must be seconds and BOTWIRE_FAKE_TOKENS a whole number") from None
    if kind == "openai":
        return OpenAIModel(
            base_url=env.get("OPENAI_BASE_URL", "https://api.openai.com/v1"),
            api_key=env.get("OPENAI_API_KEY"),
            model=env.get("BOTWIRE_OPENAI_MODEL", "gpt-4o-mini"),
        )
    module, sep, attr = kind.partition(":")
    if not sep:
        raise InvalidArgument(f"BOTWIRE_CHAT_MODEL must be fake, openai or module:attribute, not {kind!r}")
    target = getattr(importlib.import_module(module), attr)
    return LangChainModel(target() if callable(target) and not hasattr(target, "astream") else target)
