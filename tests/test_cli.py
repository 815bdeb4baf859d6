"""The command line as a newcomer meets it: each command, run as a real process in the ways it
fails, says so in one line on stderr (no traceback) and exits non-zero; the worker waits for an
unreachable broker and names it."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import redis
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from eventpulse.config import load_config
from eventpulse.local.servers import LocalRedis, TansuBroker, free_port
from eventpulse.streams.deadletter import DeadLetter
from eventpulse.tables.client import registry_key
from tests.conftest import ROOT, produce, unique, wait_until

EXAMPLE = ROOT / "eventpulse" / "examples" / "eventpulse.yaml"
PASSWORD = "hunter2-secret"


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "eventpulse", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})}, cwd=cwd)


def parse_time(text: str) -> float:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", text), text
    return datetime.fromisoformat(text).timestamp()


def one_line_failure(done: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """The command failed with ``code`` and said why in exactly one line, traceback-free."""
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert done.returncode == code, (done.returncode, done.stderr)
    assert lines[0].startswith("Error: ") and PASSWORD not in lines[0]
    return lines[0]



def interruptible() -> None:
    """In a child about to get Ctrl-C: SIGINT as a terminal delivers it, also when the suite was
    started with SIGINT ignored (a background job of a shell without job control), which the
    child would otherwise inherit and keep."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)

@pytest.fixture
def nowhere() -> dict[str, str]:
    """Settings pointing at a Redis and a broker that nothing listens on (free ports)."""
    return {"EVENTPULSE_REDIS_URL": f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0",
            "EVENTPULSE_BROKER_URL": f"kafka://127.0.0.1:{free_port()}"}


@pytest.mark.parametrize("args", [("features", "get", "user", "u1"), ("silence", "list"),
                                  ("silence", "add", "--matcher", "host=a"),
                                  ("silence", "expire", "abc")])
def test_redis_unreachable(args: tuple[str, ...], nowhere: dict[str, str]) -> None:
    port = nowhere["EVENTPULSE_REDIS_URL"].rsplit(":", 1)[1].split("/")[0]
    line = one_line_failure(run(*args, env=nowhere))
    assert line == (f"Error: cannot reach Redis at 127.0.0.1:{port}/0 (connection refused); "
                    "start it or set EVENTPULSE_REDIS_URL")


@pytest.mark.parametrize("args", [("dead-letters", "tail"), ("dead-letters", "tail", "--follow")])
def test_broker_unreachable(args: tuple[str, ...], nowhere: dict[str, str]) -> None:
    address = nowhere["EVENTPULSE_BROKER_URL"].removeprefix("kafka://")
    line = one_line_failure(run(*args, env=nowhere))
    assert line == (f"Error: cannot reach the Kafka broker at {address}; start it or set "
                    "EVENTPULSE_BROKER_URL")


