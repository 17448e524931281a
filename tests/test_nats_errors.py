"""The translation of NATS failures into botwire's error tree, checked without a server: each
JetStream API code and nats-py/OS exception gives the documented class and a message that says
what to do, with no URL password in it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import nats.errors as ne
import nats.js.errors as je
import pytest

from botwire_stream import errors
from botwire_stream.nats.errors import ApiError, api_error, raise_api_error, translate


def _api(code: int, err_code: int = 0, description: str = "something") -> BaseException:
    return translate(je.APIError(code=code, err_code=err_code, description=description))


@pytest.mark.parametrize(
    ("code", "err_code", "cls", "says"),
    [
        (400, 10071, errors.Conflict, "another writer changed it first"),  # wrong last sequence
        (400, 10164, errors.Conflict, "another writer"),
        (400, 10058, errors.Conflict, "another writer"),  # stream name in use with another config
        (409, 0, errors.Conflict, "another writer"),
        (400, 10023, errors.QuotaExceeded, "storage limit"),  # insufficient resources
        (400, 10047, errors.QuotaExceeded, "storage limit"),
        (400, 10077, errors.QuotaExceeded, "storage limit"),
        (400, 10054, errors.ValueTooLarge, "something"),  # message size exceeds maximum
        (503, 0, errors.ServerUnavailable, "is it started with -js?"),
        (401, 0, errors.Unauthorized, "something"),
        (403, 0, errors.Unauthorized, "something"),
    ],
)
def test_jetstream_api_codes(code: int, err_code: int, cls: type, says: str) -> None:
    exc = _api(code, err_code)
    assert type(exc) is cls
    assert says in str(exc)


def test_a_full_disk_is_storage_full_whatever_its_code() -> None:
    exc = _api(500, 10049, "error creating store for stream: write x: no space left on device")
    assert type(exc) is errors.StorageFull
    assert "free space" in str(exc)


def test_an_unknown_api_error_keeps_its_codes_and_description() -> None:
    exc = _api(400, 10999, "a new kind of error")
    assert type(exc) is errors.BotWireError
    assert str(exc) == "NATS JetStream error 400/10999: a new kind of error"


@pytest.mark.parametrize(
    "err",
    [
        {"code": 400, "err_code": 10071, "description": "wrong last sequence: 3"},
        ApiError(code=400, err_code=10071, description="wrong last sequence: 3"),
    ],
)
def test_one_builder_for_the_error_of_an_api_response(err: Any) -> None:
    exc = api_error(err)
    assert type(exc) is errors.Conflict
    assert "wrong last sequence: 3" in str(exc)
    with pytest.raises(errors.Conflict, match="wrong last sequence: 3"):
        raise_api_error(err)


def test_an_api_error_with_missing_fields() -> None:
    exc = api_error({"code": 503})
    assert type(exc) is errors.ServerUnavailable


@pytest.mark.parametrize(
    ("exc", "cls", "says"),
    [
        (ne.AuthorizationError(), errors.Unauthorized, "refused the credentials"),
        (ne.Error("nats: 'Authorization Violation'"), errors.Unauthorized, "check token="),
        (ne.MaxPayloadError(), errors.ValueTooLarge, "max_payload"),
        (ne.TimeoutError(), errors.ServerUnavailable, "did not answer in time"),
        (asyncio.TimeoutError(), errors.ServerUnavailable, "did not answer in time"),
        (ne.NoRespondersError(), errors.ServerUnavailable, "no JetStream stream answered"),
        (je.NoStreamResponseError(), errors.ServerUnavailable, "no JetStream stream answered"),
        (ne.ConnectionClosedError(), errors.ServerUnavailable, "cannot reach the NATS server"),
        (ne.NoServersError(), errors.ServerUnavailable, "cannot reach the NATS server"),
        (ne.StaleConnectionError(), errors.ServerUnavailable, "cannot reach the NATS server"),
        (ConnectionRefusedError(111, "Connection refused"), errors.ServerUnavailable, "botwire nats status"),
        (OSError("no route to host"), errors.ServerUnavailable, "no route to host"),
        (ne.Error("nats: something else"), errors.BotWireError, "NATS error: nats: something else"),
    ],
)
def test_client_exceptions(exc: BaseException, cls: type, says: str) -> None:
    new = translate(exc)
    assert type(new) is cls
    assert says in str(new)


@pytest.mark.parametrize(
    "exc",
    [
        OSError("connect to nats://alice:s3cret@db.example:4222 failed"),
        ne.Error("nats: bad url nats://alice:s3cret@db.example:4222"),
    ],
)
def test_url_credentials_are_redacted(exc: BaseException) -> None:
    msg = str(translate(exc))
    assert "s3cret" not in msg
    assert "db.example:4222" in msg


def test_our_errors_and_unrelated_ones_pass_through() -> None:
    mine = errors.InvalidKey("bad key")
    assert translate(mine) is mine
    other = KeyError("x")
    assert translate(other) is other


def test_the_error_tree_imports_no_nats() -> None:
    """errors.py is pure: importing it (what an HTTP client of the API needs) loads no nats-py."""
    code = "import sys, botwire_stream.errors; print(sorted(m for m in sys.modules if m.split('.')[0] == 'nats'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert not hasattr(errors, "translate")


def test_codes_of_the_new_classes() -> None:
    assert errors.Closed.code == "closed"
    assert isinstance(errors.Closed("x"), RuntimeError)
    assert errors.ChangedWhileRead.code == "changed_while_read"
