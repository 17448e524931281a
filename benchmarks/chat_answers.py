"""The streaming chat (issue 8): what persisting an answer costs, many readers of one answer, and
``botwire demo``'s time to page.

- ``chat-persist``: 2,000 tokens of the fake model at full speed, streamed to an HTTP client as
  SSE (one event per token) by the same Starlette endpoint on uvicorn, with and without the
  answer persisted: teeing each token into ``Producer`` (coalesced appends to a token stream),
  then closing the stream and appending the whole answer to the conversation before the last
  event. Time from request to the last event, in interleaved rounds. Target: under 5% more.
  Also shown (no target): the same answer through ``botwire serve``'s own chat endpoint (POST,
  then the answer's stream read over SSE until closed).
- ``chat-readers``: 100 concurrent SSE readers of one answer on a ``botwire serve`` process; every
  reader must get the whole answer (no lost token). Then reconnects from an earlier offset: time to
  the first replayed data event (target p50 under 20 ms).
- ``demo-time-to-page``: ``botwire demo --port 0`` with a fresh ``BOTWIRE_HOME`` (so the embedded
  server starts too), from the command to the page served. Target under 3 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import httpx

from botwire_stream import AsyncChatHistory
from botwire_stream.nats import embedded
from botwire_stream.server.model import FakeModel
from botwire_stream.tokens import open_token_streams

from ._registry import Context, benchmark
from ._report import RESULT, Ratio, Table, verdict

TOKENS = 2000
PERSIST_TARGET = 1.05
REPLAY_TARGET_MS = 20.0
PAGE_TARGET_S = 3.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def _serve(ctx: Context, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "botwire_stream", "serve", "--port", str(port), "--url", ctx.nats_url, "--long-poll-timeout", "5"],
        cwd=ctx.project_root, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    for _ in range(400):
        try:
            if httpx.get(base + "/", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("botwire serve did not start within 20 s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


async def _sse_until_closed(client: httpx.AsyncClient, url: str) -> str:
    """An answer's text read over SSE (Durable Streams events) until its control says closed."""
    text: list[str] = []
    async with client.stream("GET", url, params={"offset": "-1", "live": "sse"}) as r:
        kind, data = "", []
        async for line in r.aiter_lines():
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:])
            elif not line:
                if kind == "data":
                    text.append("\n".join(data))
                elif kind == "control" and '"streamClosed":true' in "".join(data):
                    return "".join(text)
                kind, data = "", []
    return "".join(text)


# -- chat-persist --------------------------------------------------------------------------------
async def _persist_bench(ctx: Context, rounds: int) -> dict[str, list[float]]:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    from botwire_stream.server.chatapi import Producer

    url = ctx.nats_url
    store, client = await open_token_streams(url=url)
    chat = await AsyncChatHistory("persist-bench", namespace="benchchat", url=url).open()
    model = FakeModel(pace=0, tokens=TOKENS)
    messages = [{"role": "user", "content": "benchmark"}]
    counter = iter(range(1_000_000))

    async def answer(request: Request) -> StreamingResponse:
        persist = request.query_params.get("persist") == "1"

        async def events() -> AsyncIterator[bytes]:
            producer = None
            if persist:  # the stream is created while the first tokens go out
                path = f"bench/answer/{next(counter)}-{time.time_ns()}"
                created = asyncio.ensure_future(store.create(path, content_type="text/plain", ttl=600))
                producer = Producer(store, path, path, ready=created)
            async for token in model.stream(messages):
                if producer is not None:
                    producer.add(token)
                yield b"data: " + token.encode() + b"\n\n"
            yield b"event: done\ndata: {}\n\n"
            if producer is not None:  # after the last event: the client has every token already
                await producer.finish()
                await chat.append({"role": "assistant", "content": "".join(producer.text), "meta": {"stream": producer.path}})

        return StreamingResponse(events(), media_type="text/event-stream")

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(Starlette(routes=[Route("/answer", answer)]), port=port, log_level="warning", lifespan="off"))
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    times: dict[str, list[float]] = {"plain": [], "persisted": [], "stored": []}
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            order = ["plain", "persisted"]
            for i in range(rounds + 2):  # two warm-up rounds, not counted
                for kind in order if i % 2 == 0 else order[::-1]:
                    t0 = time.perf_counter()
                    n = 0
                    elapsed = 0.0
                    async with http.stream("GET", "/answer", params={"persist": "1" if kind == "persisted" else "0"}) as r:
                        async for line in r.aiter_lines():
                            if line == "event: done":
                                elapsed = (time.perf_counter() - t0) * 1000
                            elif not elapsed:
                                n += line.startswith("data: ")
                    if kind == "persisted" and i >= 2:  # the response ends once it is stored
                        times["stored"].append((time.perf_counter() - t0) * 1000)
                    if n != TOKENS + 1:  # the echo, then TOKENS words
                        raise RuntimeError(f"{kind}: {n} tokens, not {TOKENS}")
                    if i >= 2:
                        times[kind].append(elapsed)
    finally:
        server.should_exit = True
        await task
        await chat.close()
        await client.close()
    return times


