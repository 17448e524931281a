"""LangChain adapters: chat message history, byte store and LLM cache on NATS JetStream.

``pip install 'botwire-stream[langchain]'``, then::

    from botwire_stream.integrations.langchain import BotWireByteStore, BotWireCache, BotWireChatHistory

- ``BotWireChatHistory``: a ``BaseChatMessageHistory`` over ``AsyncChatHistory`` (for
  ``RunnableWithMessageHistory`` and langchain-classic's ``ConversationBufferMemory``).
- ``BotWireByteStore``: a ``BaseStore[str, bytes]`` over ``AsyncMemory`` (``ByteStore``).
- ``BotWireCache``: a ``BaseCache`` for LLM generations over ``AsyncMemory``.

Every class has native async methods that run on the caller's event loop (no thread hop); the
sync methods run the same code on botwire-stream's background loop (``botwire_stream.portal``).
Connections are per event loop, so each object keeps one core per loop it is used on: the
connection is shared with every other botwire object on that loop and is released by
``close()`` (the sync side) and ``aclose()`` (the calling loop), or by ``with``/``async with``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from datetime import timedelta
from typing import Any, Final

try:
    from langchain_core.caches import RETURN_VAL_TYPE, BaseCache
    from langchain_core.chat_history import BaseChatMessageHistory
    from langchain_core.messages import (
        BaseMessage,
        convert_to_messages,
        message_chunk_to_message,
        message_to_dict,
        messages_from_dict,
    )
    from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, Generation, GenerationChunk
    from langchain_core.stores import BaseStore
except ImportError as exc:  # tests/test_package.py runs this with langchain-core blocked
    from ..errors import MissingDependency

    raise MissingDependency(
        "botwire_stream.integrations.langchain needs langchain-core: pip install 'botwire-stream[langchain]'"
    ) from exc

from .. import keys
from ..chat import MAX_BATCH, AsyncChatHistory, _encode_message
from ..errors import InvalidMessage, InvalidValue
from ..keys import glob_escape
from ..memory import AsyncMemory
from ..portal import call
from ..times import ttl_seconds
from ._base import LoopBound, PerLoop, map_bounded, memory_cores

__all__ = ["BotWireByteStore", "BotWireCache", "BotWireChatHistory", "glob_escape"]

# -- chat message history ----------------------------------------------------------------------
def _message_dicts(messages: object) -> list[dict[str, Any]]:
    """The stored form of LangChain messages: ``message_to_dict`` of each, chunks made whole.

    Raises ``InvalidMessage`` before anything is written when an item is not a ``BaseMessage``.
    """
    if isinstance(messages, (BaseMessage, str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise InvalidMessage(
            f"add_messages takes a sequence of LangChain messages, not {type(messages).__name__}; "
            "use add_message for one message"
        )
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, BaseMessage):
            raise InvalidMessage(
                f"message {i} is a {type(message).__name__}, not a LangChain BaseMessage; "
                "convert it first (langchain_core.messages.convert_to_messages); nothing was written"
            )
        # A streamed AIMessageChunk (or any chunk) is stored as its whole-message class, with the
        # tool calls parsed from its tool_call_chunks.
        out.append(message_to_dict(message_chunk_to_message(message)))
    return out


def _to_message(stored: dict[str, Any]) -> BaseMessage:
    """A stored message back as a LangChain message.

    Our own writes are ``{"type", "data"}`` dicts; role-style dicts written through the plain
    ``ChatHistory`` API (``{"role": "user", "content": "hi"}``) are converted as LangChain does.
    """
    try:
        if "type" in stored and "data" in stored:
            return messages_from_dict([stored])[0]
        return convert_to_messages([stored])[0]
    except (ValueError, TypeError, KeyError) as exc:
        raise InvalidMessage(f"a stored message is not a LangChain message: {str(stored)[:200]} ({exc})") from exc


class BotWireChatHistory(LoopBound[AsyncChatHistory], BaseChatMessageHistory):
    """A LangChain chat message history kept in a botwire-stream conversation log.

    ``BotWireChatHistory("user-42", namespace="chat", ttl=3600)`` is shared by every process that
    opens the same session: appends are atomic and never lost under concurrent writers, and
    messages round-trip losslessly (tool calls, ``tool_call_id``, ids, ``additional_kwargs``,
    ``response_metadata``, usage). A streamed ``AIMessageChunk`` is stored as an ``AIMessage``.
    A message is stored as LangChain's ``message_to_dict`` gives it (pydantic models inside are
    dumped to dicts by LangChain); a value that JSON would not give back as it was (bytes,
    datetime, UUID, Decimal, Enum, tuples, sets, non-str keys, NaN) raises ``InvalidMessage`` (a
    ``TypeError``, as LangChain's JSON-based histories raise for most of them), nothing written.
    ``ttl`` (seconds): the conversation expires ``ttl`` after its last write. ``connect_options``
    are those of ``AsyncChatHistory`` (``token``, ``user``, ``password``, ``creds``, ``timeout``...).
    """

    def __init__(
        self,
        session_id: str,
        *,
        namespace: str = "chat",
        url: str | None = None,
        ttl: float | timedelta | None = None,
        **connect_options: Any,
    ) -> None:
        def make() -> AsyncChatHistory:
            return AsyncChatHistory(session_id, namespace=namespace, url=url, ttl=ttl, **connect_options)

        make()  # validates the arguments now, without connecting
        self.session_id = session_id
        self.namespace = namespace
        self.ttl = ttl_seconds(ttl)
        self._cores = PerLoop(make)

    # -- sync face (on the portal's loop) --------------------------------------------------------
    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        """The conversation's messages, oldest first."""
        return call(self.aget_messages)

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Append ``messages`` in order, atomically (up to 1000 per call are all-or-nothing)."""
        call(self.aadd_messages, messages)

    def add_message(self, message: BaseMessage) -> None:
        """Append one message."""
        self.add_messages([message])

    def clear(self) -> None:
        """Remove every message of the conversation."""
        call(self.aclear)

    # -- native async face (on the caller's loop) ------------------------------------------------
    async def aget_messages(self) -> list[BaseMessage]:
        """The conversation's messages, oldest first."""
        return [_to_message(d) for d in await self._cores.get().messages()]

    async def aadd_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Append ``messages`` in order as one atomic batch (longer lists: batches of 1000)."""
        dicts = _message_dicts(messages)
        if len(dicts) > MAX_BATCH:  # several batches: check them all before the first is written
            for d in dicts:
                _encode_message(d)
        core = self._cores.get()
        for i in range(0, len(dicts), MAX_BATCH):
            await core.extend(dicts[i : i + MAX_BATCH])

    async def aclear(self) -> None:
        """Remove every message of the conversation."""
        await self._cores.get().clear()

    def __repr__(self) -> str:
        return f"BotWireChatHistory({self.session_id!r}, namespace={self.namespace!r})"


# -- byte store --------------------------------------------------------------------------------
def _as_bytes(value: object, key: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise InvalidValue(f"the value of {key!r} is a {type(value).__name__}; a byte store holds bytes")


class BotWireByteStore(LoopBound[AsyncMemory], BaseStore[str, bytes]):
    """A LangChain ``ByteStore`` (``BaseStore[str, bytes]``) in a botwire-stream namespace.

    Keys are any non-empty ``str`` up to 1024 UTF-8 bytes; values are bytes, stored losslessly
    (base64 text values of ``AsyncMemory``, so the namespace stays readable by ``Memory``).
    ``ttl`` (seconds) applies to every value written. Multi-key calls run up to 32 requests
    concurrently; ``mset`` checks every pair before writing any, but is not atomic across keys.
    """

    def __init__(
        self,
        namespace: str,
        *,
        url: str | None = None,
        ttl: float | timedelta | None = None,
        **connect_options: Any,
    ) -> None:
        self.namespace = namespace
        self.ttl = ttl_seconds(ttl)
        self._cores = memory_cores(namespace, url, connect_options)

    # -- sync face ---------------------------------------------------------------------------------
    def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        """The value of each key, or None where missing."""
        return call(self.amget, keys)

    def mset(self, key_value_pairs: Sequence[tuple[str, bytes]]) -> None:
        """Store each ``(key, bytes)`` pair."""
        call(self.amset, key_value_pairs)

    def mdelete(self, keys: Sequence[str]) -> None:
        """Delete the keys (missing keys are ignored)."""
        call(self.amdelete, keys)

    def yield_keys(self, *, prefix: str | None = None) -> Iterator[str]:
        """The keys (starting with ``prefix``, taken literally), sorted."""
        yield from call(self._list_keys, prefix)

    # -- native async face ---------------------------------------------------------------------
    async def amget(self, keys: Sequence[str]) -> list[bytes | None]:
        """The value of each key, or None where missing (concurrent reads, duplicates read once)."""
        unique = list(dict.fromkeys(keys))
        core = self._cores.get()
        values = await map_bounded(core.get, unique)
        found = {k: _decode_bytes(k, v) for k, v in zip(unique, values, strict=True)}
        return [found[k] for k in keys]

    async def amset(self, key_value_pairs: Sequence[tuple[str, bytes]]) -> None:
        """Store each ``(key, bytes)`` pair; a bad key or value raises before anything is written."""
        encoded: dict[str, str] = {}
        for key, value in key_value_pairs:
            keys.encode_key(key)  # InvalidKey now rather than half-way through
            encoded[key] = base64.b64encode(_as_bytes(value, key)).decode("ascii")
        core = self._cores.get()

        async def put(item: tuple[str, str]) -> int:
            return await core.set(item[0], item[1], ttl=self.ttl)

        await map_bounded(put, list(encoded.items()))

    async def amdelete(self, keys: Sequence[str]) -> None:
        """Delete the keys (missing keys are ignored)."""
        await map_bounded(self._cores.get().delete, list(dict.fromkeys(keys)))

    async def ayield_keys(self, *, prefix: str | None = None) -> AsyncIterator[str]:
        """The keys (starting with ``prefix``, taken literally), sorted."""
        for key in await self._list_keys(prefix):
            yield key

    async def _list_keys(self, prefix: str | None) -> list[str]:
        return await self._cores.get().list_keys(glob_escape(prefix or "") + "*")

    def __repr__(self) -> str:
        return f"BotWireByteStore({self.namespace!r})"


def _decode_bytes(key: str, value: Any) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidValue(f"the value of {key!r} was not written by a byte store ({type(value).__name__})")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidValue(f"the value of {key!r} was not written by a byte store (not base64)") from exc


# -- LLM cache ---------------------------------------------------------------------------------
_CACHE_FORMAT: Final = 1
# Only these classes come back from the cache: nothing stored can make us build anything else.
_GENERATION_CLASSES: Final[dict[str, type[Generation]]] = {
    "ChatGenerationChunk": ChatGenerationChunk,
    "ChatGeneration": ChatGeneration,
    "GenerationChunk": GenerationChunk,
    "Generation": Generation,
}


def _generation_dict(generation: object) -> dict[str, Any]:
    for name, cls in _GENERATION_CLASSES.items():  # most derived first
        if isinstance(generation, cls):
            out: dict[str, Any] = {"class": name, "generation_info": generation.generation_info}
            if isinstance(generation, ChatGeneration):
                out["message"] = message_to_dict(generation.message)
            else:
                out["text"] = generation.text
            return out
    raise InvalidValue(f"an LLM cache holds Generation objects, not {type(generation).__name__}")


def _generation(stored: Mapping[str, Any]) -> Generation:
    cls = _GENERATION_CLASSES[stored["class"]]
    if issubclass(cls, ChatGeneration):
        message = messages_from_dict([stored["message"]])[0]
        return cls(message=message, generation_info=stored["generation_info"])
    return cls(text=stored["text"], generation_info=stored["generation_info"])


class BotWireCache(LoopBound[AsyncMemory], BaseCache):
    """A LangChain LLM cache in a botwire-stream namespace, shared by every process using it.

    ``set_llm_cache(BotWireCache(ttl=86400))``. An entry's key is the SHA-256 of
    ``(prompt, llm_string)``; its value holds the generations (``Generation``,
    ``ChatGeneration`` and their chunks, messages stored losslessly). ``clear()`` removes only
    this cache's entries, so the namespace may be shared with other data. Entries in an unknown
    format (another version) read as misses.
    """

    KEY_PREFIX: Final = "llm-cache:"

    def __init__(
        self,
        namespace: str = "llm-cache",
        *,
        url: str | None = None,
        ttl: float | timedelta | None = None,
        **connect_options: Any,
    ) -> None:
        self.namespace = namespace
        self.ttl = ttl_seconds(ttl)
        self._cores = memory_cores(namespace, url, connect_options)

    @classmethod
    def key(cls, prompt: str, llm_string: str) -> str:
        """The memory key of the entry for ``(prompt, llm_string)``."""
        digest = hashlib.sha256(json.dumps([prompt, llm_string]).encode()).hexdigest()
        return cls.KEY_PREFIX + digest

    # -- sync face ---------------------------------------------------------------------------------
    def lookup(self, prompt: str, llm_string: str) -> RETURN_VAL_TYPE | None:
        """The cached generations, or None on a miss."""
        return call(self.alookup, prompt, llm_string)

    def update(self, prompt: str, llm_string: str, return_val: RETURN_VAL_TYPE) -> None:
        """Cache ``return_val`` for ``(prompt, llm_string)``."""
        call(self.aupdate, prompt, llm_string, return_val)

    def clear(self, **kwargs: Any) -> None:
        """Remove every entry of this cache."""
        call(self.aclear)

    # -- native async face ---------------------------------------------------------------------
    async def alookup(self, prompt: str, llm_string: str) -> RETURN_VAL_TYPE | None:
        """The cached generations, or None on a miss."""
        stored = await self._cores.get().get(self.key(prompt, llm_string))
        if not isinstance(stored, dict) or stored.get("format") != _CACHE_FORMAT:
            return None
        try:
            return [_generation(g) for g in stored["generations"]]
        except (KeyError, TypeError, ValueError):
            return None  # not ours to understand: a miss, and the next update replaces it

    async def aupdate(self, prompt: str, llm_string: str, return_val: RETURN_VAL_TYPE) -> None:
        """Cache ``return_val`` for ``(prompt, llm_string)``."""
        if isinstance(return_val, (str, bytes, Mapping)) or not isinstance(return_val, Sequence):
            raise InvalidValue(f"return_val is a sequence of Generation objects, not {type(return_val).__name__}")
        value = {"format": _CACHE_FORMAT, "generations": [_generation_dict(g) for g in return_val]}
        await self._cores.get().set(self.key(prompt, llm_string), value, ttl=self.ttl)

    async def aclear(self, **kwargs: Any) -> None:
        """Remove every entry of this cache (other keys of the namespace are kept)."""
        core = self._cores.get()
        await map_bounded(core.delete, await core.list_keys(self.KEY_PREFIX + "*"))

    def __repr__(self) -> str:
        return f"BotWireCache({self.namespace!r})"
