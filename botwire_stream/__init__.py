"""botwire-stream: persistent memory for streaming LLM chats, on NATS JetStream.

``Memory``/``AsyncMemory`` hold namespaced key-value memory; ``ChatHistory``/``AsyncChatHistory``
hold append-only conversation logs. Errors live in ``botwire_stream.errors``.

The classes are imported on first access (PEP 562), so that ``botwire --help`` and importing
``botwire_stream.errors`` do not pay for nats-py (nor cryptography, nkeys or langchain-core).
``BotWireChatHistory`` (LangChain) is one of them but not in ``__all__``: it needs the extra
``langchain`` (else ``errors.MissingDependency``, an ``ImportError``), and ``import *`` must not.

Public, changed only compatibly: this package's ``__all__``, ``botwire_stream.errors``,
``botwire_stream.models`` and the ``botwire_stream.integrations.<framework>`` modules. Every other
module (``memory``, ``chat``, ``sync``, ``settings``, ``_backend``, ``nats``, ``cli``...) and
every name starting with ``_`` is internal: import the public names instead, as they may move.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .audit import Event, RestoreReport, Retention, areplay, arestore, aretention
    from .chat import AsyncChatHistory
    from .integrations.langchain import BotWireChatHistory as BotWireChatHistory
    from .memory import AsyncMemory
    from .models import Change, Entry, Revision, SessionInfo
    from .sync import ChatHistory, Memory, TokenStream, replay, restore, retention
    from .tokens import AsyncTokenStream

__all__ = [
    "AsyncChatHistory",
    "AsyncMemory",
    "AsyncTokenStream",
    "Change",
    "ChatHistory",
    "Entry",
    "Memory",
    "Revision",
    "SessionInfo",
    "TokenStream",
    "Event",
    "RestoreReport",
    "Retention",
    "areplay",
    "arestore",
    "aretention",
    "replay",
    "restore",
    "retention",
]
__version__ = "0.1.0"

_WHERE = {
    "AsyncChatHistory": "chat",
    "AsyncMemory": "memory",
    "Change": "models",
    "Entry": "models",
    "Revision": "models",
    "SessionInfo": "models",
    "ChatHistory": "sync",
    "Memory": "sync",
    "AsyncTokenStream": "tokens",
    "TokenStream": "sync",
    "Event": "audit",
    "RestoreReport": "audit",
    "Retention": "audit",
    "areplay": "audit",
    "arestore": "audit",
    "aretention": "audit",
    "replay": "sync",
    "restore": "sync",
    "retention": "sync",
    "BotWireChatHistory": "integrations.langchain",  # optional: needs langchain-core
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'botwire_stream' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