@benchmark("chat-persist", "2,000 fake tokens at full speed over SSE: persisted (coalesced) vs not")
def chat_persist(ctx: Context) -> list[Table]:
    rounds = ctx.pick(10, 40)
    times = ctx.run(_persist_bench(ctx, rounds))
    plain, persisted = statistics.median(times["plain"]), statistics.median(times["persisted"])
    table = Table(
        f"chat-persist: {TOKENS} tokens at full speed to an SSE client (one event each), ms from request to last event",
        ["contender", "p50 ms", "p99 ms", "vs not persisted", "target", RESULT],
    )
    table.add("not persisted (the tokens straight to the client)", plain, _pct(times["plain"], 0.99), Ratio(1.0), "-", "")
    ratio = Ratio(persisted / plain)
    table.add(
        "persisted: every token teed into Producer (coalesced appends)",
        persisted, _pct(times["persisted"], 0.99), ratio, f"<= {PERSIST_TARGET:.2f}x", verdict(ratio, PERSIST_TARGET),
    )
    done = statistics.median(times["stored"])
    table.add("  ... stream closed and answer in the conversation, from the request", done, _pct(times["stored"], 0.99), Ratio(done / plain), "-", "")
    proc, base = _serve(ctx, {"BOTWIRE_FAKE_PACE": "0", "BOTWIRE_FAKE_TOKENS": str(TOKENS)})
    try:
        serve_times = ctx.run(_serve_answers(base, ctx.pick(5, 20)))
    finally:
        _stop(proc)
    table.add("botwire serve: POST the message, read the answer's stream over SSE to its close", statistics.median(serve_times), _pct(serve_times, 0.99), Ratio(statistics.median(serve_times) / plain), "-", "")
    table.notes.append(f"{rounds} interleaved rounds after 2 warm-up rounds; client and server on one event loop (the same for both).")
    table.notes.append("the last event is sent before the stream's closing append and the conversation append (the second row: when those are done).")
    return [table]


async def _serve_answers(base: str, n: int) -> list[float]:
    out: list[float] = []
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        session = (await http.post("/v1/chat/benchchat", json={"user": "bench"})).json()["session"]
        for i in range(n + 1):
            t0 = time.perf_counter()
            answer = (await http.post(f"/v1/chat/benchchat/{session}/messages", json={"content": "benchmark"})).json()
            text = await _sse_until_closed(http, answer["answer"])
            if i:
                out.append((time.perf_counter() - t0) * 1000)
            if text.count(" ") < TOKENS:
                raise RuntimeError(f"botwire serve answer: {text.count(' ')} tokens")
    return out


