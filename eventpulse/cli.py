"""The ``eventpulse`` command (click, which Faust already brings along)."""

from __future__ import annotations

import asyncio
import getpass
import json
import sys
from pathlib import Path
from typing import Any

import click

from eventpulse.config import ConfigError, JobConfig, load_config
from eventpulse.durations import parse_duration_ms
from eventpulse.settings import Settings, SettingsError, load_settings


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


def _job(settings: Settings, path: Path | None = None) -> JobConfig:
    try:
        return load_config(path or settings.config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
@click.version_option(package_name="eventpulse")
def main() -> None:
    """eventpulse: Kafka events in, ML features in Redis and alerts in Slack out.

    Settings come from EVENTPULSE_* environment variables (see README.md).
    """


@main.command()
def worker() -> None:
    """Run the stream worker until SIGINT/SIGTERM."""
    from eventpulse.agents.app import run_worker
    from eventpulse.logconfig import configure

    settings = _settings()
    job = _job(settings)
    configure(settings.log_format, settings.log_level)
    run_worker(settings, job)


@main.command()
@click.option("--duration", default=90.0, show_default=True, help="Seconds of sample traffic.")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path(".eventpulse/demo"),
              show_default=True, help="Where the demo writes its logs.")
def demo(duration: float, workdir: Path) -> None:
    """Local broker + Redis + worker + sample traffic, shown live."""
    from eventpulse.local.demo import run_demo

    sys.exit(run_demo(duration, workdir))


@main.command("check-config")
@click.argument("path", type=click.Path(path_type=Path), required=False)
def check_config(path: Path | None) -> None:
    """Validate the YAML job description (default: EVENTPULSE_CONFIG_PATH or the example)."""
    settings = _settings()
    job = _job(settings, path)
    click.echo(f"ok: {len(job.features)} features, {len(job.alerts.rules)} alert rules")


@main.group()
def features() -> None:
    """Read features from Redis."""


@features.command("get")
@click.argument("entity")
@click.argument("ids", nargs=-1, required=True)
@click.option("--names", help="Comma-separated feature names (default: all of this entity).")
@click.option("--at", "at_ms", type=int, help="Read as of this epoch-millisecond wall time.")
def features_get(entity: str, ids: tuple[str, ...], names: str | None, at_ms: int | None) -> None:
    """Print features of ENTITY IDS as JSON (value, window, age, status)."""
    from eventpulse.tables.client import FeatureClient, UnknownFeature

    settings = _settings()
    client = FeatureClient.connect(settings.redis_url, settings.redis_namespace)
    try:
        chosen = names.split(",") if names else None
        result = client.get_many(entity, list(ids), chosen, at_ms)
    except UnknownFeature as exc:
        raise click.ClickException(str(exc.args[0])) from None
    finally:
        client.close()
    out: dict[str, Any] = {i: {n: v.to_dict() for n, v in vals.items()} for i, vals in result.items()}
    click.echo(json.dumps(out[ids[0]] if len(ids) == 1 else out, indent=2))


@main.group()
def silence() -> None:
    """Silence alerts by label matchers."""


def _alert_store(settings: Settings) -> Any:
    from eventpulse.alerts.outbox import AlertStore
    from eventpulse.redisconn import connect_async

    return AlertStore(connect_async(settings.redis_url), settings.redis_namespace)


@silence.command("add")
@click.option("--matcher", "matchers", multiple=True, required=True, help="label=value")
@click.option("--duration", default="2h", show_default=True)
@click.option("--comment", default="", help="Why, for the people who see it.")
@click.option("--author", default=None, help="Who (default: the login name).")
def silence_add(matchers: tuple[str, ...], duration: str, comment: str, author: str | None) -> None:
    """Silence alerts whose labels match every matcher."""
    parsed = {}
    for matcher in matchers:
        label, sep, value = matcher.partition("=")
        if not sep or not label:
            raise click.BadParameter(f"{matcher!r}: expected label=value", param_hint="--matcher")
        parsed[label] = value
    try:
        duration_ms = parse_duration_ms(duration)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--duration") from None
    store = _alert_store(_settings())
    created = asyncio.run(store.add_silence(parsed, duration_ms, comment,
                                            author or getpass.getuser()))
    click.echo(json.dumps(created.__dict__))


@silence.command("list")
@click.option("--all", "include_expired", is_flag=True, help="Include expired silences.")
def silence_list(include_expired: bool) -> None:
    store = _alert_store(_settings())
    for item in asyncio.run(store.silences(include_expired)):
        click.echo(json.dumps(item.__dict__))


@silence.command("expire")
@click.argument("silence_id")
def silence_expire(silence_id: str) -> None:
    store = _alert_store(_settings())
    if not asyncio.run(store.expire_silence(silence_id)):
        raise click.ClickException(f"no silence {silence_id!r}")
    click.echo(f"expired {silence_id}")


@main.group("dead-letters")
def dead_letters() -> None:
    """Inspect refused records."""


@dead_letters.command("tail")
@click.option("-n", "count", default=20, show_default=True, help="How many recent ones.")
@click.option("--follow", is_flag=True, help="Keep printing new ones.")
def dead_letters_tail(count: int, follow: bool) -> None:
    """Show recent dead letters readably."""
    from eventpulse.streams.tail import tail

    settings = _settings()
    job = _job(settings)
    asyncio.run(tail(settings.bootstrap_servers, job.dead_letter_topic, count, follow, click.echo))


@main.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path, exists=True))
@click.option("--input", "input_path", type=click.Path(path_type=Path, exists=True),
              required=True, help="JSON lines: {\"topic\": ..., \"record\": {...}} per line.")
@click.option("--until", help="Let time run on this long after the last record (e.g. 10m).")
def replay(config_path: Path | None, input_path: Path, until: str | None) -> None:
    """Run features and alert rules over recorded data, in event time."""
    from eventpulse.agents.replay import run_replay

    settings = _settings()
    job = _job(settings, config_path)
    extra_ms = parse_duration_ms(until) if until else 0
    run_replay(job, input_path, extra_ms, click.echo)
