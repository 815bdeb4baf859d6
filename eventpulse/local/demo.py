"""``eventpulse demo``: broker, Redis, worker and sample traffic on one machine, shown live.

Everything it starts, it stops: on Ctrl-C, at the end of ``--duration``, or on error.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from eventpulse.cliutil import Terminated, sigterm_interrupts
from eventpulse.local.servers import (
    LocalRedis,
    ServerError,
    TansuBroker,
    free_port,
    wait_for_port,
)
from eventpulse.local.traffic import MODELS, produce_story
from eventpulse.settings import ENV_PREFIX, Settings, bootstrap_servers, load_settings
from eventpulse.tables.client import AsyncFeatureClient, FeatureValue

BOLD, RED, GREEN, DIM, RESET = "\033[1m", "\033[31m", "\033[32m", "\033[2m", "\033[0m"


def colours_wanted() -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set (https://no-color.org): output
    piped to a file or a CI log stays plain text."""
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR") and (
        os.environ.get("TERM") != "dumb")


def style(text: str, colour: str) -> str:
    return f"{colour}{text}{RESET}" if colour and colours_wanted() else text


def say(text: str, colour: str = "") -> None:
    print(style(text, colour), flush=True)


#: Security settings that apply to the user's own servers, not to those the demo starts.
_KAFKA_SECURITY = [name for name in Settings.model_fields if name.startswith("kafka_")]
_REDIS_SECURITY = [name for name in Settings.model_fields
                   if name.startswith("redis_") and name not in ("redis_url", "redis_namespace")]


def _demo_settings(broker_url: str, redis_url: str) -> tuple[Settings, dict[str, str]]:
    """Settings and environment of the demo: the user's security settings are kept for the
    user's own servers (EVENTPULSE_BROKER_URL / _REDIS_URL given) and dropped for local ones."""
    env = dict(os.environ)
    overrides: dict[str, object] = {"broker_url": broker_url, "redis_url": redis_url}
    for names, own in ((_KAFKA_SECURITY, env.get(f"{ENV_PREFIX}BROKER_URL") == broker_url),
                       (_REDIS_SECURITY, env.get(f"{ENV_PREFIX}REDIS_URL") == redis_url)):
        if own:
            continue
        for name in names:
            variable = ENV_PREFIX + name.upper()
            env.pop(variable, None)
            env.pop(variable + "_FILE", None)
            overrides[name] = Settings.model_fields[name].default
    env.update({f"{ENV_PREFIX}BROKER_URL": broker_url, f"{ENV_PREFIX}REDIS_URL": redis_url})
    return load_settings(**overrides), env


@contextlib.contextmanager
def _servers(workdir: Path) -> Iterator[tuple[str, str]]:
    broker_url = os.environ.get("EVENTPULSE_BROKER_URL")
    redis_url = os.environ.get("EVENTPULSE_REDIS_URL")
    with contextlib.ExitStack() as stack:
        if broker_url is None:
            broker = stack.enter_context(TansuBroker(log_path=workdir / "broker.log"))
            broker_url = broker.url
            say(f"started local Kafka-compatible broker (Tansu) on {broker.bootstrap}", DIM)
        if redis_url is None:
            redis = stack.enter_context(LocalRedis(log_path=workdir / "redis.log"))
            redis_url = redis.url
            say(f"started local Redis on {redis_url}", DIM)
        yield broker_url, redis_url


def _pump_worker_log(stream: IO[bytes], log_file: Path) -> None:
    """Copy the worker's log to a file; echo alerts (and only alerts) to the terminal."""
    showing = False
    with open(log_file, "ab") as out:
        for raw in stream:
            out.write(raw)
            out.flush()
            line = raw.decode(errors="replace").rstrip()
            starts_record = line[:4].isdigit()
            if starts_record:
                showing = "eventpulse.alerts" in line and "alert (no Slack" in line
                continue
            if showing and line:
                colour = GREEN if "RESOLVED" in line else RED if "[" in line[:30] else ""
                say(("  " if line.startswith("-") else "ALERT ") + line, colour)


async def _show_features(settings: Settings, stop: asyncio.Event, every_s: float) -> None:
    from eventpulse.connections import redis_options

    client = None
    while client is None and not stop.is_set():
        with contextlib.suppress(Exception):
            client = await AsyncFeatureClient.connect(settings.redis_url,
                                                      settings.redis_namespace,
                                                      **redis_options(settings))
            if not client.specs:
                client = None
        if client is None:
            await asyncio.sleep(1)
    if client is None:
        return
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every_s):  # not wait_for: see alerts.delivery
                    await stop.wait()
            lines = []
            users = await client.get_many("user", ["u1", "u2"], ["clicks_5m", "last_device"])
            items = await client.get_many("item", ["i1"], ["item_events_5m", "distinct_users_10m"])
            models = await client.get_many("model", MODELS, ["error_rate_30s", "latency_p95_5m"])
            for label, table in (("user", users), ("item", items), ("model", models)):
                for entity_id, values in table.items():
                    lines.append(f"  {label} {entity_id:<7}" + "  ".join(
                        f"{name}={_fmt(v)}" for name, v in values.items()))
            say(time.strftime("%H:%M:%S") + " features (read from Redis, one round trip each):",
                BOLD)
            for line in lines:
                say(line)
    finally:
        await client.aclose()


