"""Fixtures: a real Kafka-compatible broker (Tansu), a real redis-server, a Slack-like server,
and eventpulse workers as real subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
import redis.asyncio as aioredis
import yaml
from aiokafka import AIOKafkaProducer

import eventpulse.local.servers as local_servers
from eventpulse.local.servers import (
    LocalRedis,
    LocalRedisCluster,
    ServerError,
    TansuBroker,
    wait_for_port,
)
from tests.fakeslack import FakeSlack

ROOT = Path(__file__).resolve().parent.parent

# -- free ports under parallel runs (pytest-xdist, scripts/test) --------------------------------
# free_port() binds port 0, closes, and hands the port to a server that binds it later: two test
# processes of one run could be handed the same port in between, and the loser's wait_for_port
# would then see the winner's server. Every port handed out in a run is reserved by an exclusive
# file in a directory that the controlling process creates and every xdist worker inherits, so no
# two processes of a run share a port; a server that still loses its port to another program is
# started again on a fresh one (_start_server).
PORTS_DIR_ENV = "EVENTPULSE_TEST_PORTS_DIR"
_pick_port = local_servers.free_port
_pick_cluster_port = local_servers.free_cluster_port


def _reserve(*ports: int) -> bool:
    folder = os.environ.get(PORTS_DIR_ENV)
    if not folder:
        return True
    taken: list[Path] = []
    for port in ports:
        path = Path(folder) / str(port)
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            for done in taken:
                done.unlink()
            return False
        taken.append(path)
    return True


def free_port() -> int:
    """A loopback port free now and handed to no other process of this test run."""
    for _ in range(200):
        port = _pick_port()
        if _reserve(port):
            return port
    raise ServerError("no unreserved free loopback port")


def free_cluster_port() -> int:
    """:func:`eventpulse.local.servers.free_cluster_port`, its bus port reserved too."""
    for _ in range(200):
        port = _pick_cluster_port()
        if _reserve(port, port + 10000):
            return port
    raise ServerError("no unreserved free loopback port pair for a cluster node")


local_servers.free_port = free_port
local_servers.free_cluster_port = free_cluster_port


def pytest_configure(config: pytest.Config) -> None:
    if PORTS_DIR_ENV not in os.environ:  # the controlling process: xdist workers inherit it
        os.environ[PORTS_DIR_ENV] = tempfile.mkdtemp(prefix="eventpulse-test-ports-")
        config.stash[_PORTS_OWNED] = os.environ[PORTS_DIR_ENV]


def pytest_unconfigure(config: pytest.Config) -> None:
    owned = config.stash.get(_PORTS_OWNED, None)
    if owned is not None:
        shutil.rmtree(owned, ignore_errors=True)
        os.environ.pop(PORTS_DIR_ENV, None)


_PORTS_OWNED = pytest.StashKey[str]()


#: modules of the longest tests, longest first (measured: README, Testing); only the order in
#: which parallel workers take the slow tests depends on it
LONGEST_FIRST = ("test_archive_crashes", "test_exactly_once", "test_alerting_worker",
                 "test_cluster", "test_blind_worker", "test_consistency")


def _run_order(item: pytest.Item) -> tuple[int, int]:
    if item.get_closest_marker("slow") is None:
        return (1, 0)
    module = item.path.stem
    return (0, LONGEST_FIRST.index(module) if module in LONGEST_FIRST else len(LONGEST_FIRST))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On parallel workers, the long (``slow``) tests first, the longest among them first, so
    that the short ones fill the gaps at the end instead of one long test running alone after
    everything else has finished (scripts/test hands out one test at a time,
    ``--maxschedchunk 1``). Every worker sorts the same way (xdist wants one order everywhere)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=_run_order)

Server = TypeVar("Server", TansuBroker, LocalRedis)


def _start_server(make: Callable[[], Server], attempts: int = 3) -> Server:
    """Start a session server; if it exits before listening (its port taken meanwhile by a
    program outside this run), once more on a fresh port."""
    for attempt in range(attempts):
        server = make()
        try:
            return server.start()
        except ServerError:
            server.__exit__(None, None, None)
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def kafka() -> Iterator[TansuBroker]:
    broker = _start_server(TansuBroker)
    try:
        yield broker
    finally:
        broker.__exit__(None, None, None)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[LocalRedis]:
    server = _start_server(LocalRedis)
    try:
        yield server
    finally:
        server.__exit__(None, None, None)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalRedisCluster]:
    """A real Redis Cluster: 3 primaries with one replica each (redis-server, redis-cli)."""
    with LocalRedisCluster(primaries=3, replicas=1) as cluster:
        yield cluster


@pytest.fixture
async def acluster(redis_cluster: LocalRedisCluster) -> AsyncIterator[aioredis.Redis]:
    """An asyncio Redis Cluster client on the session's cluster, every primary emptied."""
    from eventpulse.redisconn import connect_async

    client = connect_async(redis_cluster.url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
def redis_url(redis_server: LocalRedis) -> str:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
async def aredis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """The session's Redis, emptied: tests share the ``ep`` namespace (an outbox entry left by
    one test would be delivered in the next)."""
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def slack() -> Iterator[FakeSlack]:
    server = FakeSlack().start()
    yield server
    server.stop()


@pytest.fixture
def fake_slack(slack: FakeSlack) -> FakeSlack:
    slack.reset()
    return slack


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class WorkerProcess:
    """``python -m eventpulse worker`` as a child process, with its log kept for assertions."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.process = subprocess.Popen([sys.executable, "-m", "eventpulse", "worker"],
                                        env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        wait_for_port(int(self.env["EVENTPULSE_METRICS_PORT"]), timeout=60,
                      process=self.process)
        return self

    def kill(self) -> None:
        """SIGKILL: no chance to flush or commit anything."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> str:
        import urllib.request

        port = self.env["EVENTPULSE_METRICS_PORT"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return str(response.read().decode())

    def readyz(self) -> tuple[int, str]:
        """``/readyz``: (status, body); the body says why not ready, or what the worker sees."""
        import urllib.error
        import urllib.request

        port = self.env["EVENTPULSE_METRICS_PORT"]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()


@pytest.fixture
def make_worker(kafka: TansuBroker, redis_url: str, tmp_path: Path,
                ) -> Iterator[Callable[..., WorkerProcess]]:
    workers: list[WorkerProcess] = []

    def make(config: dict[str, Any], group: str, slack: FakeSlack | None = None,
             **env_overrides: str) -> WorkerProcess:
        config_path = tmp_path / f"{group}.yaml"
        config_path.write_text(yaml.safe_dump(config))
        env = {**os.environ,
               "EVENTPULSE_BROKER_URL": kafka.url, "EVENTPULSE_REDIS_URL": redis_url,
               "EVENTPULSE_CONFIG_PATH": str(config_path), "EVENTPULSE_CONSUMER_GROUP": group,
               "EVENTPULSE_METRICS_PORT": str(free_port()), "EVENTPULSE_SESSION_TIMEOUT_MS": "6000",
               "EVENTPULSE_LOG_LEVEL": "INFO"}
        if slack is not None:
            env["EVENTPULSE_SLACK_TOKEN"] = "xoxb-test-secret-token"
            env["EVENTPULSE_SLACK_BASE_URL"] = slack.base_url
        env.update(env_overrides)
        worker = WorkerProcess(env, tmp_path / f"{group}-{len(workers)}.log")
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        worker.stop()


async def produce(bootstrap: str, topic: str, records: list[Any],
                  key: Callable[[Any], bytes | None] = lambda r: None,
                  partition: Callable[[Any], int | None] = lambda r: None) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=10,
                                enable_idempotence=False)
    await producer.start()
    try:
        for record in records:
            value = record if isinstance(record, bytes) else json.dumps(record).encode()
            await producer.send(topic, value, key=key(record), partition=partition(record))
        await producer.flush()
    finally:
        await producer.stop()


async def wait_until(check: Callable[[], Any], timeout: float = 60.0, interval: float = 0.2,
                     message: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message} (last: {last!r})")


# -- security: certificates, TLS + ACL Redis, a TLS/SASL front for Tansu (docs/security.md) ----

REDIS_ADMIN_PASSWORD = "admin-Pa55-not-for-prod"


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.certs import make_certs

    return make_certs(tmp_path_factory.mktemp("certs"))


class TlsRedis(LocalRedis):
    """redis-server with TLS only (no plain port), client certificates optional, and a
    password on the default user (the admin that creates the ACL users)."""

    def __init__(self, certs: Any) -> None:
        super().__init__()
        self.certs = certs

    def command(self) -> list[str]:
        return [*super().command()[:1], "--port", "0", "--tls-port", str(self.port),
                "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", self.workdir,
                "--tls-cert-file", str(self.certs.server_cert),
                "--tls-key-file", str(self.certs.server_key),
                "--tls-ca-cert-file", str(self.certs.ca), "--tls-auth-clients", "optional",
                "--requirepass", REDIS_ADMIN_PASSWORD]

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def admin(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, password=REDIS_ADMIN_PASSWORD,
                                    ssl_ca_certs=str(self.certs.ca))


@pytest.fixture(scope="session")
def tls_redis(certs: Any) -> Iterator[TlsRedis]:
    with TlsRedis(certs) as server:
        yield server


@pytest.fixture
def kafka_front(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Factory: a fresh Tansu broker behind a :class:`tests.kafkafront.KafkaFront` (TLS and/or
    SASL as asked); the front's port is the broker's advertised listener."""
    from tests.kafkafront import KafkaFront

    started: list[tuple[Any, TansuBroker]] = []

    def make(**options: Any) -> Any:
        front_port = free_port()
        broker = TansuBroker(advertised_port=front_port).start()
        front = KafkaFront(upstream_port=broker.port, port=front_port, **options).start()
        started.append((front, broker))
        return front

    yield make
    for front, broker in started:
        front.stop()
        broker.stop()
