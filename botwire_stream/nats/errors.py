"""Translation of NATS failures into the error tree of ``botwire_stream.errors``.

Kept beside the NATS code so that ``botwire_stream.errors`` stays pure (no NATS import): JetStream
API error codes, refused credentials, unreachable servers (with URL credentials redacted from the
message), and one builder for the ``error`` object of a JetStream API response.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, NoReturn

import msgspec
import nats.errors as ne
import nats.js.errors as je

from ..errors import (
    BotWireError,
    Conflict,
    QuotaExceeded,
    ServerUnavailable,
    StorageFull,
    Unauthorized,
    ValueTooLarge,
)
from ..settings import redact

__all__ = ["ApiError", "InProcess", "StreamNotFound", "SubjectPurged", "api_error", "raise_api_error", "translate"]


class ApiError(msgspec.Struct):
    """The ``error`` object of a JetStream API response (nats-server's errors.json)."""

    code: int = 0
    err_code: int = 0
    description: str = ""


class SubjectPurged(BotWireError):
    """``read_subject(snapshot=True)``: the subject lost what was read so far (a purge, a rollup)
    while it was read; read it again."""


class StreamNotFound(BotWireError):
    """10059 "stream not found": the stream an API request named does not exist (never made, or
    deleted by another client: ``jetstream.Connection`` reads a stream it made as empty then)."""


_STREAM_NOT_FOUND = 10059


def api_error(err: ApiError | Mapping[str, Any]) -> BaseException:
    """The translated error for the ``error`` object of a JetStream API response."""
    if isinstance(err, ApiError):
        code, err_code, desc = err.code, err.err_code, err.description
    else:
        code, err_code, desc = err.get("code") or 0, err.get("err_code") or 0, err.get("description") or ""
    return translate(je.APIError(code=code, err_code=err_code, description=desc))


class InProcess(ne.NoRespondersError):
    """10158 "duplicate message id is in process": a write re-sent to a cluster met its first
    copy still being replicated (measured: the stream leader SIGSTOPped 0.6 s, re-sent after
    0.5 s). Not a conflict: ``call`` retries it like a missing responder, and the next re-send
    gets the first copy's acknowledgement from the duplicate window."""


_IN_PROCESS = 10158


def raise_api_error(err: ApiError | Mapping[str, Any]) -> NoReturn:
    """Raise ``api_error(err)`` (``InProcess``, retried by ``call``, for 10158)."""
    code = err.err_code if isinstance(err, ApiError) else err.get("err_code")
    if code == _IN_PROCESS:
        raise InProcess()
    exc = api_error(err)
    if code == _STREAM_NOT_FOUND and type(exc) is BotWireError:
        raise StreamNotFound(str(exc))
    raise exc


# JetStream API error codes (nats-server's errors.json) that mean something to a user.
_CONFLICT_CODES = {10071, 10164, 10058}
_QUOTA_CODES = {10023, 10026, 10027, 10028, 10047, 10077, 10078}
_TOO_LARGE_CODES = {10054}


def translate(exc: BaseException) -> BaseException:
    """Map a NATS, OS or asyncio exception to the matching ``BotWireError`` (others pass through)."""
    if isinstance(exc, BotWireError):
        return exc
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
        # an OS error may name the URL, with its user:password@
        return ServerUnavailable(
            f"cannot reach the NATS server ({redact(str(exc))}); is it running? try `botwire nats status`"
        )
    if isinstance(exc, ne.Error):
        return BotWireError(f"NATS error: {redact(str(exc))}")
    return exc