def _fmt(value: FeatureValue) -> str:
    v = value.value
    shown = f"{v:.3g}" if isinstance(v, float) else str(v)
    return shown if value.status == "present" else f"{shown}({value.status})"


async def _drive(settings: Settings, duration: float) -> None:
    from eventpulse.connections import kafka_options

    stop = asyncio.Event()
    display = asyncio.create_task(_show_features(settings, stop, 5.0))
    try:
        sent = await produce_story(bootstrap_servers(settings.broker_url)[0], duration,
                                   kafka_options=kafka_options(settings))
        say(f"sample traffic done: {sent} records sent", DIM)
    finally:
        stop.set()
        await display


def _write_sample_labels(workdir: Path, start_ms: int, end_ms: int) -> Path:
    """Label rows for the training-set example: a few users at moments of the demo's run."""
    path = workdir / "labels.csv"
    moments = [start_ms + (end_ms - start_ms) * k // 6 for k in range(1, 7)]
    lines = ["entity,entity_id,timestamp,clicked"]
    lines += [f"user,u{u},{at},{(u + k) % 2}" for k, at in enumerate(moments) for u in (1, 2, 3)]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_demo(duration: float, workdir: Path) -> int:
    """0 when the demo ran its course; 130 after Ctrl-C, 143 after SIGTERM (128 + signal)."""
    workdir.mkdir(parents=True, exist_ok=True)
    say(f"{style('eventpulse demo', BOLD)}: {duration:.0f}s of sample traffic. Ctrl-C stops it.")
    say("Watch features change below; the ranker model's error rate spikes at ~10s and web-2's "
        "disk fills at ~15s, so alerts fire and then resolve. The topics are read from their "
        "start, so every value is whole (none is marked partial) although the windows reach "
        "back before the demo began.", DIM)
    try:
        with sigterm_interrupts(), _servers(workdir) as (broker_url, redis_url):
            _run_worker_and_traffic(broker_url, redis_url, duration, workdir)
    except KeyboardInterrupt as stop:
        say("\ninterrupted; stopped everything the demo started", DIM)
        return 128 + (signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT)
    return 0


def _run_worker_and_traffic(broker_url: str, redis_url: str, duration: float,
                            workdir: Path) -> None:
    metrics_port = free_port()
    settings, env = _demo_settings(broker_url, redis_url)
    env.update({"EVENTPULSE_METRICS_PORT": str(metrics_port), "EVENTPULSE_LOG_FORMAT": "text",
                "EVENTPULSE_SESSION_TIMEOUT_MS": "6000"})
    # the embedded default: the raw records also land, as parquet, in a local archive
    archive = env.setdefault("EVENTPULSE_ARCHIVE_URL", str((workdir / "archive").resolve()))
    env.setdefault("EVENTPULSE_ARCHIVE_IDLE_FLUSH_MS", "5000")
    worker = subprocess.Popen([sys.executable, "-m", "eventpulse", "worker"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)
    try:
        assert worker.stderr is not None
        threading.Thread(target=_pump_worker_log, args=(worker.stderr, workdir / "worker.log"),
                         daemon=True).start()
        try:
            wait_for_port(metrics_port, timeout=60, process=worker)
        except ServerError as exc:
            raise ServerError(f"the demo's worker did not start ({exc}); see its log in "
                              f"{workdir / 'worker.log'}") from None
        say(f"worker started (metrics on http://127.0.0.1:{metrics_port}/metrics, log in "
            f"{workdir / 'worker.log'})", DIM)
        started_ms = int(time.time() * 1000)
        asyncio.run(_drive(settings, duration))
        time.sleep(7)  # the archive lands a quiet partition's last records after 5 s
        labels = _write_sample_labels(workdir, started_ms, int(time.time() * 1000))
        say(f"archive (parquet) in {archive}; build a training set from it with:\n"
            f"  {_command()} training-set --archive {archive} --labels {labels} "
            f"--out {workdir / 'training.parquet'}", DIM)
        say("demo finished; stopping everything it started", DIM)
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()


def _command() -> str:
    """How to run ``eventpulse`` from this shell: the virtualenv's script where the demo runs
    from one that is not on PATH (the README's set-up installs into .venv, not activated)."""
    script = Path(sys.executable).parent / "eventpulse"
    if not script.exists() or shutil.which("eventpulse") == str(script):
        return "eventpulse"
    with contextlib.suppress(ValueError):
        return str(script.relative_to(Path.cwd()))
    return str(script)