@pytest.mark.parametrize(("args", "expected"), [
    (("replay", "--input", "{input}", "--until", "10x"),
     "Error: --until: expected a duration such as 30s, 5m or 1h, got '10x'"),
    (("silence", "add", "--matcher", "host=a", "--duration", "5x"),
     "Error: --duration: expected a duration such as 30s, 5m or 1h, got '5x'"),
    (("silence", "add", "--matcher", "host=a", "--until", "tomorrow"),
     "Error: --until: expected an ISO-8601 time such as 2026-12-01T18:00:00Z"),
    (("silence", "add", "--matcher", "host=a", "--until", "2020-01-01T00:00:00Z"),
     "Error: --until: that time has passed"),
    (("silence", "add", "--matcher", "host"), "Error: --matcher: 'host': expected label=value"),
    (("silence", "add", "--matcher", "host=a", "--duration", "1h", "--until", "2099-01-01"),
     "Error: --until: give --duration or --until, not both"),
    (("features", "get", "user", "u1", "--at", "soon"), "Error: --at: expected an ISO-8601"),
    (("features", "get", "user", "u1", "--at", "99999999999999999999"),
     "Error: --at: epoch milliseconds go from 0 (1970) to 253402300799999 (year 9999)"),
    (("features", "get", "user", "u1", "--at", "-1000"),
     "Error: --at: epoch milliseconds go from 0 (1970) to 253402300799999 (year 9999)"),
    (("features", "get", "user", "u1", "--at", "9999-12-31T22:00:00-02:00"),
     "Error: --at: epoch milliseconds go from 0 (1970) to 253402300799999 (year 9999), got "
     "9999-12-31T22:00:00-02:00"),
    (("features", "get", "user", "u1", "--at", "1969-12-31T23:59:59.9999Z"),
     "Error: --at: epoch milliseconds go from 0 (1970)"),
    (("replay", "--input", "nope.jsonl"),
     "Error: Invalid value for '--input': Path 'nope.jsonl' does not exist."),
    (("dead-letters", "tail", "-n", "many"), "Error: Invalid value for '-n': 'many' is not"),
    (("dead-letters", "tail", "-n", "-5"), "Error: Invalid value for '-n': -5 is not in the range"),
    (("bogus",), "Error: No such command 'bogus'. (see eventpulse --help)"),
    (("alerts", "bogus"), "Error: No such command 'bogus'. (see eventpulse alerts --help)"),
    (("alerts", "outbox", "retry"), "Error: name the KEYs to retry"),
    (("redis-acl", "worker", "--user", "a b"), "Error: --user: 'a b': an ACL user name is one word"),
])
def test_bad_option_values(args: tuple[str, ...], expected: str, tmp_path: Path,
                           nowhere: dict[str, str]) -> None:
    recorded = tmp_path / "in.jsonl"
    recorded.write_text('{"topic": "events", "record": {}}\n')
    done = run(*(a.format(input=recorded) for a in args), env=nowhere)
    assert one_line_failure(done, code=2).startswith(expected)


def test_replay_with_a_bad_input_line_names_the_line(tmp_path: Path) -> None:
    recorded = tmp_path / "in.jsonl"
    recorded.write_text('{"topic": "events", "record": {"timestamp": 1}}\n\n{"topic": "events"\n')
    line = one_line_failure(run("replay", "--input", str(recorded)))
    assert line == (f'Error: {recorded}:3: expected a JSON object {{"topic": ..., "record": '
                    '{...}} on each line')
    recorded.write_bytes(b'{"topic": 5, "record": {}}\n')
    assert one_line_failure(run("replay", "--input", str(recorded))).endswith(
        ':1: "topic" must be a string')


def test_check_config_messages(tmp_path: Path) -> None:
    typo = tmp_path / "typo.yaml"
    typo.write_text(EXAMPLE.read_text().replace("      threshold: 90\n", "      treshold: 90\n"))
    done = run("check-config", str(typo))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        "Error: invalid configuration (2 problems):",
        f"  {typo}: alert rule 'DiskAlmostFull': threshold: required, but missing",
        f"  {typo}: alert rule 'DiskAlmostFull': treshold: unknown field; did you mean "
        "'threshold'?"]
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert one_line_failure(run("check-config", str(empty))).startswith(
        f"Error: {empty}: the file is empty")
    broken = tmp_path / "broken.yaml"
    broken.write_text("features: [\n")
    assert one_line_failure(run("check-config", str(broken))) == (
        f"Error: {broken}: not valid YAML: line 2, column 1: expected the node content, but "
        "found '<stream end>' (while parsing a flow node)")
    assert run("check-config", str(EXAMPLE)).stdout == "ok: 10 features, 3 alert rules\n"


def test_a_redis_url_with_a_bad_port_names_the_setting(nowhere: dict[str, str]) -> None:
    for port in ("99999", "notaport"):
        env = {**nowhere, "EVENTPULSE_REDIS_URL": f"redis://:{PASSWORD}@127.0.0.1:{port}/0"}
        for args in (("silence", "list"), ("alerts", "outbox")):
            assert one_line_failure(run(*args, env=env)) == (
                "Error: invalid settings: EVENTPULSE_REDIS_URL: the port is not a number from 1 "
                "to 65535; set EVENTPULSE_REDIS_URL to e.g. redis://localhost:6379/0")


