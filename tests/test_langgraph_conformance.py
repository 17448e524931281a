"""langgraph-checkpoint-conformance 0.0.2 against BotWireSaver on a real nats-server."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

pytest.importorskip("langgraph.checkpoint.conformance")

from langgraph.checkpoint.conformance import checkpointer_test, validate  # noqa: E402
from langgraph.checkpoint.conformance.capabilities import ALL_CAPABILITIES  # noqa: E402

from botwire_stream.integrations.langgraph import BotWireSaver  # noqa: E402


async def test_conformance_every_capability(url: str) -> None:
    """Every base and extended capability of the official suite passes (a fresh namespace per
    suite, so that the suites' whole-namespace reads see their own data only)."""

    @checkpointer_test(name="BotWireSaver")
    async def saver() -> AsyncIterator[BotWireSaver]:
        s = BotWireSaver("t" + uuid.uuid4().hex[:16], url=url)
        try:
            yield s
        finally:
            await s.aclose()

    report = await validate(saver)
    report.print_report()
    counts = {
        cap: (r.detected, r.passed, r.tests_passed, r.tests_failed, r.tests_skipped)
        for cap, r in report.results.items()
    }
    print(counts)
    failures = {cap: r.failures for cap, r in report.results.items() if r.failures}
    assert report.passed_all(), failures
    assert report.conformance_level() == "FULL"
    for cap in ALL_CAPABILITIES:  # every capability detected and run, none skipped or failed
        result = report.results[str(cap.value)]
        assert result.detected and result.passed and result.tests_passed > 0, (cap, result)
        assert result.tests_failed == 0 and result.tests_skipped == 0, (cap, result)
