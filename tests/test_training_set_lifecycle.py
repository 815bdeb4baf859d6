"""``eventpulse training-set`` as a process (found by an outside test, 2026-12-02): stopped by
SIGTERM or killed outright mid-build, it leaves no private redis-server and no share process
behind; with ``--redis-url`` it leaves none of its keys in the user's Redis, and a Redis that
dies mid-build is named in one sentence, as the option."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis
import yaml

from eventpulse.local.servers import LocalRedis
from tests.test_training_equivalence import ITEMS, USERS, write_archive

pytestmark = pytest.mark.slow

FEATURES = [
    {"name": "clicks", "topic": "events", "entity": "user", "key": "user_id",
     "aggregation": "count", "where": {"action": "click"},
     "window": {"type": "hopping", "size": "1m", "step": "5s"}},
    {"name": "watch_p95", "topic": "events", "entity": "item", "key": "item_id",
     "aggregation": "p95", "value": "watch",
     "window": {"type": "hopping", "size": "10m", "step": "1m"}},
    {"name": "viewers", "topic": "events", "entity": "item", "key": "item_id",
     "aggregation": "distinct", "value": "user_id",
     "window": {"type": "hopping", "size": "10m", "step": "1m"}},
]


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """An archive, a job and a label file big enough for a build of several seconds."""
    root = tmp_path_factory.mktemp("lifecycle")
    rng = random.Random(9)
    start, end = write_archive(root / "archive", rng, 30_000)
    config = root / "job.yaml"
    config.write_text(yaml.safe_dump({"topics": {"events": "behaviour"}, "features": FEATURES}))
    n = 150_000
    entities = [rng.choice(["user", "item"]) for _ in range(n)]
    pq.write_table(pa.table({
        "entity": entities,
        "entity_id": [rng.choice(USERS if e == "user" else ITEMS) for e in entities],
        "timestamp": [rng.randint(start, end) for _ in range(n)]}), root / "labels.parquet")
    return root / "archive", config, root / "labels.parquet"


def start(case: tuple[Path, Path, Path], out: Path, *more: str) -> subprocess.Popen[str]:
    archive, config, labels = case
    return subprocess.Popen(
        [sys.executable, "-m", "eventpulse", "training-set", "--archive", str(archive),
         "--labels", str(labels), "--out", str(out), "--config", str(config), *more],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc: each process' parent)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] != "Z":
                    out.add(pid)
        except OSError:
            continue
    return out


def building(process: subprocess.Popen[str], count: int) -> set[int]:
    """The command's processes once ``count`` of them run (a private redis-server, shares)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = descendants(process.pid)
        if len(found) >= count:
            time.sleep(1.0)  # well into the build
            assert process.poll() is None, process.communicate()
            return descendants(process.pid)
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError("the build never started its processes")


def gone(pids: set[int], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pids)


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_sigterm_stops_the_build_and_everything_it_started(
        case: tuple[Path, Path, Path], tmp_path: Path, jobs: str) -> None:
    process = start(case, tmp_path / "out.parquet", "--jobs", jobs)
    started = building(process, 1 + (int(jobs) if jobs != "1" else 0))
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143 and "terminated" in err, err
    assert gone(started), "left running: " + ", ".join(map(str, alive(started)))
    assert not (tmp_path / "out.parquet").exists()


def test_a_command_killed_outright_leaves_no_process(
        case: tuple[Path, Path, Path], tmp_path: Path) -> None:
    process = start(case, tmp_path / "out.parquet", "--jobs", "2")
    started = building(process, 3)  # its private redis-server and two shares
    process.kill()
    process.communicate(timeout=30)
    assert gone(started), "left running: " + ", ".join(map(str, alive(started)))


def test_a_users_redis_keeps_nothing_and_its_death_is_named(
        case: tuple[Path, Path, Path], tmp_path: Path) -> None:
    with LocalRedis() as server:
        client = redis.Redis.from_url(server.url)
        client.set("mine", "kept")
        process = start(case, tmp_path / "out.parquet", "--jobs", "2", "--redis-url", server.url)
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        assert client.keys("*") == [b"mine"]  # the build's namespaces removed
        process = start(case, tmp_path / "again.parquet", "--jobs", "2", "--redis-url",
                        server.url)
        building(process, 2)
        server.kill()
        _, err = process.communicate(timeout=120)
        client.close()
    assert process.returncode == 1, err
    assert f"Error: Redis at 127.0.0.1:{server.port}/0 (--redis-url) failed during" in err, err
    assert "report it" not in err and "EVENTPULSE_REDIS_URL" not in err, err



@pytest.mark.parametrize("how", ["sigterm", "sigint", "share killed"])
def test_a_users_redis_keeps_nothing_of_a_build_that_did_not_finish(
        case: tuple[Path, Path, Path], tmp_path: Path, how: str) -> None:
    """The shares remove their keys when they finish; a build stopped or left by a share
    removes them in the command (found by an outside test: 145k-212k keys were left)."""
    with LocalRedis() as server:
        client = redis.Redis.from_url(server.url)
        client.set("mine", "kept")
        process = start(case, tmp_path / "out.parquet", "--jobs", "2", "--redis-url", server.url)
        shares = building(process, 2)
        deadline = time.monotonic() + 30
        while client.dbsize() < 1_000 and time.monotonic() < deadline:
            time.sleep(0.05)  # the shares are writing
        assert client.dbsize() >= 1_000
        if how == "share killed":
            os.kill(min(shares), signal.SIGKILL)
        else:
            process.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGINT)
        _, err = process.communicate(timeout=60)
        assert process.returncode == {"sigterm": 143, "sigint": 130, "share killed": 1}[how], err
        assert gone(shares)
        assert client.keys("*") == [b"mine"], client.dbsize()
        client.close()
