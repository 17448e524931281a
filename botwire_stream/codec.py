"""Values on the wire: msgspec JSON, with one shared encoder and decoder.

JSON has no NaN or Infinity, and msgspec writes them as ``null``, which would read back as a
missing value; such values are refused instead, like every value JSON cannot hold faithfully.
"""

from __future__ import annotations

import math
import re
import threading
from typing import Any

import msgspec

from .errors import BotWireError, InvalidValue

__all__ = ["decode", "encode", "encoder"]

# The one JSON encoder: ``encode`` below, and chat messages (which check what it wrote themselves).
encoder = _encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()
_packer = msgspec.msgpack.Encoder()
# msgspec writes every float to MessagePack as 0xcb and 8 big-endian bytes; NaN and the
# infinities have all 11 exponent bits set: 7f or ff, then f0-ff. In a string these bytes cannot
# follow 0xcb (UTF-8), so a match elsewhere (bytes, ints) only costs the exact check.
_NON_FINITE = re.compile(rb"\xcb[\x7f\xff][\xf0-\xff]")
_ALLOWED = "values must be JSON-encodable (dict, list, str, int, float, bool, None, msgspec Structs, dataclasses)"


def encode(value: object) -> bytes:
    """Encode a value as JSON; ``InvalidValue`` (a ``TypeError``) for anything JSON cannot hold as it is.

    That is: types msgspec cannot encode, NaN and infinities, strings with lone surrogates (not
    UTF-8), ints of over 4300 digits (``sys.get_int_max_str_digits``), and nesting deeper than
    Python's recursion limit lets msgspec go (under 1000 levels).
    """
    try:
        data = _encoder.encode(value)
    except (TypeError, msgspec.EncodeError) as exc:
        raise InvalidValue(f"cannot store a value of type {type(value).__name__}: {_ALLOWED} ({exc})") from exc
    except UnicodeEncodeError as exc:
        raise InvalidValue(f"cannot store a string that is not valid Unicode (a lone surrogate?): {exc}") from exc
    except ValueError as exc:  # an int of over 4300 digits: Python's limit for int to str
        raise InvalidValue(f"cannot store this value: {exc}") from exc
    except RecursionError as exc:
        raise InvalidValue("cannot store a value nested this deeply; flatten it") from exc
    # A non-finite float became ``null``: only a value whose JSON holds a null can hide one. The
    # value's MessagePack (which keeps every float as it is) shows whether it can hold one at all;
    # only then is it looked for, item by item.
    if b"null" in data and _may_hold_non_finite(value):
        plain = msgspec.to_builtins(value, str_keys=True)
        if _decoder.decode(data) != plain and _has_non_finite(plain):
            raise InvalidValue(f"cannot store NaN or infinity (JSON has no such number): {_ALLOWED}")
    return data


def _may_hold_non_finite(value: object) -> bool:
    """False when ``value`` surely holds no NaN or infinity: about one more encode, in C.

    Measured on 9-12 MB lists and dicts holding None, the exact check alone made ``encode`` 7-12
    times slower than msgspec; this first look keeps it near 2 times.
    """
    try:
        return _NON_FINITE.search(_packer.encode(value)) is not None
    except Exception:  # noqa: BLE001 - cannot tell: look item by item
        return True


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


def decode(data: bytes | memoryview, decoder: msgspec.json.Decoder[Any] = _decoder) -> Any:
    """Decode JSON written by ``encode`` (or by ``decoder``'s type: chat messages are dicts).

    How deep msgspec may nest is Python's recursion limit counted from the caller's stack, so a
    value written from shallow code may be too deep to read from deeper code (measured: 998
    levels at top level, 989 inside ``asyncio.run``, fewer in a handler 60 calls down). Such a
    value is read again on a new thread, whose stack is nearly empty (995 levels).
    """
    try:
        return decoder.decode(data)
    except RecursionError:
        pass
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(decoder.decode(data))
        except RecursionError as exc:
            out.append(exc)

    thread = threading.Thread(target=run, name="botwire-decode")
    thread.start()
    thread.join()
    if isinstance(out[0], RecursionError):
        raise BotWireError("the stored value is nested too deeply for Python to read it") from out[0]
    return out[0]
