"""QA of issue 10's replay over HTTP (``GET /v1/ns/{ns}/replay``, botwire_stream/http/replay.py):
``botwire serve`` SIGKILLed, or its nats-server SIGKILLed and restarted, in the middle of a
replay stream. A reader gets every event once, or a ``botwire_stream.errors`` exception: never a
stream cut short that ends as if it were complete."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from botwire_stream import AsyncMemory, areplay
from botwire_stream.errors import BotWireError, ServerUnavailable

from .http_serve import Serves
from .servers import NatsServer

pytestmark = [pytest.mark.nats_only, pytest.mark.slow]

_VALUE = "v" * 4000  # large lines: the stream outgrows the loopback socket buffers, so a kill cuts it


async def _write(url: str, namespace: str, n: int, pad: str = _VALUE) -> None:
    async with AsyncMemory(namespace, url=url) as m:
        for i in range(0, n, 250):
            await asyncio.gather(*(m.set(f"k{j:05d}", {"i": j, "pad": pad}) for j in range(i, min(i + 250, n))))


async def test_areplay_over_http_with_serve_killed_mid_stream_raises(url: str, namespace: str, serves: Serves) -> None:
    """``areplay(url=http://serve)``: the serve process SIGKILLed after the first events. The
    replay raises ServerUnavailable (a BotWireError) well within its timeout; the events it gave
    before are the log's first ones, in order, none twice."""
    n = 1000  # 4 MB of lines: measured, about 30 events reach the reader before the reset
    await _write(url, namespace, n)
    serve = serves.start(url)
    seen: list[int] = []
    timeout = 5.0
    began = 0.0
    with pytest.raises(ServerUnavailable):
        async for e in areplay(namespace, url=serve.base, conversations=None, timeout=timeout):
            seen.append(e.seq)
            if len(seen) == 5:
                serve.kill()
                began = time.monotonic()
    assert time.monotonic() - began < 3 * timeout  # does not hang
    assert 5 <= len(seen) < n  # cut: what came is a prefix, in order
    assert seen == list(range(1, len(seen) + 1))


async def test_areplay_over_http_with_nats_killed_mid_stream_is_complete_or_raises(
    own_server: NatsServer, namespace: str, serves: Serves
) -> None:
    """The serve's nats-server SIGKILLed and started again while ``areplay`` over HTTP reads (the
    server mid-scan: past its first 10,000-event pull): every event once, in order, or a
    BotWireError (an error line, a broken stream); never an early end without one."""
    n = 10_500
    await _write(own_server.url, namespace, n, pad="")
    serve = serves.start(own_server.url)
    seqs: list[int] = []
    timeout = 5.0
    try:
        async for e in areplay(namespace, url=serve.base, conversations=None, timeout=timeout):
            seqs.append(e.seq)
            if len(seqs) == 9_990:  # the server has sent its first pull's events: the next one meets the kill
                own_server.kill()
                own_server.start()
    except BotWireError:
        assert seqs == list(range(1, len(seqs) + 1))
    else:
        assert seqs == list(range(1, n + 1))


async def test_areplay_over_http_with_serve_stopped_mid_stream_is_complete_or_raises(
    url: str, namespace: str, serves: Serves
) -> None:
    """``botwire serve`` SIGTERMed (a restart) while a reader is paused mid-replay: it waits 5 s
    for requests in flight, then stops. The reader, going on once the process has exited, gets
    every event once, or a BotWireError: never a stream that ends early as if complete."""
    n = 1000
    await _write(url, namespace, n)
    serve = serves.start(url)
    seqs: list[int] = []
    try:
        async for e in areplay(namespace, url=serve.base, conversations=None, timeout=5.0):
            seqs.append(e.seq)
            if len(seqs) == 5:
                serve.proc.send_signal(signal.SIGTERM)
                assert serve.proc.wait(30) == 0  # the reader paused meanwhile: the stream was cut
    except BotWireError:
        assert 5 <= len(seqs) < n and seqs == list(range(1, len(seqs) + 1))
    else:
        assert seqs == list(range(1, n + 1))
