"""Values on the wire: msgspec JSON, with one shared encoder and decoder.

JSON has no NaN or Infinity, and msgspec writes them as ``null``, which would read back as a
missing value; such values are refused instead, like every value JSON cannot hold faithfully.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()
_ALLOWED = "values must be JSON-encodable (dict, list, str, int, float, bool, None, msgspec Structs, dataclasses)"


def encode(value: object) -> bytes:
    """Encode a value as JSON; ``TypeError`` for anything JSON cannot hold as it is.

    That is: types msgspec cannot encode, NaN and infinities, strings with lone surrogates (not
    UTF-8), and nesting deeper than Python's recursion limit lets msgspec go (under 1000 levels).
    """
    try:
        data = _encoder.encode(value)
    except (TypeError, msgspec.EncodeError) as exc:
        raise TypeError(f"cannot store a value of type {type(value).__name__}: {_ALLOWED} ({exc})") from exc
    except UnicodeEncodeError as exc:
        raise TypeError(f"cannot store a string that is not valid Unicode (a lone surrogate?): {exc}") from exc
    except RecursionError as exc:
        raise TypeError("cannot store a value nested this deeply; flatten it") from exc
    # A non-finite float became ``null``: only a value whose JSON holds a null can hide one, and
    # only when the JSON does not read back equal to the value is it looked for, item by item.
    if b"null" in data:
        plain = msgspec.to_builtins(value, str_keys=True)
        if _decoder.decode(data) != plain and _has_non_finite(plain):
            raise TypeError(f"cannot store NaN or infinity (JSON has no such number): {_ALLOWED}")
    return data


def _has_non_finite(plain: Any) -> bool:
    """Whether a builtin value holds a NaN or infinite float anywhere (iterative: no depth limit)."""
    stack = [plain]
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
    return False


def decode(data: bytes | memoryview) -> Any:
    """Decode JSON written by ``encode``."""
    return _decoder.decode(data)
