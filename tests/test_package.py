"""The package's public surface: what `import botwire_stream` gives and what it costs."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest

import botwire_stream
from botwire_stream import errors


def test_every_public_name_resolves() -> None:
    for name in botwire_stream.__all__:
        assert getattr(botwire_stream, name).__name__ == name
    assert set(botwire_stream.__all__) <= set(dir(botwire_stream))


@pytest.mark.parametrize("module", ["botwire_stream", "botwire_stream.errors", "botwire_stream.cli"])
def test_import_is_light_until_a_class_is_used(module: str) -> None:
    # `botwire --help` and `from botwire_stream import errors` must not pay for nats-py, nor for the
    # optional or heavy dependencies (the certificate's cryptography, nkeys for creds, langchain).
    heavy = ["nats", "cryptography", "langchain_core", "nkeys"]
    code = f"import sys, {module}; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


# Modules that get their __all__ when the transport split (issue 15 items 1-3) lands.
_PENDING_ALL: set[str] = set()  # modules still without __all__ (none)


def test_every_module_lists_its_names() -> None:
    # The public boundary: each module says what it exports, and every listed name exists.
    for info in pkgutil.walk_packages(botwire_stream.__path__, "botwire_stream."):
        if info.name in _PENDING_ALL:
            continue
        module = importlib.import_module(info.name)
        assert isinstance(getattr(module, "__all__", None), list), f"{info.name} has no __all__"
        for name in module.__all__:
            assert hasattr(module, name), f"{info.name}.__all__ names a missing {name!r}"


def test_every_error_is_a_botwire_error_with_an_http_status() -> None:
    for name in errors.__all__:
        obj = getattr(errors, name)
        if isinstance(obj, type):
            assert issubclass(obj, errors.BotWireError)
            assert 400 <= obj.http_status < 600
