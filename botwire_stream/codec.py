"""Values on the wire: msgspec JSON, with one shared encoder and decoder."""

from __future__ import annotations

from typing import Any

import msgspec

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


def encode(value: object) -> bytes:
    """Encode a value as JSON; ``TypeError`` for anything msgspec cannot encode."""
    try:
        return _encoder.encode(value)
    except (TypeError, msgspec.EncodeError) as exc:
        raise TypeError(
            f"cannot store a value of type {type(value).__name__}: values must be JSON-encodable "
            f"(dict, list, str, int, float, bool, None, msgspec Structs, dataclasses) ({exc})"
        ) from exc


def decode(data: bytes | memoryview) -> Any:
    """Decode JSON written by ``encode``."""
    return _decoder.decode(data)
