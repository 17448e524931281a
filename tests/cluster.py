"""A local 3-node NATS JetStream cluster for the tests: nats-server processes with cluster routes
on loopback, each with its own store folder, killed and restarted by PID.

No fixed ports: each node's client and route ports are free ports picked below the kernel's
ephemeral range (``_free_ports``), so that nothing else is given them while a node is down; every
node routes to the others. A restarted node keeps
its ports and store, so clients given the node list find it again and it catches up from the
others. ``Cluster.start`` returns once every node's ``/healthz`` says its JetStream is current with the
cluster (a meta leader is elected: streams can be created).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from botwire_stream._natsproc import StartFailed, render_config, start
from botwire_stream.nats.embedded import find_binary
from tests.waits import sigstop

__all__ = ["Cluster", "Node", "cluster"]


class Node:
    """One nats-server of the cluster."""

    def __init__(self, workdir: Path, name: str, cluster_name: str) -> None:
        self.workdir = workdir
        self.name = name
        self.cluster_name = cluster_name
        self.store = workdir / "store"
        self.ports_dir = workdir / "ports"
        self.log = workdir / "server.log"
        self.port = -1
        self.route_port = 0
        self.monitoring = ""
        self.routes: list[int] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra = ""

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> Node:
        self.store.mkdir(parents=True, exist_ok=True)
        self.ports_dir.mkdir(parents=True, exist_ok=True)
        for old in self.ports_dir.iterdir():  # a killed server leaves its ports file behind
            old.unlink()
        routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.routes)
        cluster = (
            f"cluster {{ name: {self.cluster_name}, listen: 127.0.0.1:{self.route_port}"
            + (f", routes: [{routes}]" if routes else "")
            + " }"
        )
        conf = self.workdir / "nats.conf"
        conf.write_text(
            render_config(
                port=self.port,
                ports_dir=self.ports_dir,
                store_dir=self.store,
                extra=[f"server_name: {self.name}", "http: 127.0.0.1:-1", cluster, self.extra],
            )
        )
        self.proc, self.port = start(find_binary(), conf, self.ports_dir, log=self.log)
        ports = json.loads(next(self.ports_dir.glob("*.ports")).read_text())
        self.monitoring = str(ports["monitoring"][0])
        return self

    def healthy(self) -> bool:
        """Whether the node's JetStream is up and current with the cluster (its ``/healthz``)."""
        try:
            with urllib.request.urlopen(f"{self.monitoring}/healthz", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:  # 503 (HTTPError is an OSError) or not listening yet
            return False

    def stream_messages(self, stream: str) -> int | None:
        """How many messages this node's own copy of ``stream`` holds (its monitoring ``/jsz``),
        or None when it has none: what shows that a restarted node caught up."""
        url = f"{self.monitoring}/jsz?accounts=true&streams=true"
        with urllib.request.urlopen(url, timeout=5) as resp:  # loopback, our own node
            jsz = json.load(resp)
        for account in jsz.get("account_details") or []:
            for detail in account.get("stream_detail") or []:
                if detail.get("name") == stream:
                    return int(detail["state"]["messages"])
        return None

    def send(self, sig: int) -> None:
        """Send ``sig`` to this node's own process (SIGKILL, SIGSTOP, SIGCONT), by PID."""
        assert self.proc is not None and self.proc.poll() is None
        if sig == signal.SIGSTOP:
            sigstop(self.proc.pid)
        else:
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL, as a crash: the store stays as it was."""
        self.stop(signal.SIGKILL)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            os.kill(self.proc.pid, signal.SIGCONT)  # a SIGSTOP'd node must run to handle it
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (what it hands out for port 0 / ``-1`` and
    for outgoing connections)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports free now, below the kernel's ephemeral range: a node restarted
    on its ports finds them free. A port the kernel had handed out was at times taken, while its
    node was down, by another test's server or an outgoing connection ("address already in use"
    at the restart of tests/test_cluster.py's leader, in a full run)."""
    top = _ephemeral_low() - 1
    ports: list[int] = []
    while len(ports) < n:
        port = random.randint(max(1024, top - 20_000), top)
        if port in ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
    return ports


class Cluster:
    """Three (``size``) nodes named n1..nN routed on loopback; ``url`` lists all their clients."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.name = "c" + uuid.uuid4().hex[:8]
        self.nodes = [Node(workdir / f"n{i}", f"n{i}-{self.name}", self.name) for i in range(1, size + 1)]

    @property
    def url(self) -> str:
        return ",".join(n.url for n in self.nodes)

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self, timeout: float = 20.0) -> Cluster:
        # A JetStream cluster refuses to start without configured routes, so the route ports are
        # chosen first: free ports the kernel hands out, released just before the servers bind
        # them (a start that lost one to another process is tried again with new ports).
        for attempt in range(3):
            ports = _free_ports(2 * len(self.nodes))
            routes, clients = ports[: len(self.nodes)], ports[len(self.nodes) :]
            for node, port, client in zip(self.nodes, routes, clients, strict=True):
                node.route_port, node.port = port, client
                node.routes = [p for p in routes if p != port]
            try:
                for node in self.nodes:
                    node.start()
                break
            except StartFailed:
                self.stop()
                if attempt == 2:
                    raise
        self.wait_healthy(timeout)  # a meta leader elected, every node current with it
        return self

    def node(self, name: str) -> Node:
        """The node whose server name is ``name`` (as in stream info's ``cluster.leader``)."""
        return next(n for n in self.nodes if n.name == name)

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until every running node is current with the cluster (a restarted one has rejoined)."""
        deadline = time.monotonic() + timeout
        while not all(n.healthy() for n in self.nodes if n.running):
            if time.monotonic() > deadline:
                raise AssertionError(f"the cluster's nodes were not all healthy within {timeout} s")
            time.sleep(0.05)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


async def stream_info(
    url: str, stream: str, token: str | None = None, timeout: float = 5.0, *, subjects: bool = False
) -> dict[str, Any]:
    """The raw ``$JS.API.STREAM.INFO`` of ``stream`` (config, state, cluster leader and replicas);
    ``subjects``: with each subject's message count (``state.subjects``)."""
    import nats

    nc = await nats.connect(url.split(","), connect_timeout=2, token=token, max_reconnect_attempts=2)
    try:
        body = json.dumps({"subjects_filter": ">"}).encode() if subjects else b""
        msg = await nc.request(f"$JS.API.STREAM.INFO.{stream}", body, timeout=timeout)
        info: dict[str, Any] = json.loads(msg.data)
        return info
    finally:
        await nc.close()


def one_bare_node(workdir: Path) -> Iterator[Cluster]:
    """A started 4-node cluster whose first 3 nodes are tagged ``r``: streams placed with
    ``?tag=r`` leave the 4th without a replica (a client there reads from any of the 3); stopped
    afterwards. For a module-scoped fixture: ``yield from one_bare_node(tmp_path_factory.mktemp(...))``."""
    c = Cluster(workdir, size=4)
    for node in c.nodes[:3]:
        node.extra = 'server_tags: ["r"]'
    try:
        yield c.start()
    finally:
        c.stop()  # also after a start that failed half-way


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A private 3-node JetStream cluster; its processes (only them) are killed afterwards."""
    c = Cluster(tmp_path / "cluster").start()
    try:
        yield c
    finally:
        c.stop()

