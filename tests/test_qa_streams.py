"""QA of token streams and ``botwire serve``: faults, races and bad input that users meet (real
nats-server, real serve processes, real HTTP clients; no mocks)."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.http_serve import Serve, serving
from tests.servers import NatsServer
from tests.waits import sigstop

TEXT = {"content-type": "text/plain"}
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def shared(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    """One serve process for the bad-input tests: each also checks it keeps serving."""
    with serving(nats_server.url, tmp_path_factory.mktemp("serve") / "shared.log") as serve:
        yield serve


def _name() -> str:
    return "qa-" + uuid.uuid4().hex


def test_a_write_to_a_conversation_path_with_encoded_slashes_is_refused_read_only(shared: Serve) -> None:
    # /v1/stream/chat%2Fns%2Fsess names the same stream as /v1/stream/chat/ns/sess once decoded:
    # it must get the conversations' read-only status, and create no token stream there
    a = shared
    ns, session = "n" + uuid.uuid4().hex[:8], "s1"
    encoded = f"{a.base}/v1/stream/chat%2F{ns}%2F{session}"
    for method in ("PUT", "POST"):
        r = httpx.request(method, encoded, headers=TEXT, content=b"forged")
        assert r.status_code == 405, (method, r.status_code, r.text)
    plain = httpx.get(f"{a.base}/v1/stream/chat/{ns}/{session}", params={"offset": "-1"})
    assert b"forged" not in plain.content
    # and the server keeps serving token streams
    assert httpx.put(a.stream(_name()), headers=TEXT, content=b"x").status_code == 201


@pytest.mark.parametrize(
    "message",
    [
        b"123456789012345678901234567890",  # beyond 64 bits: must not become a float
        b"0.1000000000000000055511151231257827",  # more digits than a double keeps
        b'{"a":1,"a":2}',  # duplicate keys: kept as sent
        b"1e400",  # beyond a double: must not become inf/null
    ],
)
def test_a_json_message_reads_back_as_the_same_json_text(shared: Serve, message: bytes) -> None:
    # a JSON stream keeps message boundaries, never the writer's numbers or keys rewritten
    a = shared
    name = _name()
    assert httpx.put(a.stream(name), headers=JSON).status_code == 201
    r = httpx.post(a.stream(name), headers=JSON, content=b"[" + message + b", 7]")
    assert r.status_code == 204, r.text
    got = httpx.get(a.stream(name), params={"offset": "-1"})
    assert got.status_code == 200
    assert got.content.replace(b" ", b"") == b"[" + message + b",7]"


@pytest.mark.parametrize("body", [b"NaN", b"[1,]", b"{\"a\":}", b"[" * 5000 + b"]" * 5000 + b"x", b"\xff"])
def test_invalid_json_is_refused_and_nothing_is_written(shared: Serve, body: bytes) -> None:
    a = shared
    name = _name()
    assert httpx.put(a.stream(name), headers=JSON, content=b"[1]").status_code == 201
    r = httpx.post(a.stream(name), headers=JSON, content=body)
    assert r.status_code == 400, r.status_code
    assert httpx.get(a.stream(name), params={"offset": "-1"}).content == b"[1]"


def test_a_live_reader_never_sees_a_recreated_streams_data_as_the_old_ones(url: str, tmp_path: Path) -> None:
    # a long-poll waits on A; A is stopped (SIGSTOP, by PID: we started it) while the stream is
    # deleted and created again with other data through B; when A runs again, its reader must
    # get an end (404/410), not the new stream's bytes as the continuation of the old one
    with serving(url, tmp_path / "a.log", long_poll=15) as a, serving(url, tmp_path / "b.log") as b:
        name = _name()
        assert httpx.put(b.stream(name), headers=TEXT, content=b"old").status_code == 201
        tail = httpx.head(b.stream(name)).headers["stream-next-offset"]
        result: dict[str, Any] = {}

        def poll() -> None:
            result["r"] = httpx.get(a.stream(name), params={"offset": tail, "live": "long-poll"}, timeout=40)

        poller = threading.Thread(target=poll)
        poller.start()
        time.sleep(0.5)  # the poll is waiting on A
        sigstop(a.proc.pid)
        try:
            assert httpx.delete(b.stream(name)).status_code == 204
            assert httpx.put(b.stream(name), headers=TEXT, content=b"NEW").status_code == 201
            assert httpx.post(b.stream(name), headers=TEXT, content=b"MORE").status_code == 204
        finally:
            os.kill(a.proc.pid, signal.SIGCONT)
        poller.join(30)
        assert not poller.is_alive()
        r = result["r"]
        assert b"NEW" not in r.content and b"MORE" not in r.content, (r.status_code, r.content)
        assert r.status_code in (404, 410, 204), r.status_code


def test_odd_paths_get_their_status_nothing_is_written_and_the_server_keeps_serving(shared: Serve) -> None:
    a = shared
    base = f"{a.base}/v1/stream/"
    cases = {
        "%ff%fe": 400,  # not UTF-8 once decoded
        "a%00b": 400,  # NUL
        "a%0Ab": 400,  # newline
        "x" * 1025: 414,
    }
    for raw, status in cases.items():
        r = httpx.put(base + raw, headers=TEXT, content=b"x")
        assert r.status_code == status, (raw[:20], r.status_code, r.text)
        assert r.headers["content-type"].startswith("text/plain")
    # NATS wildcards and dots are plain characters of a name: each its own stream
    names = ["a.*", "a.>", "*", ">", "a..b", "a/../b", "a%2Fb", "é/ü", "x" * 1024]
    for i, n in enumerate(names):
        assert httpx.put(base + n, headers=TEXT, content=str(i).encode()).status_code == 201, n
    for i, n in enumerate(names):
        got = httpx.get(base + n, params={"offset": "-1"})
        assert got.content == str(i).encode(), (n, got.status_code, got.content)
    # names are percent-decoded: a%2Fb and a/b are one stream (as for conversations)
    assert httpx.get(base + "a/b").content == str(names.index("a%2Fb")).encode()


@pytest.mark.parametrize(
    "offset,status",
    [("", 400), (" 1_1", 400), ("1_1/", 400), ("-2", 400), ("1", 400), ("1_", 400), ("_1", 400),
     ("1" * 17 + "_0", 400), ("٣_٣", 400), ("0_0\x00", 400), ("NOW", 400)],
)
def test_malformed_offsets_are_400(shared: Serve, offset: str, status: int) -> None:
    a = shared
    name = _name()
    assert httpx.put(a.stream(name), headers=TEXT, content=b"abc").status_code == 201
    r = httpx.get(a.stream(name), params={"offset": offset})
    assert r.status_code == status, (offset, r.status_code, r.text)


def test_offsets_with_leading_zeros_and_the_start_read_the_same(shared: Serve) -> None:
    a = shared
    name = _name()
    assert httpx.put(a.stream(name), headers=TEXT, content=b"abc").status_code == 201
    assert httpx.post(a.stream(name), headers=TEXT, content=b"def").status_code == 204
    for off in ("-1", "0_0", "0000000000000000_0000000000000000"):
        assert httpx.get(a.stream(name), params={"offset": off}).content == b"abcdef", off


@pytest.mark.parametrize("ttl", ["0", "-1", "1.5", "01", "1e3", "", "0x10", "+5"])
def test_bad_ttls_are_400_and_create_nothing(shared: Serve, ttl: str) -> None:
    a = shared
    name = _name()
    r = httpx.put(a.stream(name), headers={**TEXT, "stream-ttl": ttl})
    assert r.status_code == 400, (ttl, r.status_code, r.text)
    assert httpx.head(a.stream(name)).status_code == 404


@pytest.mark.parametrize("when", ["2000-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "2030-01-01T00:00:00", "2030-13-01T00:00:00Z", "10000-01-01T00:00:00Z"])
def test_expires_at_boundaries(shared: Serve, when: str) -> None:
    a = shared
    name = _name()
    r = httpx.put(a.stream(name), headers={**TEXT, "stream-expires-at": when}, content=b"x")
    if when.startswith("9999"):
        assert r.status_code == 201
        assert httpx.get(a.stream(name)).content == b"x"
    elif when.startswith("2000"):
        # already expired: refused, nothing written
        assert r.status_code == 400, r.status_code
        assert httpx.get(a.stream(name)).status_code == 404
    else:
        assert r.status_code == 400, (when, r.status_code)
        assert httpx.head(a.stream(name)).status_code == 404
    assert httpx.put(a.stream(_name()), headers=TEXT).status_code == 201


def test_producer_seq_at_2_53_minus_1_and_2_53(shared: Serve) -> None:
    a = shared
    name = _name()
    assert httpx.put(a.stream(name), headers=TEXT).status_code == 201
    top = 2**53 - 1
    p = {**TEXT, "producer-id": "p", "producer-epoch": str(top), "producer-seq": "0"}
    assert httpx.post(a.stream(name), headers=p, content=b"a").status_code == 200
    over = {**p, "producer-epoch": str(top + 1)}
    assert httpx.post(a.stream(name), headers=over, content=b"b").status_code == 400
    assert httpx.post(a.stream(name), headers={**p, "producer-seq": str(2**53)}, content=b"c").status_code == 400
    assert httpx.get(a.stream(name)).content == b"a"


def test_bodies_at_the_size_limit_and_one_over_and_chunked(shared: Serve) -> None:
    a = shared
    name = _name()
    assert httpx.put(a.stream(name), headers={"content-type": "application/octet-stream"}).status_code == 201
    limit = 0
    # find the limit from a 413 body: binary search would be slow; the server says it
    r = httpx.post(a.stream(name), headers={"content-type": "application/octet-stream"}, content=b"\0" * (64 << 20))
    assert r.status_code == 413
    limit = int([w for w in r.text.split() if w.isdigit()][0])
    at = os.urandom(limit)
    assert httpx.post(a.stream(name), headers={"content-type": "application/octet-stream"}, content=at).status_code == 204

    def chunks(n: int) -> Any:
        left = n
        while left:
            k = min(left, 65536)
            yield b"\1" * k
            left -= k

    over = httpx.post(a.stream(name), headers={"content-type": "application/octet-stream"}, content=chunks(limit + 1))
    assert over.status_code == 413
    small = httpx.post(a.stream(name), headers={"content-type": "application/octet-stream"}, content=chunks(3))
    assert small.status_code == 204
    assert httpx.get(a.stream(name), params={"offset": "-1"}, timeout=30).content == at + b"\1\1\1"


def test_a_deeply_nested_json_append_is_400_and_the_server_keeps_serving(shared: Serve) -> None:
    # valid JSON nested 5,000 deep: the decoder's recursion limit must be a 400, not a 500
    a = shared
    name = _name()
    assert httpx.put(a.stream(name), headers=JSON, content=b"[1]").status_code == 201
    deep = b"[" * 5000 + b"]" * 5000
    r = httpx.post(a.stream(name), headers=JSON, content=deep)
    assert r.status_code == 400, (r.status_code, r.text[:200])
    assert httpx.put(a.stream(_name()), headers=JSON, content=deep).status_code == 400
    assert httpx.get(a.stream(name), params={"offset": "-1"}).content == b"[1]"


@pytest.mark.slow
def test_producer_retries_after_kill_9_of_the_serve_process_are_stored_once(url: str, tmp_path: Path) -> None:
    # a producer appends through A; A is killed (-9) while requests are in flight; the producer
    # retries every tuple it sent through B: each chunk is stored exactly once, in order
    with serving(url, tmp_path / "a.log") as a, serving(url, tmp_path / "b.log") as b:
        name = _name()
        assert httpx.put(b.stream(name), headers=TEXT).status_code == 201
        sent: list[int] = []
        stop = threading.Event()

        def produce() -> None:
            with httpx.Client(timeout=5) as c:
                for seq in range(2000):
                    if stop.is_set():
                        return
                    sent.append(seq)
                    h = {**TEXT, "producer-id": "p", "producer-epoch": "0", "producer-seq": str(seq)}
                    try:
                        c.post(a.stream(name), headers=h, content=f"<{seq}>".encode())
                    except httpx.HTTPError:
                        return

        t = threading.Thread(target=produce)
        t.start()
        deadline = time.monotonic() + 10
        while len(sent) < 50 and time.monotonic() < deadline:
            time.sleep(0.01)
        a.kill()
        stop.set()
        t.join(10)
        assert not t.is_alive()
        with httpx.Client(timeout=10) as c:
            for seq in sent:
                h = {**TEXT, "producer-id": "p", "producer-epoch": "0", "producer-seq": str(seq)}
                r = c.post(b.stream(name), headers=h, content=f"<{seq}>".encode())
                assert r.status_code in (200, 204), (seq, r.status_code, r.text)
        body = httpx.get(b.stream(name), params={"offset": "-1"}).text
        assert body == "".join(f"<{s}>" for s in sent)


@pytest.mark.slow
def test_close_racing_appends_from_two_processes_nothing_after_an_acknowledged_close(url: str, tmp_path: Path) -> None:
    # appends through A and a close through B race; every acknowledged append is in the
    # stream, an append refused as closed is not, and nothing follows the close
    with serving(url, tmp_path / "a.log") as a, serving(url, tmp_path / "b.log") as b:
        for _round in range(3):
            name = _name()
            assert httpx.put(a.stream(name), headers=TEXT).status_code == 201
            acked: list[str] = []
            refused: list[str] = []

            def append(i: int) -> None:
                with httpx.Client(timeout=10) as c:
                    for j in range(40):
                        piece = f"<{i}.{j}>"
                        r = c.post(a.stream(name), headers=TEXT, content=piece.encode())
                        (acked if r.status_code == 204 else refused).append(piece)
                        if r.status_code == 409:
                            assert r.headers["stream-closed"] == "true"
                            return

            threads = [threading.Thread(target=append, args=(i,)) for i in range(3)]
            for t in threads:
                t.start()
            time.sleep(0.05)
            closed = httpx.post(b.stream(name), headers={"stream-closed": "true"})
            assert closed.status_code == 204
            for t in threads:
                t.join(30)
            body = httpx.get(b.stream(name), params={"offset": "-1"})
            assert body.headers["stream-closed"] == "true"
            for piece in acked:
                assert body.text.count(piece) == 1
            for piece in refused:
                assert piece not in body.text
            assert len(body.text) == sum(len(p) for p in acked)
            assert httpx.post(a.stream(name), headers=TEXT, content=b"late").status_code == 409


@pytest.mark.slow
def test_kill_9_of_nats_during_producer_appends_and_a_long_poll(own_server: NatsServer, tmp_path: Path) -> None:
    # a producer appends (retrying each tuple until acknowledged) while the nats-server is
    # killed (-9) and restarted; a long-poll waiting meanwhile ends (any status) within a bound;
    # afterwards every chunk is in the stream exactly once, in order, and reads resume
    with serving(own_server.url, tmp_path / "a.log", long_poll=5) as a:
        name = _name()
        assert httpx.put(a.stream(name), headers=TEXT).status_code == 201
        tail = httpx.head(a.stream(name)).headers["stream-next-offset"]
        acked: list[int] = []
        poll: dict[str, Any] = {}

        def produce() -> None:
            with httpx.Client(timeout=15) as c:
                for seq in range(120):
                    h = {**TEXT, "producer-id": "p", "producer-epoch": "0", "producer-seq": str(seq)}
                    for _try in range(40):
                        try:
                            r = c.post(a.stream(name), headers=h, content=f"<{seq}>".encode())
                        except httpx.HTTPError:
                            time.sleep(0.25)
                            continue
                        if r.status_code in (200, 204):
                            acked.append(seq)
                            break
                        assert r.status_code >= 500, (seq, r.status_code, r.text)
                        time.sleep(0.25)
                    else:
                        return

        def long_poll() -> None:
            started = time.monotonic()
            try:
                r = httpx.get(a.stream(name + "-idle"), params={"offset": "-1", "live": "long-poll"}, timeout=40)
                poll["status"] = r.status_code
            except httpx.HTTPError as exc:
                poll["status"] = repr(exc)
            poll["took"] = time.monotonic() - started

        assert httpx.put(a.stream(name + "-idle"), headers=TEXT).status_code == 201
        t, p = threading.Thread(target=produce), threading.Thread(target=long_poll)
        t.start()
        p.start()
        deadline = time.monotonic() + 10
        while len(acked) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        own_server.kill()
        time.sleep(0.5)
        own_server.restart()
        t.join(60)
        p.join(60)
        assert not t.is_alive() and not p.is_alive()
        assert acked == list(range(120))
        assert poll["took"] < 30, poll  # the 5 s long-poll is not stuck behind the outage
        got = httpx.get(a.stream(name), params={"offset": "-1"}, timeout=10)
        assert got.text == "".join(f"<{s}>" for s in range(120))
        # resumable from the offset taken before the outage, and strictly increasing
        again = httpx.get(a.stream(name), params={"offset": tail}, timeout=10)
        assert again.text == got.text
        assert again.headers["stream-next-offset"] > tail


async def test_follow_ends_when_the_stream_is_deleted_and_created_again_between_reads(url: str) -> None:
    # the catch-up read is taken, then the stream is deleted and created again with other
    # data: the follower's next read must end (StreamNotFound), not yield the new stream's data
    from botwire_stream.errors import StreamNotFound
    from botwire_stream.tokens import open_token_streams

    store, client = await open_token_streams(url=url)
    try:
        name = _name()
        await store.create(name, content_type="text/plain", data=b"old")
        follow = store.follow(name, idle=5.0)
        first = await follow.__anext__()
        assert first.data == b"old"
        await store.delete(name)
        await store.create(name, content_type="text/plain", data=b"NEW")
        await store.append(name, b"MORE")
        with pytest.raises((StreamNotFound, StopAsyncIteration)):
            got = await follow.__anext__()
            assert b"NEW" not in got.data and b"MORE" not in got.data, got
            raise AssertionError(f"the follower read on: {got!r}")
        await follow.aclose()
    finally:
        await client.close()


def test_a_conversation_whose_session_holds_a_percent_sign_reads_its_own_messages(shared: Serve, namespace: str, url: str) -> None:
    from botwire_stream import ChatHistory

    other, odd = ChatHistory("aA", namespace=namespace, url=url), ChatHistory("a%41", namespace=namespace, url=url)
    try:
        other.append({"role": "user", "content": "not yours"})
        odd.append({"role": "user", "content": "mine"})
        got = httpx.get(f"{shared.base}/v1/stream/chat/{namespace}/a%2541")
        assert got.status_code == 200
        assert got.json() == [{"role": "user", "content": "mine"}]
    finally:
        other.close()
        odd.close()


@pytest.mark.slow
async def test_sigterm_with_300_open_long_polls_and_sse_readers_ends_them_all_and_exits_0(url: str, tmp_path: Path) -> None:
    import asyncio

    with serving(url, tmp_path / "a.log", long_poll=30) as a:
        name = _name()
        assert httpx.put(a.stream(name), headers=TEXT, content=b"x").status_code == 201
        tail = httpx.head(a.stream(name)).headers["stream-next-offset"]
        limits = httpx.Limits(max_connections=400, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=40, limits=limits) as c:

            async def poll() -> str:
                try:
                    r = await c.get(a.stream(name), params={"offset": tail, "live": "long-poll"})
                    return str(r.status_code)
                except httpx.HTTPError as exc:
                    return type(exc).__name__

            async def sse() -> str:
                try:
                    async with c.stream("GET", a.stream(name), params={"offset": tail, "live": "sse"}) as r:
                        async for _ in r.aiter_bytes():
                            pass
                    return "sse-ended"
                except httpx.HTTPError as exc:
                    return type(exc).__name__

            tasks = [asyncio.ensure_future(poll()) for _ in range(150)] + [asyncio.ensure_future(sse()) for _ in range(150)]
            await asyncio.sleep(3)  # all connected and waiting (30 s long-poll)
            assert not any(t.done() for t in tasks), [t.result() for t in tasks if t.done()][:5]
            started = time.monotonic()
            os.kill(a.proc.pid, signal.SIGTERM)
            done, pending = await asyncio.wait(tasks, timeout=20)
            assert not pending
            assert time.monotonic() - started < 20
            results = [t.result() for t in done]
            assert a.proc.wait(20) == 0
        # every long-poll got an answer (204: nothing new) and every SSE stream ended cleanly
        assert results.count("204") == 150, sorted(set(results))
        assert results.count("sse-ended") == 150, sorted(set(results))


@pytest.mark.slow
def test_two_processes_racing_the_same_producer_tuples_store_each_seq_once(url: str, tmp_path: Path) -> None:
    with serving(url, tmp_path / "a.log") as a, serving(url, tmp_path / "b.log") as b:
        name = _name()
        assert httpx.put(a.stream(name), headers=TEXT).status_code == 201
        statuses: dict[str, list[int]] = {"A": [], "B": []}
        barrier = threading.Barrier(2)

        def run(tag: str, serve: Any) -> None:
            with httpx.Client(timeout=15) as c:
                for seq in range(40):
                    barrier.wait(15)
                    h = {**TEXT, "producer-id": "same", "producer-epoch": "0", "producer-seq": str(seq)}
                    r = c.post(serve.stream(name), headers=h, content=f"{tag}{seq};".encode())
                    statuses[tag].append(r.status_code)

        threads = [threading.Thread(target=run, args=("A", a)), threading.Thread(target=run, args=("B", b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        pieces = httpx.get(a.stream(name), params={"offset": "-1"}).text.split(";")[:-1]
        assert [int(p[1:]) for p in pieces] == list(range(40))  # each seq once, in order
        for seq in range(40):
            # one of the two stored it (200), the other was told it is a duplicate (204)
            assert sorted([statuses["A"][seq], statuses["B"][seq]]) == [200, 204], seq
            assert pieces[seq][0] == ("A" if statuses["A"][seq] == 200 else "B")


@pytest.mark.slow
def test_delete_racing_fork_creation_never_leaves_a_fork_without_its_data(url: str, tmp_path: Path) -> None:
    # a fork is created through B while its source is deleted through A: either the fork is
    # refused, or it exists and reads the source's chunks (the source then only soft-deleted)
    with serving(url, tmp_path / "a.log") as a, serving(url, tmp_path / "b.log") as b:
        outcomes: set[tuple[int, int]] = set()
        for _round in range(12):
            src, fork = _name(), _name()
            assert httpx.put(a.stream(src), headers=TEXT, content=b"source-data").status_code == 201
            barrier = threading.Barrier(2)
            got: dict[str, int] = {}

            def do_fork() -> None:
                barrier.wait(10)
                got["fork"] = httpx.put(b.stream(fork), headers={"stream-forked-from": src}, timeout=15).status_code

            def do_delete() -> None:
                barrier.wait(10)
                got["delete"] = httpx.delete(a.stream(src), timeout=15).status_code

            threads = [threading.Thread(target=do_fork), threading.Thread(target=do_delete)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert got["delete"] == 204
            outcomes.add((got["fork"], got["delete"]))
            if got["fork"] == 201:
                r = httpx.get(b.stream(fork), params={"offset": "-1"})
                assert (r.status_code, r.content) == (200, b"source-data"), (_round, r.status_code, r.content)
            else:
                assert got["fork"] in (404, 409), got
            assert httpx.get(a.stream(src)).status_code in (404, 410)


@pytest.mark.slow
def test_an_epoch_bump_racing_appends_fences_every_later_old_epoch_append(url: str, tmp_path: Path) -> None:
    # epoch 0 appends through A while epoch 1 starts through B: once epoch 1 is acknowledged,
    # no epoch-0 append is stored after it (each one acknowledged is before it, the rest 403)
    with serving(url, tmp_path / "a.log") as a, serving(url, tmp_path / "b.log") as b:
        name = _name()
        assert httpx.put(a.stream(name), headers=TEXT).status_code == 201
        acked: list[int] = []
        fenced: list[int] = []

        def old() -> None:
            with httpx.Client(timeout=15) as c:
                for seq in range(200):
                    h = {**TEXT, "producer-id": "p", "producer-epoch": "0", "producer-seq": str(seq)}
                    r = c.post(a.stream(name), headers=h, content=f"e0s{seq};".encode())
                    if r.status_code == 403:
                        assert r.headers["producer-epoch"] == "1"
                        fenced.append(seq)
                        return
                    assert r.status_code == 200, r.status_code
                    acked.append(seq)

        t = threading.Thread(target=old)
        t.start()
        deadline = time.monotonic() + 10
        while len(acked) < 10 and time.monotonic() < deadline:
            time.sleep(0.005)
        h = {**TEXT, "producer-id": "p", "producer-epoch": "1", "producer-seq": "0"}
        assert httpx.post(b.stream(name), headers=h, content=b"e1s0;").status_code == 200
        t.join(60)
        assert not t.is_alive()
        pieces = httpx.get(a.stream(name), params={"offset": "-1"}).text.split(";")[:-1]
        assert pieces[-1] == "e1s0"
        assert pieces[:-1] == [f"e0s{s}" for s in acked]
        assert fenced or len(acked) == 200


@pytest.mark.slow
async def test_a_fork_created_while_its_source_is_deleted_keeps_the_sources_chunks(url: str) -> None:
    # delete and fork of one source raced on one loop, the delete started 0-3 ms later; on
    # the code before, the delete purged on a snapshot taken before the fork's hold: the fork
    # existed and read nothing (56 of 300 tries; round 4 here). Either the fork is refused, or it reads all.
    import asyncio

    from botwire_stream import errors
    from botwire_stream.tokens import open_token_streams

    store, client = await open_token_streams(url=url)
    outcomes = {"forked": 0, "refused": 0}
    try:
        for i in range(120):
            src, fork = _name(), _name()
            await store.create(src, content_type="text/plain", data=b"src")

            async def make_fork(src: str = src, fork: str = fork) -> bool:
                try:
                    await store.create(fork, fork_from=src)
                    return True
                except (errors.Conflict, errors.StreamNotFound):
                    return False

            async def delete(src: str = src, i: int = i) -> None:
                await asyncio.sleep((i % 30) * 0.0001)
                await store.delete(src)

            made, _ = await asyncio.gather(make_fork(), delete())
            if made:
                outcomes["forked"] += 1
                assert (await store.read(fork)).data == b"src", (i, outcomes)
            else:
                outcomes["refused"] += 1
            with pytest.raises((errors.StreamNotFound, errors.StreamDeleted)):
                await store.read(src)
    finally:
        await client.close()
