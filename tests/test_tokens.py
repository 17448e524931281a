"""Token streams in the library (``AsyncTokenStream``/``TokenStream``) against a real nats-server:
what a writer stores, any process reads, from any offset, live until the stream is closed."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid

import pytest

from botwire_stream import AsyncTokenStream, TokenStream, errors
from botwire_stream.tokens import open_token_streams
from tests import procs
from tests.waits import until


def _path() -> str:
    return "answers/" + uuid.uuid4().hex


async def test_two_processes_write_and_follow_the_same_stream(url: str) -> None:
    path = _path()
    follower = subprocess.Popen(
        [sys.executable, "-m", "tests.token_workers", "follow", url, path],
        cwd=procs.ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        # the follower needs the stream to exist: create it here, and write from another process
        async with AsyncTokenStream(path, url=url) as s:
            await s.create(content_type="text/plain")
        assert follower.stdout is not None
        assert follower.stdout.readline().strip() == "ready"
        offsets = await asyncio.to_thread(procs.run, "tests.token_workers", ["write", url, path, "50"])
        out, err = follower.communicate(timeout=30)
        assert follower.returncode == 0, err[-3000:]
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert json.loads(out.strip().splitlines()[-1]) == "".join(f"<{i}>" for i in range(50))
    assert offsets == sorted(offsets) and len(set(offsets)) == 50
    # and a third party catches up from every offset the writer got back
    async with AsyncTokenStream(path, url=url) as s:
        for i, off in enumerate(offsets):
            got = await s.read(off)
            assert got.data.decode() == "".join(f"<{j}>" for j in range(i + 1, 50))
            assert got.up_to_date and got.closed


async def test_producer_retries_are_stored_once_and_fenced_by_epoch(url: str) -> None:
    async with AsyncTokenStream(_path(), url=url) as s:
        await s.create()
        first = await s.append(b"a", producer=("llm-1", 0, 0))
        again = await s.append(b"a", producer=("llm-1", 0, 0))  # the retry of a lost ack
        assert (first.duplicate, again.duplicate) == (False, True)
        await s.append(b"b", producer=("llm-1", 0, 1))
        with pytest.raises(errors.ProducerSeqGap) as gap:
            await s.append(b"d", producer=("llm-1", 0, 3))
        assert (gap.value.expected, gap.value.received) == (2, 3)
        await s.append(b"X", producer=("llm-1", 1, 0))  # a restarted producer, new epoch
        with pytest.raises(errors.ProducerFenced) as fenced:
            await s.append(b"z", producer=("llm-1", 0, 2))  # the old instance is fenced off
        assert fenced.value.epoch == 1
        assert (await s.read()).data == b"abX"


async def test_concurrent_retries_of_one_producer_tuple_store_it_once(url: str) -> None:
    # 20 copies of each append raced by 20 tasks on separate connections: one stored each
    path = _path()
    streams, client = await open_token_streams(url=url)
    try:
        await streams.create(path)
        others = [await open_token_streams(url=url) for _ in range(4)]
        try:
            for seq in range(5):
                results = await asyncio.gather(
                    *(o[0].append(path, f"[{seq}]".encode(), producer=("p", 0, seq)) for o in others * 5)
                )
                assert sum(not r.duplicate for r in results) == 1
        finally:
            for o in others:
                await o[1].close()
        assert (await streams.read(path)).data == b"[0][1][2][3][4]"
    finally:
        await client.close()


async def test_closing_is_final_and_readers_see_the_end(url: str) -> None:
    async with AsyncTokenStream(_path(), url=url) as s:
        await s.create(content_type="text/plain")
        tail = asyncio.ensure_future(_collect(s))
        await s.append("Hel")
        await s.append("lo", close=True)
        assert await asyncio.wait_for(tail, 10) == b"Hello"
        with pytest.raises(errors.StreamClosed) as closed:
            await s.append("more")
        assert closed.value.next_offset == (await s.info()).next_offset
        assert (await s.read()).data == b"Hello"


async def _collect(s: AsyncTokenStream) -> bytes:
    return b"".join([got.data async for got in s.follow()])


async def test_ttl_expiry_removes_the_stream_and_frees_the_path(url: str) -> None:
    s = AsyncTokenStream(_path(), url=url)
    try:
        await s.create(ttl=1, content_type="text/plain")
        await s.append("soon gone")
        assert (await s.read()).data == b"soon gone"

        async def gone() -> bool:
            try:
                await s.info()  # info does not renew the TTL
            except errors.StreamNotFound:
                return True
            return False

        await until(gone, "the stream expiring", bound=10)
        with pytest.raises(errors.StreamNotFound):
            await s.read()
        assert await s.create(content_type="text/plain")  # created anew, empty
        assert (await s.read()).data == b""
    finally:
        await s.close()


async def test_bad_input_is_refused_and_nothing_is_written(url: str) -> None:
    async with AsyncTokenStream(_path(), url=url) as s:
        await s.create(content_type="application/json")
        for bad in (b"{not json", b"[]"):
            with pytest.raises(errors.InvalidArgument):
                await s.append(bad)
        for offset in ("abc", "1_", "../x", "", "0,1"):
            with pytest.raises(errors.InvalidOffset):
                await s.read(offset)
        with pytest.raises(errors.Conflict):
            await s.create(content_type="text/plain")  # exists with another type
        with pytest.raises(errors.InvalidArgument):
            await s.append(b"x" * 2_000_000)  # not JSON, so refused before its size
        assert (await s.read()).data == b"[]"
        await s.append(b'[{"a": 1}, [2]]')
        assert json.loads((await s.read()).data) == [{"a": 1}, [2]]
    with pytest.raises(errors.StreamNotFound):
        await AsyncTokenStream(_path(), url=url).read()


def test_sync_face_writes_and_reads(url: str) -> None:
    with TokenStream(_path(), url=url) as s:
        assert s.create(content_type="text/plain")
        s.append("a")
        s.append("b", close=True)
        with s.follow() as parts:
            assert b"".join(p.data for p in parts) == b"ab"
        fork = s.fork(s.path + "-fork", s.read().next_offset)
        assert fork.read().data == b"ab" and not fork.info().closed


@pytest.mark.slow
async def test_reads_from_every_offset_of_a_10000_chunk_stream(url: str) -> None:
    path = _path()
    streams, client = await open_token_streams(url=url)
    try:
        await streams.create(path)
        n = 10_000
        offsets = ["-1"]
        for i in range(n):
            offsets.append((await streams.append(path, i.to_bytes(2, "big"))).next_offset)
        assert offsets[1:] == sorted(offsets[1:]) and len(set(offsets)) == n + 1
        for i, off in enumerate(offsets[:-1]):  # each offset: exactly the next chunk follows
            got = await streams.read(path, off, max_bytes=1)
            assert (got.data, got.next_offset) == (i.to_bytes(2, "big"), offsets[i + 1])
        for i in range(0, n + 1, 997):  # and a full read from some: everything after it
            got = await streams.read(path, offsets[i])
            assert got.data == b"".join(j.to_bytes(2, "big") for j in range(i, n)) and got.up_to_date
    finally:
        await client.close()
