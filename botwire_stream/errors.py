"""The one error tree of botwire-stream.

Every NATS, OS or encoding failure that reaches a user is translated here (``translate``) into a
``BotWireError`` subclass whose message says what went wrong and what to do. The HTTP server maps
each class to a status code through ``http_status``.
"""

from __future__ import annotations

import asyncio
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
    "translate",
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


# JetStream API error codes (nats-server's errors.json) that mean something to a user.
_CONFLICT_CODES = {10071, 10164, 10058}
_QUOTA_CODES = {10023, 10026, 10027, 10028, 10047, 10077, 10078}
_TOO_LARGE_CODES = {10054}


def translate(exc: BaseException) -> BaseException:
    """Map a NATS, OS or asyncio exception to the matching ``BotWireError`` (others pass through)."""
    if isinstance(exc, BotWireError):
        return exc
    # Imported here so that importing the error tree stays cheap.
    import nats.errors as ne
    import nats.js.errors as je

    if isinstance(exc, je.APIError):
        code = exc.err_code or 0
        desc = exc.description or str(exc)
        if "no space left on device" in desc:
            return StorageFull(f"{desc} (the disk holding the server's data is full; free space)")
        if code in _CONFLICT_CODES or exc.code == 409:
            return Conflict(f"{desc} (another writer changed it first; read again and retry)")
        if code in _QUOTA_CODES:
            return QuotaExceeded(f"{desc} (the server's storage limit was reached; free space or raise limits)")
        if code in _TOO_LARGE_CODES:
            return ValueTooLarge(f"{desc}")
        if exc.code == 503:
            return ServerUnavailable(
                "JetStream is not available on the server (is it started with -js?): " + desc
            )
        if exc.code in (401, 403):
            return Unauthorized(desc)
        return BotWireError(f"NATS JetStream error {exc.code}/{code}: {desc}")
    if isinstance(exc, ne.AuthorizationError) or "authorization" in str(exc).lower():
        return Unauthorized(
            "the NATS server refused the credentials; check token=/creds=/user= or BOTWIRE_TOKEN/BOTWIRE_CREDS"
        )
    if isinstance(exc, ne.MaxPayloadError):
        return ValueTooLarge("the message is larger than the server's max_payload")
    if isinstance(exc, (ne.TimeoutError, asyncio.TimeoutError, TimeoutError)):
        return ServerUnavailable("the NATS server did not answer in time; is it running and reachable?")
    if isinstance(exc, (je.NoStreamResponseError, ne.NoRespondersError)):
        return ServerUnavailable(
            "no JetStream stream answered; the server may be restarting or JetStream is disabled"
        )
    if isinstance(
        exc,
        (
            ne.ConnectionClosedError,
            ne.NoServersError,
            ne.StaleConnectionError,
            ne.OutboundBufferLimitError,
            ConnectionError,
            OSError,
        ),
    ):
        from .settings import redact  # an OS error may name the URL, with its user:password@

        return ServerUnavailable(
            f"cannot reach the NATS server ({redact(str(exc))}); is it running? try `botwire server status`"
        )
    if isinstance(exc, ne.Error):
        from .settings import redact

        return BotWireError(f"NATS error: {redact(str(exc))}")
    return exc
