"""botwire-stream: persistent memory for streaming LLM chats, on NATS JetStream."""

from .memory import AsyncMemory
from .models import Change, Entry, Revision, SessionInfo

__all__ = ["AsyncMemory", "Change", "Entry", "Revision", "SessionInfo"]
__version__ = "0.1.0"
