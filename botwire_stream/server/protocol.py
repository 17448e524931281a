"""Parsing the protocol's request headers and query; ``ProtocolError`` carries the status and
the short plain-text body of a refusal (nothing is written)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from urllib.parse import unquote_to_bytes

__all__ = ["PREFIX", "ProtocolError", "closed_flag", "expires_at", "producer", "stream_path", "sub_offset", "ttl"]

PREFIX = "/v1/stream/"
MAX_SAFE = 2**53 - 1
_DIGITS = re.compile(r"0|[1-9][0-9]*")
_ANY_DIGITS = re.compile(r"[0-9]+")
_RFC3339 = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})")


class ProtocolError(Exception):
    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def stream_path(raw_path: bytes) -> str:
    """The stream's name from the raw request path (after ``/v1/stream/``); 400 when it is not
    UTF-8 once percent-decoded, 414 when longer than the core takes."""
    try:
        path = unquote_to_bytes(raw_path).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(400, "the stream path is not valid UTF-8") from None
    name = path[len(PREFIX) :] if path.startswith(PREFIX) else path
    if not name:
        raise ProtocolError(404, "no stream path")
    if len(name.encode()) > 1024:
        raise ProtocolError(414, "the stream path is longer than 1024 bytes")
    if any(ord(c) < 32 for c in name):
        raise ProtocolError(400, "the stream path holds control characters")
    return name


def source_path(header: str) -> str:
    """A ``Stream-Forked-From`` value (the source's full path, or its name) as a stream name."""
    return stream_path(header.encode()) if header.startswith(PREFIX) else stream_path((PREFIX + header).encode())


def closed_flag(value: str | None) -> bool:
    return value is not None and value.strip().lower() == "true"


def ttl(value: str | None) -> int | None:
    if value is None:
        return None
    if not _DIGITS.fullmatch(value.strip()):
        raise ProtocolError(400, "Stream-TTL must be a whole number of seconds (no sign, no leading zero)")
    return int(value)


def expires_at(value: str | None) -> str | None:
    if value is None:
        return None
    text = value.strip()
    try:
        ok = bool(_RFC3339.fullmatch(text)) and datetime.fromisoformat(text.replace("z", "Z").replace("Z", "+00:00")) is not None
    except ValueError:
        ok = False
    if not ok:
        raise ProtocolError(400, "Stream-Expires-At must be an RFC 3339 time")
    return text


def sub_offset(value: str | None) -> int:
    if value is None:
        return 0
    if not _DIGITS.fullmatch(value.strip()):
        raise ProtocolError(400, "Stream-Fork-Sub-Offset must be a whole number")
    return int(value)


def producer(headers: Mapping[str, str]) -> tuple[str, int, int] | None:
    pid, epoch, seq = headers.get("producer-id"), headers.get("producer-epoch"), headers.get("producer-seq")
    if pid is None and epoch is None and seq is None:
        return None
    if pid is None or epoch is None or seq is None:
        raise ProtocolError(400, "Producer-Id, Producer-Epoch and Producer-Seq go together")
    if not pid.strip():
        raise ProtocolError(400, "Producer-Id must not be empty")
    numbers = []
    for name, value in (("Producer-Epoch", epoch), ("Producer-Seq", seq)):
        if not _ANY_DIGITS.fullmatch(value.strip()) or int(value) > MAX_SAFE:
            raise ProtocolError(400, f"{name} must be a whole number up to 2^53-1")
        numbers.append(int(value))
    return pid, numbers[0], numbers[1]