def test_annotation_templates_that_cannot_render_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    original = 'summary: "disk {labels[mount]} on {labels[host]} is {value}% full"'
    assert original in EXAMPLE.read_text()
    for template, problem in (("x {labels[host} y", "not a valid template"),
                              ("x {nope} y", "unknown field {nope}")):
        config.write_text(EXAMPLE.read_text().replace(original, f'summary: "{template}"'))
        done = run("check-config", str(config))
        assert done.returncode == 1 and problem in done.stderr, done.stderr
        assert "DiskAlmostFull" in done.stderr
    config.write_text(EXAMPLE.read_text().replace(
        original, 'summary: "{rule} on {labels[host]}: {value} > {threshold} {{literal}}"'))
    assert run("check-config", str(config)).returncode == 0


def test_settings_errors_are_one_line(nowhere: dict[str, str]) -> None:
    line = one_line_failure(run("silence", "list", env={**nowhere, "EVENTPULSE_METRICS_PORT": "x"}))
    assert line == ("Error: invalid settings: EVENTPULSE_METRICS_PORT: Input should be a valid "
                    "integer, unable to parse string as an integer")


async def test_features_get_names_the_known_entities(redis_url: str) -> None:
    env = {"EVENTPULSE_REDIS_URL": redis_url}
    assert one_line_failure(run("features", "get", "user", "u1", env=env)).startswith(
        "Error: no features are known in namespace 'ep'")
    client = redis.Redis.from_url(redis_url)
    client.hset(registry_key("ep"), mapping={
        f.name: f.model_dump_json() for f in load_config(None).features})
    client.close()
    assert one_line_failure(run("features", "get", "clicks_5m", "u1", env=env)) == (
        "Error: unknown entity 'clicks_5m'; known entities: item, model, user")
    done = run("features", "get", "user", "u1", "--names", "clicks_5m", env=env)
    assert done.returncode == 0 and json.loads(done.stdout)["clicks_5m"]["status"] == "missing"


def test_silences_read_as_times(redis_url: str) -> None:
    env = {"EVENTPULSE_REDIS_URL": redis_url}
    empty = run("silence", "list", env=env)
    assert (empty.returncode, empty.stdout) == (0, "no active silences (--all shows expired ones)\n")
    added = run("silence", "add", "--matcher", "host=web-1", "--duration", "2h", "--comment",
                "disk swap", "--author", "ann", env=env)
    assert added.returncode == 0, added.stderr
    until = run("silence", "add", "--matcher", "host=web-2", "--until", "2099-01-01T00:00:00Z",
                "--json", env=env)
    assert json.loads(until.stdout)["ends_at"] == "2099-01-01T00:00:00Z"
    listed = run("silence", "list", env=env).stdout.splitlines()
    assert len(listed) == 2 and listed[0].split(" (")[0] == added.stdout.split(" (")[0]
    shown = re.fullmatch(r"(\w{12})  host=web-1  until (\S+) \(in (?:2h|1h59m)\)  "
                         r"since (\S+) \((?:now|\ds ago)\)  by ann: disk swap", listed[0])
    assert shown is not None, listed[0]
    silence_id, ends, starts = shown.groups()
    assert parse_time(ends) - parse_time(starts) == 7200
    assert listed[1].endswith("by " + getpass.getuser()) and "(in " in listed[1]
    assert run("silence", "expire", silence_id, env=env).returncode == 0
    assert len(run("silence", "list", env=env).stdout.splitlines()) == 1
    assert "  expired " in run("silence", "list", "--all", env=env).stdout