# -- chat-readers --------------------------------------------------------------------------------
async def _readers(base: str, readers: int, reconnects: int) -> tuple[int, int, list[float]]:
    limits = httpx.Limits(max_connections=readers + 10, max_keepalive_connections=readers + 10)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as http:
        session = (await http.post("/v1/chat/benchchat", json={"user": "bench"})).json()["session"]
        answer = (await http.post(f"/v1/chat/benchchat/{session}/messages", json={"content": "many readers"})).json()
        texts = await asyncio.gather(*[_sse_until_closed(http, answer["answer"]) for _ in range(readers)])
        want = "".join(FakeModel(pace=0, tokens=400).answer([{"role": "user", "content": "many readers"}]))
        whole = sum(t == want for t in texts)
        # reconnects: from the offset of an earlier chunk, time to the first replayed data event
        first = await http.get(answer["answer"], params={"offset": "-1", "live": "sse"})
        offsets = [line[len('data:{"streamNextOffset":"'):][:33] for line in first.text.splitlines() if line.startswith('data:{"streamNextOffset"')]
        waits: list[float] = []
        for i in range(reconnects):
            offset = offsets[(i * 7) % max(1, len(offsets) - 1)]
            t0 = time.perf_counter()
            async with http.stream("GET", answer["answer"], params={"offset": offset, "live": "sse"}) as r:
                async for line in r.aiter_lines():
                    if line == "event: data":
                        waits.append((time.perf_counter() - t0) * 1000)
                        break
        return whole, readers, waits


@benchmark("chat-readers", "100 concurrent SSE readers of one answer; first replayed token after a reconnect")
def chat_readers(ctx: Context) -> list[Table]:
    readers = 100
    proc, base = _serve(ctx, {"BOTWIRE_FAKE_PACE": "0.005", "BOTWIRE_FAKE_TOKENS": "400"})  # about 2 s of answer
    try:
        whole, n, waits = ctx.run(_readers(base, readers, ctx.pick(50, 200)))
    finally:
        _stop(proc)
    table = Table("chat-readers: one answer (400 tokens, 5 ms apart) on one botwire serve process", ["figure", "value", "target", RESULT])
    table.add("readers that got the whole answer, exactly", f"{whole}/{n}", f"{n}/{n}", "PASS" if whole == n else "MISS")
    p50 = statistics.median(waits)
    table.add("reconnect from an earlier offset: first data event, p50 ms", p50, f"< {REPLAY_TARGET_MS:.0f} ms", "PASS" if p50 < REPLAY_TARGET_MS else "MISS")
    table.add("  p99 ms", _pct(waits, 0.99), "-", "")
    table.notes.append("the readers connect while the answer streams (SSE, live); reconnects are sequential, after it closed.")
    return [table]


# -- demo-time-to-page ---------------------------------------------------------------------------
@benchmark("demo-time-to-page", "botwire demo on a fresh BOTWIRE_HOME: command to page served")
def demo_time_to_page(ctx: Context) -> list[Table]:
    runs = ctx.pick(2, 5)
    times: list[float] = []
    for i in range(runs + 1):  # run 0 warms the OS file and bytecode caches: not counted
        home = ctx.tmp / f"demo-home-{i}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("BOTWIRE_")}
        env["BOTWIRE_HOME"] = str(home)
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "botwire_stream", "demo", "--port", "0"],
            cwd=ctx.project_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        try:
            assert proc.stdout is not None
            if not select.select([proc.stdout], [], [], 30)[0]:
                raise RuntimeError("botwire demo printed nothing within 30 s")
            base = proc.stdout.readline().decode().split("open ", 1)[1].split(" ", 1)[0]
            if httpx.get(base, timeout=10).status_code != 200:
                raise RuntimeError("the demo page was not served")
            if i:
                times.append(time.perf_counter() - t0)
        finally:
            _stop(proc)  # type: ignore[arg-type]
            with contextlib.suppress(Exception):
                embedded.stop(home)
    table = Table("demo-time-to-page: `botwire demo` with no embedded server running yet", ["figure", "median s", "max s", "runs", "target", RESULT])
    med = statistics.median(times)
    table.add("command started -> page served (embedded server start included)", med, max(times), len(times), f"< {PAGE_TARGET_S:.0f} s", "PASS" if med < PAGE_TARGET_S else "MISS")
    table.notes.append("includes the interpreter start-up and imports; each run has a fresh BOTWIRE_HOME, its server stopped after.")
    return [table]


