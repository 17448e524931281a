"""Headers every response carries (browser security, CORS) and the CORS preflight answer."""

from __future__ import annotations

__all__ = ["COMMON", "PREFLIGHT", "PROTOCOL_HEADERS"]

COMMON: dict[str, str] = {
    "x-content-type-options": "nosniff",
    "cross-origin-resource-policy": "cross-origin",
    "access-control-allow-origin": "*",
    "access-control-expose-headers": (
        "Stream-Next-Offset, Stream-Cursor, Stream-Up-To-Date, Stream-Closed, Stream-TTL, Stream-Expires-At, "
        "Producer-Epoch, Producer-Seq, Producer-Expected-Seq, Producer-Received-Seq, Stream-SSE-Data-Encoding, "
        "etag, content-type, content-encoding, vary, location"
    ),
}

PROTOCOL_HEADERS = (
    "content-type, authorization, if-none-match, Stream-Seq, Stream-TTL, Stream-Expires-At, Stream-Closed, "
    "Producer-Id, Producer-Epoch, Producer-Seq, Stream-Forked-From, Stream-Fork-Offset, Stream-Fork-Sub-Offset"
)

PREFLIGHT: dict[str, str] = {
    **COMMON,
    "access-control-allow-methods": "GET, POST, PUT, DELETE, HEAD, OPTIONS",
    "access-control-allow-headers": PROTOCOL_HEADERS,
    "access-control-max-age": "86400",
}
