"""docker-compose.yml (no Docker engine here): its topology, parsed; and the same topology run as
local processes: the three nats-server command lines it declares (hosts and ports mapped to
loopback), and two ``botwire serve`` with its command line, sharing the cluster."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from botwire_stream import Memory
from botwire_stream.errors import Unauthorized
from botwire_stream.nats.embedded import find_binary
from tests.cluster import _free_ports, stream_info
from tests.http_serve import Serve, start_serve
from tests.procs import ROOT

NODES = ("nats1", "nats2", "nats3")


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def _flags(command: list[str]) -> dict[str, str]:
    return dict(c.removeprefix("--").split("=", 1) if "=" in c else (c.removeprefix("--"), "") for c in command)


def test_compose_declares_a_three_node_cluster_two_serves_and_the_consumers() -> None:
    compose = _compose()
    services = compose["services"]
    names = set()
    for node in NODES:
        svc = services[node]
        major, minor = map(int, re.search(r"nats:(\d+)\.(\d+)", svc["image"]).groups())  # type: ignore[union-attr]
        assert (major, minor) >= (2, 14), "consumers/ resets its durable consumers (nats-server 2.14+)"
        flags = _flags(svc["command"])
        names.add(flags["name"])
        assert "jetstream" in flags and flags["store_dir"] == "/data"
        assert flags["auth"].startswith("${BOTWIRE_TOKEN")
        assert flags["cluster_name"] == "botwire"
        assert flags["routes"].split(",") == [f"nats://{n}:6222" for n in NODES]  # every node routes to all
        assert flags["cluster"].endswith(":6222")
        (volume,) = svc["volumes"]
        assert volume == f"{node}-data:/data" and f"{node}-data" in compose["volumes"]  # its own store
        assert svc["healthcheck"]["test"][-1] == "http://127.0.0.1:8222/healthz"  # current with the meta leader
        assert all(p.startswith("127.0.0.1:") for p in svc["ports"]), "published ports stay on loopback"
        assert svc["stop_signal"] == "SIGUSR2"  # lame duck: leaderships handed over before it stops
    assert names == set(NODES)
    client_url = "nats://nats1:4222,nats://nats2:4222,nats://nats3:4222"
    for name in ("serve1", "serve2", "history", "audit"):
        svc = services[name]
        assert svc["environment"]["BOTWIRE_URL"] == client_url  # every node: clients fail over
        assert svc["environment"]["BOTWIRE_TOKEN"].startswith("${BOTWIRE_TOKEN")
        assert {n: d["condition"] for n, d in svc["depends_on"].items()} == dict.fromkeys(NODES, "service_healthy")
    for name in ("serve1", "serve2"):
        svc = services[name]
        assert "exec botwire serve --host 0.0.0.0 --port 8080 --auth" in svc["command"][-1]
        assert "/readyz" in " ".join(svc["healthcheck"]["test"])
        assert all(p.startswith("127.0.0.1:") for p in svc["ports"])
    assert "botwire consume materialise -n" in services["history"]["command"][-1]
    assert "botwire consume audit -n" in services["audit"]["command"][-1]
    assert "/audit" in services["audit"]["command"][-1] and "audit-data:/audit" in services["audit"]["volumes"]


class _Topology:
    """The compose file's nats services as local processes: each declared command line, with the
    service host names and container ports mapped to free loopback ports."""

    def __init__(self, workdir: Path, token: str) -> None:
        services = _compose()["services"]
        free = iter(_free_ports(3 * len(NODES)))  # distinct: routes, clients, monitoring
        routes = {node: next(free) for node in NODES}
        self.clients = {node: next(free) for node in NODES}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.commands = []
        self.health: list[str] = []
        for node in NODES:
            command = []
            for flag in services[node]["command"]:
                flag = flag.replace("${BOTWIRE_TOKEN:-change-me}", token)
                flag = flag.replace("/data", str(workdir / node))
                flag = flag.replace("0.0.0.0:6222", f"127.0.0.1:{routes[node]}")
                for other in NODES:
                    flag = flag.replace(f"{other}:6222", f"127.0.0.1:{routes[other]}")
                if flag.startswith("--http_port="):
                    self.health.append(f"http://127.0.0.1:{(http := next(free))}/healthz")
                    flag = f"--http_port={http}"
                command.append(flag)
            self.commands.append([find_binary(), *command, "-a", "127.0.0.1", "-p", str(self.clients[node])])
        self.log = workdir / "nats.log"

    @property
    def url(self) -> str:
        return ",".join(f"nats://127.0.0.1:{p}" for p in self.clients.values())

    def start(self) -> None:
        with self.log.open("ab") as out:
            for command in self.commands:
                self.procs.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT))

    def wait_healthy(self, bound: float = 30.0) -> None:
        """Until every node's health check passes: what the serve services wait for (depends_on)."""
        deadline = time.monotonic() + bound
        for url in self.health:
            while True:
                try:
                    with urllib.request.urlopen(url, timeout=2) as resp:
                        if resp.status == 200:
                            break
                except OSError:
                    pass
                assert time.monotonic() < deadline, f"{url} not healthy within {bound} s"
                time.sleep(0.05)

    def stop(self) -> None:
        for proc in self.procs:  # our own processes, by PID
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)


