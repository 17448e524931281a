"""Schemathesis against ``/openapi.json`` (bounded examples per operation): no 5xx, and every
response matches the document (the SSE operations, which stream until their lifetime, excluded)."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance


@pytest.fixture
def api_schema(http_server: str) -> Any:
    return schemathesis.openapi.from_url(f"{http_server}/openapi.json").exclude(path_regex=r"/(watch|events)$")


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_error_and_responses_match_the_schema(case: Any) -> None:
    case.call_and_validate(checks=[not_a_server_error, response_schema_conformance])
