"""botwire-stream: persistent memory for streaming LLM chats, on NATS JetStream."""

from .memory import AsyncMemory
from .sync import Memory
from .models import Change, Entry, Revision, SessionInfo

__all__ = ["AsyncMemory", "Memory", "Change", "Entry", "Revision", "SessionInfo"]
__version__ = "0.1.0"
