"""A load generator, run as its own process: ``CONNS`` keep-alive HTTP/1.1 connections, each
sending one request after the other for ``SECONDS``; prints ``{"n", "p50_us", "p99_us", "rps"}``.
Raw asyncio streams: httpx as a generator measured slower than the servers under test."""

from __future__ import annotations

import asyncio
import json
import sys
import time


async def _conn(host: str, port: int, request: bytes, until: float, lat: list[int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.monotonic() < until:
            t0 = time.perf_counter_ns()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = head[9:12]
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            lat.append(time.perf_counter_ns() - t0)
            if status not in (b"200", b"201"):
                raise SystemExit(f"status {status!r}: {head!r}")
    finally:
        writer.close()


async def main(host: str, port: int, method: str, path: str, body: str, conns: int, seconds: float) -> None:
    data = body.encode()
    request = (
        f"{method} {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n"
    ).encode() + data
    lat: list[int] = []
    start = time.monotonic()
    await asyncio.gather(*(_conn(host, port, request, start + seconds, lat) for _ in range(conns)))
    elapsed = time.monotonic() - start
    lat.sort()
    print(json.dumps({
        "n": len(lat), "rps": len(lat) / elapsed,
        "p50_us": lat[len(lat) // 2] / 1000, "p99_us": lat[int(len(lat) * 0.99)] / 1000,
    }))


if __name__ == "__main__":
    h, p, m, path, b, c, s = sys.argv[1:8]
    asyncio.run(main(h, int(p), m, path, b, int(c), float(s)))
