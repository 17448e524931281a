"""The one error tree of botwire-stream.

Pure: no NATS import. Every NATS, OS or encoding failure that reaches a user is translated (by
``botwire_stream.nats.errors.translate``) into a ``BotWireError`` subclass whose message says what
went wrong and what to do. The HTTP server maps each class to a status code through
``http_status``, and clients tell classes apart by their ``code``.
"""

from __future__ import annotations

import re


def _snake(name: str) -> str:
    """``InvalidTTL`` -> ``invalid_ttl``; ``ServerUnavailable`` -> ``server_unavailable``."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()

__all__ = [
    "BotWireError",
    "InvalidKey",
    "InvalidNamespace",
    "InvalidSessionId",
    "InvalidArgument",
    "InvalidMessage",
    "InvalidTTL",
    "InvalidValue",
    "ValueTooLarge",
    "Conflict",
    "ServerUnavailable",
    "OutcomeUnknown",
    "ServerNotFound",
    "ServerNotTrusted",
    "UnsafeHome",
    "Unauthorized",
    "QuotaExceeded",
    "WrongEventLoop",
    "StorageFull",
    "HomeNotWritable",
    "Closed",
    "ChangedWhileRead",
    "BeforeRetention",
    "ServerNotStopped",
    "MissingDependency",
    "InvalidOffset",
    "StreamNotFound",
    "StreamDeleted",
    "StreamClosed",
    "ContentTypeMismatch",
    "ProducerFenced",
    "ProducerSeqGap",
]


class BotWireError(Exception):
    """Base class of every error botwire-stream raises on purpose.

    ``code`` is a stable, machine-readable name (``"invalid_key"``, ``"conflict"``...): several
    classes share an HTTP status, and clients of the HTTP API tell them apart by this string. It
    is derived from the class name once, when the class is defined, and never changes for a class.
    """

    http_status: int = 500
    code: str = "botwire_error"

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "code" not in cls.__dict__:
            cls.code = _snake(cls.__name__)


class InvalidKey(BotWireError, ValueError):
    """A key is not a non-empty ``str`` of at most 1024 UTF-8 bytes."""

    http_status = 400


class InvalidNamespace(BotWireError, ValueError):
    """A namespace is not 1-64 characters of ``[A-Za-z0-9_-]``."""

    http_status = 400


class InvalidSessionId(BotWireError, ValueError):
    """A conversation id is empty, too long, or holds control characters."""

    http_status = 400


class InvalidArgument(BotWireError, ValueError):
    """An argument other than a name, key, TTL or message is out of range (``last=-1``...)."""

    http_status = 400


class InvalidTTL(BotWireError, ValueError):
    """A TTL is not a positive number of seconds or a positive ``timedelta``."""

    http_status = 400


class InvalidMessage(BotWireError, TypeError):
    """A chat message is not a JSON-encodable mapping."""

    http_status = 400


class InvalidValue(BotWireError, TypeError):
    """A value of a type its store does not hold (a LangChain byte store's non-bytes, an LLM
    cache's non-``Generation``), or a stored value another writer's format left unreadable there."""

    http_status = 400


class ValueTooLarge(BotWireError, ValueError):
    """A value or message is larger than the library stores."""

    http_status = 413


class Conflict(BotWireError):
    """A conditional write lost a race with another writer, or the object already exists."""

    http_status = 409


class ServerUnavailable(BotWireError, ConnectionError):
    """The NATS server (or botwire HTTP server) cannot be reached or did not answer in time."""

    http_status = 503


class OutcomeUnknown(ServerUnavailable):
    """A write was sent but not confirmed in time: it may or may not be stored.

    Raised only when the server stalled or vanished for the whole timeout after receiving the
    write, so that neither its acknowledgement nor a read-back could settle it. The message says
    whether repeating the call is safe (``set``: yes; ``append``/``extend``/``update``: read first).
    """


class ServerNotFound(ServerUnavailable):
    """No ``nats-server`` binary was found to start the embedded server."""


class ServerNotTrusted(ServerUnavailable):
    """The server could not be verified, so no credentials were sent: a ``tls://`` URL to a server
    without TLS, or an embedded server's port answered by something without its certificate."""


class UnsafeHome(BotWireError, PermissionError):
    """A folder or file under ``BOTWIRE_HOME`` is owned by another user, writable by others, or a
    symbolic link; the embedded server refuses to use it (another account could read or plant data)."""

    http_status = 500


class Unauthorized(BotWireError, PermissionError):
    """The server refused the credentials, or they grant no access to this namespace."""

    http_status = 401


class QuotaExceeded(BotWireError):
    """A storage limit or rate limit of the server or namespace was reached."""

    http_status = 429


class WrongEventLoop(BotWireError, RuntimeError):
    """An ``AsyncMemory``/``AsyncChatHistory`` was used on another event loop than its first one."""

    http_status = 500


class StorageFull(QuotaExceeded):
    """The disk that holds the server's data is full: writes are refused until space is freed."""

    http_status = 507


class HomeNotWritable(ServerUnavailable):
    """``BOTWIRE_HOME`` (the embedded server's folder) cannot be created or written."""


class Closed(BotWireError, RuntimeError):
    """An ``AsyncMemory``/``AsyncChatHistory`` (or a watch over its connection) was used after
    ``close()``; open a new one."""

    http_status = 409


class ChangedWhileRead(BotWireError):
    """A value or conversation was overwritten or cleared on every try of one read (writers
    faster than the read); read it again."""

    http_status = 409


class BeforeRetention(BotWireError, LookupError):
    """A past state (``get(at=)``, ``messages(at=)``, ``restore``) asked for a moment older than
    what the server still keeps of it: the message says what removed the older history (the
    key's ``history`` depth, a TTL write, a ``clear``, the namespace's retention) and from when
    on it is kept."""

    http_status = 410


class ServerNotStopped(BotWireError, RuntimeError):
    """The embedded server did not stop (``botwire nats stop``) within its timeout: it still runs."""


class MissingDependency(BotWireError, ImportError):
    """An optional feature needs a package that is not installed (``BotWireChatHistory`` needs
    langchain-core); the message names the extra to install, e.g.
    ``pip install 'botwire-stream[langchain]'``."""

    http_status = 500


# --- token streams (issue 7) ---
class InvalidOffset(InvalidArgument):
    """A token stream offset is not ``-1``, ``now`` or one this server minted (``<digits>_<digits>``)."""


class StreamNotFound(BotWireError, LookupError):
    """No token stream at this path (never created, deleted, or expired)."""

    http_status = 404


class StreamDeleted(BotWireError, LookupError):
    """The token stream was deleted while forks still read it: gone for everything but its forks."""

    http_status = 410


class StreamClosed(Conflict):
    """An append to a token stream that was closed; ``next_offset`` is its final offset."""

    def __init__(self, message: str, next_offset: str = "") -> None:
        super().__init__(message)
        self.next_offset = next_offset


class ContentTypeMismatch(Conflict):
    """An append's (or fork's) content type differs from the token stream's."""


class ProducerFenced(BotWireError, PermissionError):
    """An idempotent producer wrote with an epoch older than the stream's (a newer instance of it
    took over); ``epoch`` is the current one."""

    http_status = 403

    def __init__(self, message: str, epoch: int = 0) -> None:
        super().__init__(message)
        self.epoch = epoch


class ProducerSeqGap(Conflict):
    """An idempotent producer skipped sequence numbers: ``expected`` is the next one the stream takes."""

    def __init__(self, message: str, expected: int = 0, received: int = 0) -> None:
        super().__init__(message)
        self.expected = expected
        self.received = received
