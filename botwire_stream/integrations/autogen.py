"""AutoGen adapters: a model context kept in a conversation log, and a memory in a namespace.

``pip install 'botwire-stream[autogen]'``, then::

    from autogen_agentchat.agents import AssistantAgent
    from botwire_stream.integrations.autogen import BotWireChatCompletionContext, BotWireMemory

    agent = AssistantAgent(
        "assistant", model_client=...,
        model_context=BotWireChatCompletionContext("user-42"),     # the conversation survives restarts
        memory=[BotWireMemory("user-42-facts")],                    # facts added by the app
    )

- ``BotWireChatCompletionContext``: an ``autogen_core`` ``ChatCompletionContext`` whose messages
  live in an ``AsyncChatHistory`` (appends atomic, shared by every process opening the session);
  ``buffer_size=N`` gives the model only the last N messages, as AutoGen's
  ``BufferedChatCompletionContext`` does, while the log keeps them all.
- ``BotWireMemory``: an ``autogen_core.memory.Memory`` over an ``AsyncMemory`` namespace with
  ``ListMemory``'s semantics (every memory, in the order added; ``query`` does not filter).

Both are AutoGen components: ``dump_component()`` gives a config holding the session or namespace
and ``url`` (never credentials: pass those as ``BOTWIRE_TOKEN``/``BOTWIRE_CREDS`` or in code), and
``load_component()`` opens the same data. All methods are async and run on the caller's loop.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any, Final

try:
    from autogen_core import CancellationToken, Component
    from autogen_core.memory import Memory, MemoryContent, MemoryMimeType, MemoryQueryResult, UpdateContextResult
    from autogen_core.model_context import ChatCompletionContext
    from autogen_core.models import FunctionExecutionResultMessage, LLMMessage, SystemMessage
    from pydantic import BaseModel, TypeAdapter, ValidationError
    from typing_extensions import Self
except ImportError as exc:  # tests/test_package.py runs this with autogen-core blocked
    from ..errors import MissingDependency

    raise MissingDependency(
        "botwire_stream.integrations.autogen needs autogen-core: pip install 'botwire-stream[autogen]'"
    ) from exc

from ..chat import MAX_BATCH, MAX_EXTEND_BYTES, AsyncChatHistory, _encode_message
from ..errors import InvalidArgument, InvalidMessage, InvalidValue
from ._base import PerLoop, map_bounded, memory_cores

__all__ = [
    "BotWireChatCompletionContext",
    "BotWireChatCompletionContextConfig",
    "BotWireMemory",
    "BotWireMemoryConfig",
]

_MESSAGE: Final[TypeAdapter[LLMMessage]] = TypeAdapter(LLMMessage)
_MEMORY_PREFIX: Final = "mem:"
_MIME_TYPES: Final = {m.value for m in MemoryMimeType}


def _dump_message(message: object) -> dict[str, Any]:
    try:
        out: dict[str, Any] = _MESSAGE.dump_python(_MESSAGE.validate_python(message), mode="json")
    except (ValidationError, ValueError, TypeError) as exc:
        raise InvalidMessage(
            f"an AutoGen model context holds LLMMessage objects, not {message!r:.200} ({exc})"
        ) from exc
    return out


def _load_message(stored: Mapping[str, Any]) -> LLMMessage:
    try:
        return _MESSAGE.validate_python(stored)
    except ValidationError as exc:
        raise InvalidMessage(f"a stored message is not an AutoGen LLMMessage: {str(stored)[:200]}") from exc


def _content(stored: dict[str, Any]) -> MemoryContent:
    content = MemoryContent.model_validate(stored)
    if content.mime_type in _MIME_TYPES:  # JSON gives back a str: the enum, as it was added
        content.mime_type = MemoryMimeType(content.mime_type)
    return content


class BotWireChatCompletionContextConfig(BaseModel):
    """What ``dump_component()`` keeps of a ``BotWireChatCompletionContext``."""

    session_id: str
    namespace: str = "autogen"
    url: str | None = None
    buffer_size: int | None = None


class BotWireChatCompletionContext(ChatCompletionContext, Component[BotWireChatCompletionContextConfig]):
    """An AutoGen model context whose messages live in a botwire-stream conversation log.

    ``BotWireChatCompletionContext("user-42", namespace="autogen", buffer_size=None)``: an
    ``AssistantAgent`` given it remembers the conversation across process restarts, and every
    process opening the same session shares it. ``buffer_size`` (None: all) limits what
    ``get_messages`` returns to the last N messages (without a leading function result, as
    AutoGen's buffered context does). ``save_state``/``load_state`` read and replace the log.
    """

    component_config_schema = BotWireChatCompletionContextConfig
    component_provider_override = "botwire_stream.integrations.autogen.BotWireChatCompletionContext"

    def __init__(
        self,
        session_id: str,
        *,
        namespace: str = "autogen",
        url: str | None = None,
        buffer_size: int | None = None,
        **connect_options: Any,
    ) -> None:
        if buffer_size is not None and (
            isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 1
        ):
            raise InvalidArgument(f"buffer_size must be an int >= 1 or None, not {buffer_size!r}")

        def make() -> AsyncChatHistory:
            return AsyncChatHistory(session_id, namespace=namespace, url=url, **connect_options)

        make()  # bad names raise now, without connecting
        super().__init__()
        self.session_id, self.namespace, self.url, self.buffer_size = session_id, namespace, url, buffer_size
        self._cores = PerLoop(make)

    def __repr__(self) -> str:
        return f"BotWireChatCompletionContext({self.session_id!r}, namespace={self.namespace!r})"

    async def add_message(self, message: LLMMessage) -> None:
        """Append ``message`` to the conversation log (atomic; a bad message raises, nothing written)."""
        await self._cores.get().append(_dump_message(message))

    async def get_messages(self) -> list[LLMMessage]:
        """The messages for the model: all of them, or the last ``buffer_size``."""
        messages = [_load_message(m) for m in await self._cores.get().messages(last=self.buffer_size)]
        if self.buffer_size is not None and messages and isinstance(messages[0], FunctionExecutionResultMessage):
            messages = messages[1:]  # its function call was cut off: the model would reject it
        return messages

    async def clear(self) -> None:
        """Remove every message of the conversation (an agent's ``on_reset`` calls this)."""
        await self._cores.get().clear()

    async def save_state(self) -> Mapping[str, Any]:
        """``{"messages": [...]}``: every message of the log, as AutoGen's contexts save them."""
        return {"messages": await self._cores.get().messages()}

    async def load_state(self, state: Mapping[str, Any]) -> None:
        """Replace the log's messages with those of ``state`` (checked and encoded before anything
        is removed; then appended in extends of at most ``MAX_BATCH``, in order)."""
        if not isinstance(state, Mapping) or not isinstance(state.get("messages"), list):
            raise InvalidArgument("state must be a mapping with a 'messages' list (from save_state)")
        messages = [_dump_message(_load_message(m)) for m in state["messages"]]
        # Encoded before the log is cleared: a message the log cannot hold (a lone surrogate...)
        # raises InvalidMessage while the conversation is still there.
        sizes = [len(_encode_message(m)) for m in messages]
        core = self._cores.get()
        await core.clear()
        # One extend carries at most MAX_BATCH messages and MAX_EXTEND_BYTES, while a saved
        # conversation may hold more: appended in as many extends as needed, in order.
        start = 0
        while start < len(messages):
            end, total = start, 0
            while end < len(messages) and end - start < MAX_BATCH and total + sizes[end] <= MAX_EXTEND_BYTES:
                total += sizes[end]
                end += 1
            end = max(end, start + 1)  # a message alone over the byte cap raises ValueTooLarge
            await core.extend(messages[start:end])
            start = end

    async def close(self) -> None:
        """Release the connection used on the calling event loop."""
        await self._cores.close()

    def _to_config(self) -> BotWireChatCompletionContextConfig:
        return BotWireChatCompletionContextConfig(
            session_id=self.session_id, namespace=self.namespace, url=self.url, buffer_size=self.buffer_size
        )

    @classmethod
    def _from_config(cls, config: BotWireChatCompletionContextConfig) -> Self:
        return cls(config.session_id, namespace=config.namespace, url=config.url, buffer_size=config.buffer_size)


class BotWireMemoryConfig(BaseModel):
    """What ``dump_component()`` keeps of a ``BotWireMemory``."""

    namespace: str
    url: str | None = None


class BotWireMemory(Memory, Component[BotWireMemoryConfig]):
    """An AutoGen memory in a botwire-stream namespace, shared by every process that opens it.

    ``BotWireMemory("user-42-facts")``: ``add`` stores a ``MemoryContent`` (text, JSON or
    markdown; bytes and images raise ``InvalidValue``) under a key ``mem:<time>-<id>``;
    ``query`` returns every memory in the order added (like AutoGen's ``ListMemory``: no
    filtering); ``update_context`` adds them to a model context as one system message.
    """

    component_config_schema = BotWireMemoryConfig
    component_provider_override = "botwire_stream.integrations.autogen.BotWireMemory"

    def __init__(self, namespace: str, *, url: str | None = None, **connect_options: Any) -> None:
        self.namespace, self.url = namespace, url
        self._cores = memory_cores(namespace, url, connect_options)

    def __repr__(self) -> str:
        return f"BotWireMemory({self.namespace!r})"

    async def add(self, content: MemoryContent, cancellation_token: CancellationToken | None = None) -> None:
        """Store ``content`` (after every memory added before it)."""
        if not isinstance(content, MemoryContent):
            raise InvalidValue(f"BotWireMemory.add takes a MemoryContent, not {type(content).__name__}")
        if not isinstance(content.content, (str, dict)):
            raise InvalidValue(f"BotWireMemory stores text or JSON content, not {type(content.content).__name__}")
        value = content.model_dump(mode="json")
        # time first, so that the sorted keys are the order of adding (ties: the random part)
        key = f"{_MEMORY_PREFIX}{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"
        await self._cores.get().set(key, value)

    async def query(
        self,
        query: str | MemoryContent = "",
        cancellation_token: CancellationToken | None = None,
        **kwargs: Any,
    ) -> MemoryQueryResult:
        """Every memory, in the order added (``query`` is not used to filter, as in ``ListMemory``)."""
        core = self._cores.get()
        found = await core.list_keys(_MEMORY_PREFIX + "*")
        values = await map_bounded(core.get, found)
        return MemoryQueryResult(results=[_content(v) for v in values if isinstance(v, dict)])

    async def update_context(self, model_context: ChatCompletionContext) -> UpdateContextResult:
        """Add the memories to ``model_context`` as one system message (nothing when there are none)."""
        result = await self.query()
        if result.results:
            lines = [f"{i}. " + str(m.content) for i, m in enumerate(result.results, 1)]
            text = "\nRelevant memory content (in chronological order):\n" + "\n".join(lines) + "\n"
            await model_context.add_message(SystemMessage(content=text))
        return UpdateContextResult(memories=result)

    async def clear(self) -> None:
        """Remove every memory of this namespace (other keys of it are kept)."""
        core = self._cores.get()
        await map_bounded(core.delete, await core.list_keys(_MEMORY_PREFIX + "*"))

    async def close(self) -> None:
        """Release the connection used on the calling event loop."""
        await self._cores.close()

    def _to_config(self) -> BotWireMemoryConfig:
        return BotWireMemoryConfig(namespace=self.namespace, url=self.url)

    @classmethod
    def _from_config(cls, config: BotWireMemoryConfig) -> Self:
        return cls(config.namespace, url=config.url)
