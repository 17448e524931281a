"""botwire-stream: persistent memory for streaming LLM chats, on NATS JetStream.

``Memory``/``AsyncMemory`` hold namespaced key-value memory; ``ChatHistory``/``AsyncChatHistory``
hold append-only conversation logs. Errors live in ``botwire_stream.errors``.
"""

from .chat import AsyncChatHistory
from .memory import AsyncMemory
from .models import Change, Entry, Revision, SessionInfo
from .sync import ChatHistory, Memory

__all__ = [
    "AsyncChatHistory",
    "AsyncMemory",
    "Change",
    "ChatHistory",
    "Entry",
    "Memory",
    "Revision",
    "SessionInfo",
]
__version__ = "0.1.0"
