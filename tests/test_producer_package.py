"""The producing side installs on its own: ``pip install ./producer`` into a fresh virtualenv
brings eventpulse.logging and its two dependencies, none of the worker's, and it ships a log
record to a real broker from there."""

from __future__ import annotations

import json
import subprocess
import textwrap
import venv
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer

from tests.conftest import unique

ROOT = Path(__file__).resolve().parent.parent
WORKER_ONLY = {"faust-streaming", "redis", "slack-sdk", "slack_sdk", "prometheus-client",
               "pydantic", "hiredis", "ddsketch", "msgpack", "cython"}


def test_producer_package_holds_the_one_copy_of_the_code() -> None:
    """producer/src links to eventpulse/ instead of copying it: one concept, one place."""
    src = ROOT / "producer" / "src" / "eventpulse"
    assert (src / "logging").is_symlink() and (src / "__init__.py").is_symlink()
    assert (src / "logging").resolve() == (ROOT / "eventpulse" / "logging").resolve()
    # and what it packages imports nothing of the worker
    for path in (ROOT / "eventpulse" / "logging").glob("*.py"):
        for line in path.read_text().splitlines():
            if line.startswith(("import ", "from ")) and "eventpulse" in line:
                assert "eventpulse.logging" in line, f"{path.name}: {line}"


@pytest.mark.slow
async def test_producer_installs_alone_and_ships_a_log_record(kafka: Any, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    installed = subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                                str(ROOT / "producer")], capture_output=True, text=True,
                               timeout=600, cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr[-3000:]
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format", "json"],
                            capture_output=True, text=True, timeout=120, check=True)
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert {"eventpulse-producer", "aiokafka", "python-json-logger"} <= names, names
    assert not names & WORKER_ONLY, names & WORKER_ONLY
    assert "eventpulse" not in names

    topic = unique("inference")
    script = textwrap.dedent(f"""
        import importlib.util, logging
        import eventpulse, eventpulse.logging
        assert eventpulse.logging.__file__.startswith({str(env_dir)!r}), eventpulse.logging.__file__
        assert importlib.util.find_spec("eventpulse.agents") is None
        handler = eventpulse.logging.KafkaHandler({kafka.bootstrap!r}, topic={topic!r})
        log = logging.getLogger("svc")
        log.addHandler(handler)
        log.warning("inference", extra={{"model": "ranker", "latency_ms": 12.5, "status": 200}})
        handler.flush()
        handler.close()
        assert handler.dropped == 0
        print(eventpulse.__version__)
    """)
    # outside the checkout, so that ./eventpulse cannot be imported by accident
    ran = subprocess.run([str(python), "-c", script], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.strip() == __import__("eventpulse").__version__

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka.bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        batches = await consumer.getmany(timeout_ms=10_000)
    finally:
        await consumer.stop()
    records = [json.loads(m.value) for messages in batches.values() for m in messages]
    assert [(r["model"], r["latency_ms"], r["status"]) for r in records] == [("ranker", 12.5, 200)]
