"""The package's public surface: what `import botwire_stream` gives and what it costs."""

from __future__ import annotations

import subprocess
import sys

import botwire_stream
from botwire_stream import errors


def test_every_public_name_resolves() -> None:
    for name in botwire_stream.__all__:
        assert getattr(botwire_stream, name).__name__ == name
    assert set(botwire_stream.__all__) <= set(dir(botwire_stream))


def test_import_is_light_until_a_class_is_used() -> None:
    # `botwire --help` and `from botwire_stream import errors` must not pay for nats-py.
    code = "import sys, botwire_stream, botwire_stream.errors, botwire_stream.cli; print('nats' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"


def test_every_error_is_a_botwire_error_with_an_http_status() -> None:
    for name in errors.__all__:
        obj = getattr(errors, name)
        if isinstance(obj, type):
            assert issubclass(obj, errors.BotWireError)
            assert 400 <= obj.http_status < 600
