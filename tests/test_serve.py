"""``botwire serve``: Durable Streams over HTTP, state in NATS only, so several serve processes
share every stream; real nats-server, real serve processes, real HTTP clients."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from botwire_stream import ChatHistory
from tests.http_serve import serving
from tests.sse import sse_events

TEXT = {"content-type": "text/plain"}


def _name() -> str:
    return "s-" + uuid.uuid4().hex


def test_written_through_one_serve_process_read_live_through_another(url: str, tmp_path: Path) -> None:
    with serving(url, tmp_path / "a.log") as a, serving(url, tmp_path / "b.log", long_poll=10) as b:
        name = _name()
        assert httpx.put(a.stream(name), headers=TEXT, content=b"Hel").status_code == 201
        got = httpx.get(b.stream(name), params={"offset": "-1"})
        assert (got.status_code, got.text, got.headers["stream-up-to-date"]) == (200, "Hel", "true")
        tail = got.headers["stream-next-offset"]
        result: dict[str, Any] = {}

        def long_poll() -> None:
            result["r"] = httpx.get(b.stream(name), params={"offset": tail, "live": "long-poll"}, timeout=30)

        poller = threading.Thread(target=long_poll)
        poller.start()
        time.sleep(0.3)  # the poll is waiting on B (a 10 s timeout); the write goes to A
        done = httpx.post(a.stream(name), headers={**TEXT, "stream-closed": "true"}, content=b"lo")
        assert done.status_code == 204 and done.headers["stream-closed"] == "true"
        poller.join(20)
        assert result["r"].status_code == 200 and result["r"].text == "lo"
        # SSE from the start through B: both appends, then the closing control event
        with httpx.stream("GET", b.stream(name), params={"offset": "-1", "live": "sse"}, timeout=10) as sse:
            raw = "".join(sse.iter_text())
        events = [(e["event"], e.get("data", "")) for e in sse_events(raw.splitlines()) if e.get("event")]
        assert "".join(d for k, d in events if k == "data") == "Hello"
        assert all(events[i + 1][0] == "control" for i, (k, _) in enumerate(events) if k == "data")
        assert json.loads(events[-1][1])["streamClosed"] is True


def test_bad_input_gets_the_protocols_status_and_writes_nothing(url: str, tmp_path: Path) -> None:
    with serving(url, tmp_path / "a.log") as a:
        name = _name()
        s = a.stream(name)
        assert httpx.put(s, headers=TEXT, content=b"ok").status_code == 201
        big = b"x" * (2 << 20)
        cases = [
            ("GET", s, {"offset": "abc"}, {}, b"", 400),
            ("GET", s, {"offset": "../1"}, {}, b"", 400),
            ("GET", s, {"offset": ""}, {}, b"", 400),
            ("GET", s, {"live": "long-poll"}, {}, b"", 400),
            ("GET", a.stream(_name()), {}, {}, b"", 404),
            ("POST", a.stream(_name()), {}, TEXT, b"x", 404),
            ("POST", s, {}, TEXT, big, 413),
            ("POST", s, {}, {"content-type": "application/json"}, b"[1]", 409),
            ("POST", s, {}, {}, b"x", 400),
            ("POST", s, {}, TEXT, b"", 400),
            ("POST", s, {}, {**TEXT, "producer-id": "p"}, b"x", 400),
            ("PUT", s, {}, {"content-type": "application/json"}, b"", 409),
            ("PUT", a.stream(_name()), {}, {"stream-ttl": "05"}, b"", 400),
            ("PUT", a.stream(_name()), {}, {"stream-ttl": "5", "stream-expires-at": "2099-01-01T00:00:00Z"}, b"", 400),
            ("PUT", a.stream(_name()), {}, {"stream-expires-at": "tomorrow"}, b"", 400),
            ("PUT", a.stream("x" * 2000), {}, TEXT, b"", 414),
            ("PUT", a.base + "/v1/stream/bad%ff%fe", {}, TEXT, b"", 400),
        ]
        for method, where, params, headers, body, status in cases:
            r = httpx.request(method, where, params=params, headers=headers, content=body, timeout=10)
            assert r.status_code == status, (method, params, headers, r.status_code, r.text)
            assert r.headers["x-content-type-options"] == "nosniff"
            if method != "HEAD":
                assert r.headers["content-type"] == "text/plain" and 0 < len(r.text) < 300
        assert httpx.post(s, headers={**TEXT, "stream-closed": "true"}).status_code == 204
        closed = httpx.post(s, headers=TEXT, content=b"late")
        assert closed.status_code == 409 and closed.headers["stream-closed"] == "true"
        after = httpx.get(s)
        assert (after.status_code, after.text, after.headers["stream-closed"]) == (200, "ok", "true")


def test_a_client_that_sends_a_whole_oversized_body_before_reading_gets_the_413(url: str, tmp_path: Path) -> None:
    """A 10 MiB POST sent whole before the answer is read (as fetch sends it) gets its 413, not a
    connection closed under the upload; the stream keeps only what it had."""
    with serving(url, tmp_path / "a.log") as a:
        s = a.stream(_name())
        assert httpx.put(s, headers=TEXT, content=b"ok").status_code == 201
        body = bytes(10 << 20)
        path = s[len(a.base):]
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", a.port), timeout=30) as sock:
                sock.sendall(head)
                sock.sendall(body)  # a reset here: the server stopped reading and closed
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert httpx.get(s).text == "ok"


def test_an_idle_kept_alive_connection_outlasts_a_clients_own_keep_alive(url: str, tmp_path: Path) -> None:
    """A connection left idle longer than clients keep theirs (Node's fetch: 4 s) is still open for
    the next request: a client reusing it is never met by a close the server made at that moment
    (a POST is not retried: "other side closed")."""
    with serving(url, tmp_path / "a.log") as a:
        s = a.stream(_name())
        path = s[len(a.base):]
        with socket.create_connection(("127.0.0.1", a.port), timeout=30) as sock, sock.makefile("rb") as answers:

            def put(body: bytes) -> bytes:
                sock.sendall((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n"
                              f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
                status = answers.readline()
                length = 0
                while (line := answers.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode().partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                answers.read(length)
                return status

            assert httpx.put(s, headers=TEXT).status_code == 201
            assert put(b"a").startswith(b"HTTP/1.1 204")
            time.sleep(6)  # longer than uvicorn's default keep-alive (5 s): it closed the socket here
            assert put(b"b").startswith(b"HTTP/1.1 204")
        assert httpx.get(s).text == "ab"


def test_a_conversation_is_a_read_only_json_stream_tailed_with_sse(url: str, namespace: str, tmp_path: Path) -> None:
    chat = ChatHistory("conv-1", namespace=namespace, url=url)
    try:
        chat.append({"role": "user", "content": "hi"})
        with serving(url, tmp_path / "a.log", long_poll=5) as a:
            where = a.stream(f"chat/{namespace}/conv-1")
            first = httpx.get(where)
            assert first.json() == [{"role": "user", "content": "hi"}]
            assert first.headers["content-type"] == "application/json"
            events: list[dict[str, str]] = []

            def tail() -> None:
                with httpx.stream("GET", where, params={"offset": first.headers["stream-next-offset"], "live": "sse"},
                                  timeout=20) as sse:
                    for event in sse_events(sse.iter_lines()):
                        events.append(event)
                        if "assistant" in event.get("data", ""):
                            return

            reader = threading.Thread(target=tail)
            reader.start()
            time.sleep(0.5)  # the reader is at the tail, waiting
            chat.append({"role": "assistant", "content": "hello"})
            reader.join(20)
            data = [json.loads(e["data"]) for e in events if e.get("event") == "data"]
            assert data == [[{"role": "assistant", "content": "hello"}]]
            for method in ("POST", "PUT", "DELETE"):
                r = httpx.request(method, where, headers={"content-type": "application/json"}, content=b"[1]")
                assert r.status_code == 405
            assert len(chat) == 2  # nothing written through HTTP
    finally:
        chat.close()


def test_sigterm_ends_open_long_polls_and_sse_at_once(url: str, tmp_path: Path) -> None:
    with serving(url, tmp_path / "a.log", long_poll=60) as a:
        name = _name()
        httpx.put(a.stream(name), headers=TEXT)
        results: dict[str, Any] = {}

        def poll() -> None:
            results["poll"] = httpx.get(a.stream(name), params={"offset": "now", "live": "long-poll"}, timeout=90)

        def sse() -> None:
            with httpx.stream("GET", a.stream(name), params={"offset": "now", "live": "sse"}, timeout=90) as r:
                results["sse"] = "".join(r.iter_text())

        threads = [threading.Thread(target=poll), threading.Thread(target=sse)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        started = time.monotonic()
        os.kill(a.proc.pid, signal.SIGTERM)
        for t in threads:
            t.join(30)
        a.proc.wait(30)
        # a 60 s long-poll and an open SSE end well before their timeout (generous bound)
        assert time.monotonic() - started < 20
        assert results["poll"].status_code == 204
        assert "control" in results["sse"]
        assert a.proc.returncode == 0


@pytest.mark.slow
def test_pypi_client_survives_kill_9_of_the_serve_process_it_writes_through(url: str, tmp_path: Path) -> None:
    from durable_streams import DurableStream, SeqConflictError, stream

    with serving(url, tmp_path / "a.log") as a, serving(url, tmp_path / "b.log", long_poll=5) as b:
        name = _name()
        DurableStream.create(a.stream(name), content_type="application/json").close()
        n, kill_at = 300, 120
        acked: list[int] = []
        seen: list[Any] = []

        def read() -> None:
            with stream(b.stream(name), offset="-1", live="long-poll", timeout=30) as res:
                for item in res.iter_json():
                    seen.append(item["i"])
                    if len(seen) >= n:
                        return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        writers = {"a": DurableStream(a.stream(name), content_type="application/json", batching=False),
                   "b": DurableStream(b.stream(name), content_type="application/json", batching=False)}
        via = "a"
        killer = None
        for i in range(n):
            if i == kill_at:  # kill -9 A while the next writes are in flight to it
                killer = threading.Timer(0.002, a.kill)
                killer.start()
            while True:
                try:
                    writers[via].append({"i": i}, seq=f"{i:08d}")
                    break
                except SeqConflictError:
                    break  # the retry of a write A stored before dying: stored once, acknowledged
                except Exception:
                    assert via == "a", "a write through B failed"
                    via = "b"  # A is gone: the same write, with the same Stream-Seq, through B
            acked.append(i)
        assert via == "b" and a.proc.poll() is not None
        reader.join(30)
        for w in writers.values():
            w.close()
        assert acked == list(range(n))
        assert seen == acked  # every acknowledged write once, in order: no gap, no duplicate


_TS_KILL9 = r"""
const [clientPath, urlA, urlB, n, killAt, pidA] = process.argv.slice(2);
const { DurableStream, stream } = await import(clientPath);
await DurableStream.create({ url: urlA, contentType: "application/json" });
const seen = [];
const reading = (async () => {
  const res = await stream({ url: urlB, offset: "-1", live: "sse", json: true });
  for await (const item of res.jsonStream()) {
    seen.push(item.i);
    if (seen.length >= Number(n)) break;
  }
})();
const writers = {
  a: new DurableStream({ url: urlA, contentType: "application/json", batching: false }),
  b: new DurableStream({ url: urlB, contentType: "application/json", batching: false }),
};
let via = "a";
const acked = [];
for (let i = 0; i < Number(n); i++) {
  if (i === Number(killAt)) setTimeout(() => process.kill(Number(pidA), "SIGKILL"), 2);
  for (;;) {
    try {
      // the client retries a refused connection with backoff: give up on A after 3 s
      const signal = via === "a" ? AbortSignal.timeout(3000) : undefined;
      await writers[via].append(JSON.stringify({ i }), { seq: String(i).padStart(8, "0"), signal });
      break;
    } catch (e) {
      if (e && (e.code === "CONFLICT_SEQ" || e.status === 409)) break; // A stored it before dying: once
      if (via === "b") throw e;
      via = "b";
    }
  }
  acked.push(i);
}
await Promise.race([reading, new Promise((r) => setTimeout(r, 20000))]);
console.log(JSON.stringify({ acked, seen, via }));
process.exit(0);
"""


@pytest.mark.slow
def test_typescript_client_survives_kill_9_of_the_serve_process_it_writes_through(url: str, tmp_path: Path) -> None:
    import shutil
    import subprocess

    from tests.test_conformance import suite_folder

    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    client = suite_folder() / "node_modules" / "@durable-streams" / "client" / "dist" / "index.js"
    script = tmp_path / "kill9.mjs"
    script.write_text(_TS_KILL9)
    with serving(url, tmp_path / "a.log") as a, serving(url, tmp_path / "b.log", long_poll=5) as b:
        name = _name()
        n = 300
        proc = subprocess.run(
            ["node", str(script), client.as_uri(), a.stream(name), b.stream(name), str(n), "120", str(a.proc.pid)],
            capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert a.proc.wait(10) == -signal.SIGKILL and out["via"] == "b"
        assert out["acked"] == list(range(n))
        assert out["seen"] == out["acked"]  # read through B: every acknowledged write once, in order


def test_a_reader_that_stops_reading_never_holds_back_the_writer(url: str, tmp_path: Path) -> None:
    with serving(url, tmp_path / "a.log", long_poll=5) as a:
        s = a.stream(_name())
        httpx.put(s, headers=TEXT)
        chunk, n = "x" * 16384, 300  # ~4.9 MB: far more than the socket buffers of a stalled reader
        with httpx.Client(timeout=60) as reader, reader.stream("GET", s, params={"offset": "-1", "live": "sse"}) as sse:
            with httpx.Client(timeout=30) as writer:
                started = time.monotonic()
                for _ in range(n):
                    assert writer.post(s, headers=TEXT, content=chunk).status_code == 204
                assert time.monotonic() - started < 60  # "does not hang": the writes never waited on the reader
                writer.post(s, headers={**TEXT, "stream-closed": "true"})
            size = 0
            for event in sse_events(sse.iter_lines()):  # the stalled reader, reading at last, gets every byte
                if event.get("event") == "data":
                    size += len(event["data"])
                elif "streamClosed" in event.get("data", ""):
                    break
        assert size == n * len(chunk)


def test_serve_uses_the_embedded_server_by_default(botwire_home: Path, tmp_path: Path) -> None:
    from botwire_stream import TokenStream

    with serving(None, tmp_path / "a.log") as a:
        name = _name()
        assert httpx.put(a.stream(name), headers=TEXT, content=b"kept").status_code == 201
    with TokenStream(name) as s:  # the library, on the same embedded server, sees it
        assert s.read().data == b"kept"
