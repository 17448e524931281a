"""The compaction consumer: summarise each conversation that grew past a size since its last summary.

``botwire consume compact -n NS --summarise module:function [--max-messages N] [--max-bytes B]
[--keep K]``. After each batch of events, each conversation with new messages is looked at: when
the messages after its last summary (``AsyncChatHistory.compact``) number more than
``max_messages`` or encode to more than ``max_bytes``, all of them but the newest ``keep`` are
given to the summarise function, preceded by the last summary's message when there is one (so
that the new summary covers the whole conversation up to it), and what it returns is recorded
with ``compact(summary, upto=<the last message summarised>)``. ``messages(window=N)`` then
returns that summary and the messages after it; the messages themselves stay in the log.

Idempotent under redelivery and restart: what to summarise is decided from the conversation as
stored (its last summary's ``upto``), never from the events, which only say which conversations
to look at. A redelivered event, or a restart after a crash between recording a summary and
acknowledging its events, finds the range already summarised: each summary covers the messages
after the previous one's ``upto``, so no range is summarised twice (one process per consumer
name is expected, as for every consumer here).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, Final

import msgspec
from nats.aio.msg import Msg

from botwire_stream import AsyncChatHistory, keys
from botwire_stream.errors import InvalidArgument

from .runtime import Source, Worker

__all__ = ["Compactor", "load_summariser"]

_PARALLEL: Final = 16  # conversations looked at (and summarised) at once

Summariser = Callable[[list[dict[str, Any]]], Any]  # messages -> str or a message (dict), or an awaitable


def load_summariser(path: str) -> Summariser:
    """The callable named ``module:function`` (``module.sub:obj.attr`` too); ``InvalidArgument``
    when it cannot be imported or is not callable. The current directory is importable, as for
    ``python -m``, so a summariser next to where the consumer is started is found."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise InvalidArgument(f"--summarise takes module:function, not {path!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise InvalidArgument(f"cannot load the summariser {path!r}: {exc}") from exc
    if not callable(obj):
        raise InvalidArgument(f"the summariser {path!r} is not callable")
    fn: Summariser = obj
    return fn


class Compactor(Worker):
    """``botwire consume compact``: keeps each conversation's unsummarised part under a size."""

    kind = "compact"
    batch = 500

    def __init__(
        self,
        namespaces: Sequence[str],
        summarise: Summariser,
        *,
        max_messages: int | None = 100,
        max_bytes: int | None = None,
        keep: int = 0,
        url: str | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(namespaces, ["chat"], name=name)
        if max_messages is None and max_bytes is None:
            raise InvalidArgument("give max_messages or max_bytes (or both): when to summarise")
        for label, value in (("max_messages", max_messages), ("max_bytes", max_bytes), ("keep", keep)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise InvalidArgument(f"{label} must be a non-negative int, not {value!r}")
        self.summarise = summarise
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.keep = keep
        self.url = url
        self.recorded = 0  # summaries recorded by this run

    async def handle(self, source: Source, msgs: list[Msg], caught_up: bool) -> None:
        touched: dict[str, None] = {}
        for m in msgs:
            is_event, token = source.token(m)
            if not is_event and m.data:  # a new message (summaries, clears and expiries add none)
                touched[keys.decode_key(token)] = None
        sessions = list(touched)
        for i in range(0, len(sessions), _PARALLEL):
            await asyncio.gather(*(self._look(source.namespace, s) for s in sessions[i : i + _PARALLEL]))
        for m in msgs:
            await m.ack()

    def _over(self, messages: list[dict[str, Any]]) -> bool:
        if self.max_messages is not None and len(messages) > self.max_messages:
            return True
        return self.max_bytes is not None and sum(len(msgspec.json.encode(m)) for m in messages) > self.max_bytes

    async def _look(self, namespace: str, session_id: str) -> None:
        async with AsyncChatHistory(session_id, namespace=namespace, url=self.url) as chat:
            last = await chat.last_summary()
            entries = await chat.entries(after=None if last is None else last.upto)
            if not self._over([e.message for e in entries]):
                return
            todo = entries[: len(entries) - self.keep] if self.keep else entries
            if not todo:
                return
            head = [] if last is None or last.value is None else [last.value]
            summary = await self._call(head + [e.message for e in todo])
            if not await self.held():  # stalled in the summariser and taken over: the new holder records it
                return
            await chat.compact(summary, upto=todo[-1].seq)
            self.recorded += 1

    async def _call(self, messages: list[dict[str, Any]]) -> Any:
        """The summariser's answer: a coroutine function awaited, a plain one run on a thread
        (a blocking model call must not stall the acknowledgements of other batches)."""
        if inspect.iscoroutinefunction(self.summarise):
            return await self.summarise(messages)
        result = await asyncio.to_thread(self.summarise, messages)
        return await result if inspect.isawaitable(result) else result
