"""Names: namespace validation, and the reversible encoding of any key into NATS subject tokens.

A key is split on ``:``; each segment becomes one subject token, so ``user:42:history`` is stored as
``user.42.history`` and ``list_keys("user:42:*")`` becomes the server-side filter ``user.42.>``.
A segment made only of ``[A-Za-z0-9_-]`` is kept as it is; any other segment (empty, ``.``, ``*``,
spaces, unicode...) is written as ``=`` followed by its UTF-8 bytes in unpadded base64url. ``=``
never starts a plain segment, so decoding is unambiguous.
"""

from __future__ import annotations

import base64
import re
from fnmatch import fnmatchcase

from .errors import InvalidKey, InvalidNamespace, InvalidSessionId

MAX_KEY_BYTES = 1024
MAX_SESSION_ID_CHARS = 256
_NAMESPACE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PLAIN = re.compile(r"[A-Za-z0-9_-]+")
_GLOB_META = re.compile(r"[*?\[]")
_GLOB_ESCAPE = re.compile(r"([*?\[])")

__all__ = [
    "MAX_KEY_BYTES",
    "MAX_SESSION_ID_CHARS",
    "check_key",
    "check_namespace",
    "check_session_id",
    "decode_key",
    "encode_key",
    "glob_escape",
    "matches",
    "pattern_filter",
]


def check_namespace(namespace: object) -> str:
    """Return ``namespace`` when valid, else raise ``InvalidNamespace``."""
    if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
        shown = repr(namespace)
        if isinstance(namespace, str) and len(namespace) > 64:  # its repr put the rule past serve's 300-character cut
            shown = f"of {len(namespace)} characters"
        raise InvalidNamespace(f"namespace {shown} is invalid: use 1-64 characters of A-Z, a-z, 0-9, '_' and '-'")
    return namespace


def _encode_segment(segment: str) -> str:
    if _PLAIN.fullmatch(segment):
        return segment
    return "=" + base64.urlsafe_b64encode(segment.encode()).rstrip(b"=").decode("ascii")


def _decode_token(token: str) -> str:
    if not token.startswith("="):
        return token
    body = token[1:]
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()


def encode_key(key: object) -> str:
    """Encode a user key into dot-separated NATS tokens; raise ``InvalidKey`` when it is not one."""
    return ".".join(_encode_segment(s) for s in check_key(key).split(":"))


def check_key(key: object) -> str:
    """``key`` when it is a valid key, else ``InvalidKey`` (what the cores check before a backend
    is reached; the backend encodes it for its storage)."""
    if not isinstance(key, str):
        raise InvalidKey(f"keys are str, not {type(key).__name__}")
    if not key:
        raise InvalidKey("the empty string is not a key")
    try:
        size = len(key.encode())
    except UnicodeEncodeError as exc:
        raise InvalidKey(f"key {key[:40]!r} is not valid unicode (lone surrogate)") from exc
    if size > MAX_KEY_BYTES:
        raise InvalidKey(f"key is {size} UTF-8 bytes; the limit is {MAX_KEY_BYTES}")
    return key


def decode_key(token_path: str) -> str:
    """Invert ``encode_key``."""
    return ":".join(_decode_token(t) for t in token_path.split("."))


def check_session_id(session_id: object) -> str:
    """Return ``session_id`` when valid, else raise ``InvalidSessionId``."""
    if not isinstance(session_id, str) or not session_id:
        raise InvalidSessionId(f"session id must be a non-empty str, not {session_id!r}")
    if len(session_id) > MAX_SESSION_ID_CHARS:
        raise InvalidSessionId(f"session id is {len(session_id)} characters; the limit is {MAX_SESSION_ID_CHARS}")
    if any(ord(c) < 32 or ord(c) == 127 for c in session_id):
        raise InvalidSessionId(f"session id {session_id!r} holds control characters")
    try:
        session_id.encode()
    except UnicodeEncodeError as exc:
        raise InvalidSessionId("session id is not valid unicode (lone surrogate)") from exc
    return session_id


def pattern_filter(pattern: object) -> tuple[str, bool]:
    """Turn an fnmatch glob into ``(subject filter, exact)``.

    The filter is the widest NATS subject filter (relative to the namespace) that holds every
    matching key: the literal leading segments, then ``>``. ``exact`` is True when the pattern has
    no glob characters, so the filter names exactly one key and no client-side check is needed.
    """
    if not isinstance(pattern, str) or not pattern:
        raise InvalidKey(f"pattern must be a non-empty str, not {pattern!r}")
    if not _GLOB_META.search(pattern):
        return encode_key(pattern), True
    tokens: list[str] = []
    for segment in pattern.split(":"):
        if _GLOB_META.search(segment):
            break
        tokens.append(_encode_segment(segment))
    tokens.append(">")
    return ".".join(tokens), False


def matches(key: str, pattern: str) -> bool:
    """fnmatch semantics, case-sensitive: ``*`` spans ``:`` too."""
    return fnmatchcase(key, pattern)


def glob_escape(text: str) -> str:
    """``text`` as an fnmatch pattern that matches only itself (``*``, ``?``, ``[`` bracketed):
    ``list_keys(glob_escape(prefix) + "*")`` lists the keys that start with ``prefix`` literally."""
    return _GLOB_ESCAPE.sub(r"[\1]", text)