@pytest.fixture
def topology(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Topology]:
    monkeypatch.setenv("BOTWIRE_TOKEN", "s3cret")  # as the compose file's environment: the serves inherit it
    t = _Topology(tmp_path, "s3cret")
    t.start()
    try:
        t.wait_healthy()
        yield t
    finally:
        t.stop()


def _botwire(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "botwire_stream", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def _leader(url: str) -> str | None:
    try:
        info = await stream_info(url, "BOTWIRE_TOKENS", "s3cret", timeout=1)
    except Exception:  # noqa: BLE001 - no answer during the election
        return None
    leader = info.get("cluster", {}).get("leader")
    return str(leader) if leader else None


@pytest.mark.slow
async def test_the_compose_topology_runs_as_local_processes(topology: _Topology, tmp_path: Path, namespace: str) -> None:
    """Two serve processes with the compose file's options (``--auth``; loopback here) over the
    three nodes: a stream written through one is read through the other, replicated 3 times, and
    still read after the node holding its leader is killed."""
    serves: list[Serve] = []
    try:
        for i in (1, 2):
            serves.append(start_serve(topology.url, tmp_path / f"serve{i}.log", extra=["--auth"], bound=30))
        for serve in serves:
            assert httpx.get(f"{serve.base}/readyz", timeout=10).status_code == 200
        with pytest.raises(Unauthorized):  # the nodes take the compose file's token only
            Memory(namespace, url=topology.url, token="wrong").get("k")
        key = json.loads(_botwire("keys", "create", "--url", topology.url, "--namespace", namespace, "--scope", "write", "--json"))
        auth = {"authorization": f"Bearer {key['key']}"}
        one, two = (s.stream(f"{namespace}/s") for s in serves)
        assert httpx.put(one, content=b"hello", headers={"content-type": "text/plain", **auth}, timeout=10).status_code == 201
        assert httpx.get(two, headers=auth, timeout=10).content == b"hello"
        info = await stream_info(topology.url, "BOTWIRE_TOKENS", "s3cret")
        assert info["config"]["num_replicas"] == 3
        assert (await stream_info(topology.url, "KV_botwire_apikeys", "s3cret"))["config"]["num_replicas"] == 3
        leader = info["cluster"]["leader"]
        victim = topology.procs[NODES.index(leader)]
        victim.kill()  # SIGKILL of our own process
        victim.wait(5)
        # Right away, during the election: the serve processes fail over to the surviving nodes
        # and wait for the new leader within a request (NATS_TIMEOUT), never answering 503 (they
        # did with the library's 5 s timeout: the election takes 4-9 s), the API key check included.
        got = httpx.get(two, headers=auth, timeout=60)
        assert got.status_code == 200, got.text
        assert got.content == b"hello"
        producer = {"producer-id": "p", "producer-epoch": "0", "producer-seq": "0"}
        headers = {"content-type": "text/plain", **auth, **producer}
        got = httpx.post(one, content=b" world", headers=headers, timeout=60)
        assert got.status_code in (200, 204), got.text
        assert await _leader(topology.url) not in (None, leader)  # it did wait for a new leader
        assert httpx.get(two, headers=auth, timeout=60).content == b"hello world"
    finally:
        for serve in serves:
            serve.kill()