async def test_ctrl_c_exits_130_with_one_line(kafka: TansuBroker, tmp_path: Path) -> None:
    topic = unique("dead")
    config = tmp_path / "job.yaml"
    config.write_text(f"dead_letter_topic: {topic}\nfeatures: []\nalerts: {{rules: []}}\n"
                      "topics: {events: behaviour}\n")
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1)])
    finally:
        await admin.close()
    letter = DeadLetter("not_json", "Expecting value", "events", 0, 7, int(time.time() * 1000),
                        None)
    await produce(kafka.bootstrap, topic, [letter.to_json()])
    tail = subprocess.Popen(
        [sys.executable, "-m", "eventpulse", "dead-letters", "tail", "--follow"],
        env={**os.environ, "EVENTPULSE_BROKER_URL": kafka.url,
             "EVENTPULSE_CONFIG_PATH": str(config)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    try:
        assert tail.stdout is not None
        first = await asyncio.to_thread(tail.stdout.readline)
        assert "events[0]@7 not_json" in first
        tail.send_signal(signal.SIGINT)
        _, err = tail.communicate(timeout=30)
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.wait()
    assert (tail.returncode, err) == (130, "interrupted\n")


def test_a_shard_count_redis_contradicts_is_refused_in_one_line(kafka: TansuBroker,
                                                                 redis_url: str) -> None:
    """An explicit EVENTPULSE_REDIS_SHARDS other than the count the fences in Redis were made
    for stops the worker before it starts, naming the fix."""
    namespace = unique("ns")
    redis.Redis.from_url(redis_url).hset(f"{namespace}:{{s:ctl}}:meta", "shards", 64)
    env = {"EVENTPULSE_REDIS_URL": redis_url, "EVENTPULSE_BROKER_URL": kafka.url,
           "EVENTPULSE_REDIS_NAMESPACE": namespace, "EVENTPULSE_REDIS_SHARDS": "128"}
    line = one_line_failure(run("worker", env=env))
    assert line == (f"Error: EVENTPULSE_REDIS_SHARDS is 128 but Redis holds fences for 64 shards "
                    f"under namespace '{namespace}': set EVENTPULSE_REDIS_SHARDS=64 or leave it "
                    "unset (the shard count cannot change while positions are held)")


class PasswordRedis(LocalRedis):
    def command(self) -> list[str]:
        return [*super().command(), "--requirepass", PASSWORD]


@pytest.mark.slow
async def test_worker_waits_for_its_servers_names_them_and_ctrl_c_exits_130(
        tmp_path: Path) -> None:
    """Started before its broker and its Redis, the worker logs each address it waits for (no
    traceback, no exit, no password), carries on once they are up, and a Ctrl-C stops it with
    130."""
    broker_port, redis_port = free_port(), free_port()
    log_path = tmp_path / "worker.log"
    env = {**os.environ, "EVENTPULSE_BROKER_URL": f"kafka://127.0.0.1:{broker_port}",
           "EVENTPULSE_REDIS_URL": f"redis://:{PASSWORD}@127.0.0.1:{redis_port}/0",
           "EVENTPULSE_METRICS_PORT": str(free_port()), "EVENTPULSE_CONSUMER_GROUP": unique("g"),
           "EVENTPULSE_SESSION_TIMEOUT_MS": "6000"}
    with open(log_path, "wb") as log:
        worker = subprocess.Popen([sys.executable, "-m", "eventpulse", "worker"], env=env,
                                  stdout=log, stderr=subprocess.STDOUT,
                                  preexec_fn=interruptible)
    with contextlib.ExitStack() as servers:
        try:
            await wait_until(lambda: f"Kafka broker at 127.0.0.1:{broker_port} unreachable" in
                             log_path.read_text(), timeout=60, message="the broker retry line")
            assert worker.poll() is None, "the worker gave up"
            servers.enter_context(TansuBroker(port=broker_port))
            await wait_until(lambda: f"redis at 127.0.0.1:{redis_port}/0 unavailable" in
                             log_path.read_text(), timeout=90, message="the Redis retry line")
            assert worker.poll() is None
            servers.enter_context(PasswordRedis(port=redis_port))
            await wait_until(lambda: "eventpulse.agents.records: assigned" in log_path.read_text(),
                             timeout=90, message="partitions assigned")
            worker.send_signal(signal.SIGINT)
            assert await asyncio.to_thread(worker.wait, 60) == 130
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait(10)
    text = log_path.read_text()
    assert "Traceback" not in text and PASSWORD not in text and "KafkaConnectionError" not in text


@pytest.mark.slow
async def test_demo_piped_is_plain_whole_and_ctrl_c_exits_130(tmp_path: Path) -> None:
    """Piped to a file: no colour codes; topics read from their start: no value is partial;
    Ctrl-C: everything stopped and exit 130."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("EVENTPULSE_BROKER_URL", "EVENTPULSE_REDIS_URL", "NO_COLOR")}
    demo = subprocess.Popen([sys.executable, "-m", "eventpulse", "demo", "--duration", "60",
                             "--workdir", str(tmp_path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    lines: list[str] = []
    try:
        assert demo.stdout is not None
        while not any(line.startswith("  model search") for line in lines[-1:]):
            line = await asyncio.to_thread(demo.stdout.readline)
            assert line, f"the demo ended early: {lines}"
            lines.append(line)
        demo.send_signal(signal.SIGINT)
        rest, err = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    output = "".join(lines) + rest
    assert demo.returncode == 130, (output, err)
    assert "\x1b" not in output and "Traceback" not in err
    values = [line for line in lines if line.startswith("  ")]
    assert len(values) == 5 and "last_device=" in values[0]
    assert not [line for line in values if "(partial)" in line], values
    assert "interrupted; stopped everything the demo started" in rest


def test_relative_times_read_like_people_say_them() -> None:
    from eventpulse.cliutil import relative, when

    assert [relative(ms, 0) for ms in (0, 400, 5_000, 65_000, 3_600_000, 3_605_000, 6_900_000,
                                       -300_000, 90_000_000)] == [
        "now", "now", "in 5s", "in 1m5s", "in 1h", "in 1h", "in 1h55m", "5m ago", "in 1d1h"]
    assert when(1_796_000_000_000, 1_796_000_000_000 - 7_199_600) == (
        "2026-11-30T00:53:20Z (in 2h)")


@pytest.mark.parametrize(("tty", "no_color", "coloured"), [
    (True, None, True), (True, "1", False), (False, None, False), (True, "", True)])
def test_demo_colours_only_on_a_terminal_without_no_color(
        monkeypatch: pytest.MonkeyPatch, tty: bool, no_color: str | None, coloured: bool) -> None:
    from eventpulse.local import demo

    class Stdout:
        def isatty(self) -> bool:
            return tty

    monkeypatch.setattr(demo.sys, "stdout", Stdout())
    monkeypatch.setenv("TERM", "xterm")
    if no_color is None:
        monkeypatch.delenv("NO_COLOR", raising=False)
    else:
        monkeypatch.setenv("NO_COLOR", no_color)
    assert (demo.style("x", demo.RED) != "x") is coloured


def test_an_unreachable_node_is_the_one_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by an outside test: a cluster read failing on a killed node named the URL's node
    (alive) as the one that could not be reached."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from eventpulse.cliutil import describe_failure

    monkeypatch.setenv("EVENTPULSE_REDIS_URL", "redis+cluster://127.0.0.1:27101")
    assert describe_failure(RedisConnectionError(
        "Error 111 connecting to 127.0.0.1:27102. Connection refused.")).startswith(
        "cannot reach Redis at 127.0.0.1:27102 (")
    assert describe_failure(RedisConnectionError(
        "Error 2 connecting to unix socket: /tmp/r.sock. No such file or directory.")
        ).startswith("cannot reach Redis at 127.0.0.1:27101")


@pytest.mark.parametrize(("setting", "shown"), [
    (None, False), ("", False), ("0", False), ("false", False), (" No ", False), ("off", False),
    ("1", True), ("yes", True), ("true", True)])
def test_tracebacks_only_when_asked_for(monkeypatch: pytest.MonkeyPatch, setting: str | None,
                                        shown: bool) -> None:
    """Found by an outside test: EVENTPULSE_TRACEBACK=0 still printed tracebacks."""
    from eventpulse.cliutil import wants_traceback

    if setting is None:
        monkeypatch.delenv("EVENTPULSE_TRACEBACK", raising=False)
    else:
        monkeypatch.setenv("EVENTPULSE_TRACEBACK", setting)
    assert wants_traceback() is shown
