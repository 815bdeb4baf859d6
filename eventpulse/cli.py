"""The ``eventpulse`` command (click, which Faust already brings along)."""

from __future__ import annotations

import asyncio
import getpass
import json
import sys
from pathlib import Path
from typing import Any

import click

from eventpulse.alerts.state import Silence
from eventpulse.cliutil import (
    Duration,
    FriendlyGroup,
    Moment,
    OneLineError,
    iso,
    sigterm_interrupts,
    unwritable,
    when,
)
from eventpulse.config import EXAMPLE_CONFIG, ConfigError, JobConfig, load_config
from eventpulse.durations import wall_ms as now_ms
from eventpulse.settings import Settings, SettingsError, load_settings


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


def _job(settings: Settings, path: Path | None = None, say_default: bool = False) -> JobConfig:
    """The job YAML of ``--config`` or EVENTPULSE_CONFIG_PATH, else the bundled example's
    (``say_default``: said on stderr, for the commands whose output is the job's features: an
    outside test got the example's columns, without a word, for a job it forgot to name)."""
    chosen = path or settings.config_path
    if chosen is None and say_default:
        click.echo(f"note: no --config and no EVENTPULSE_CONFIG_PATH: the features of the "
                   f"bundled example job ({EXAMPLE_CONFIG})", err=True)
    try:
        return load_config(chosen)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.group(cls=FriendlyGroup)
@click.version_option(package_name="eventpulse")
def main() -> None:
    """eventpulse: Kafka events in, ML features in Redis and alerts in Slack out.

    Settings come from EVENTPULSE_* environment variables (see README.md). A failure is one
    line on stderr and a non-zero exit (130 after Ctrl-C); EVENTPULSE_TRACEBACK=1 shows the
    traceback instead.
    """


@main.command()
def worker() -> None:
    """Run the stream worker until SIGINT/SIGTERM."""
    from eventpulse.agents.app import run_worker
    from eventpulse.connections import ConnectionCheckError
    from eventpulse.logconfig import configure

    settings = _settings()
    job = _job(settings)
    _check_archive(settings, job)
    configure(settings.log_format, settings.log_level)
    try:
        run_worker(settings, job)
    except ConnectionCheckError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.option("--duration", default=90.0, show_default=True, help="Seconds of sample traffic.")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path(".eventpulse/demo"),
              show_default=True, help="Where the demo writes its logs.")
def demo(duration: float, workdir: Path) -> None:
    """Local broker + Redis + worker + sample traffic, shown live."""
    from eventpulse.local.demo import run_demo

    sys.exit(run_demo(duration, workdir))  # 130 after Ctrl-C


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
@click.option("--at", "at_ms", type=Moment(),
              help="Read as of this time: ISO-8601 (UTC unless it says), or epoch milliseconds.")
def features_get(entity: str, ids: tuple[str, ...], names: str | None, at_ms: int | None) -> None:
    """Print features of ENTITY IDS as JSON (value, window, age, status)."""
    from eventpulse.connections import redis_options
    from eventpulse.tables.client import FeatureClient, UnknownFeature

    settings = _settings()
    client = FeatureClient.connect(settings.redis_url, settings.redis_namespace,
                                   **redis_options(settings))
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
    from eventpulse.connections import async_redis

    return AlertStore(async_redis(settings), settings.redis_namespace)


@silence.command("add")
@click.option("--matcher", "matchers", multiple=True, required=True, help="label=value")
@click.option("--duration", "duration_ms", type=Duration(), default="2h", show_default=True,
              help="How long from now (30m, 2h, 1d).")
@click.option("--until", "until_ms", type=Moment(ahead=True),
              help="Or until when: ISO-8601 (2026-12-01T18:00:00Z; UTC unless it says).")
@click.option("--comment", default="", help="Why, for the people who see it.")
@click.option("--author", default=None, help="Who (default: the login name).")
@click.option("--json", "as_json", is_flag=True, help="Print the silence as JSON.")
def silence_add(matchers: tuple[str, ...], duration_ms: int, until_ms: int | None, comment: str,
                author: str | None, as_json: bool) -> None:
    """Silence alerts whose labels match every matcher."""
    parsed = {}
    for matcher in matchers:
        label, sep, value = matcher.partition("=")
        if not sep or not label:
            raise OneLineError("--matcher", f"{matcher!r}: expected label=value")
        parsed[label] = value
    if until_ms is not None:
        source = click.get_current_context().get_parameter_source("duration_ms")
        if source is not click.core.ParameterSource.DEFAULT:
            raise OneLineError("--until", "give --duration or --until, not both")
        duration_ms = until_ms - now_ms()
        if duration_ms <= 0:
            raise OneLineError("--until", "that time has passed")
    store = _alert_store(_settings())
    created = asyncio.run(store.add_silence(parsed, duration_ms, comment,
                                            author or getpass.getuser()))
    click.echo(_silence_json(created) if as_json else _silence_line(created, now_ms()))


@silence.command("list")
@click.option("--all", "include_expired", is_flag=True, help="Include expired silences.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per silence.")
def silence_list(include_expired: bool, as_json: bool) -> None:
    """Silences in force (with --all, expired ones too), times in UTC and from now."""
    store = _alert_store(_settings())
    items = asyncio.run(store.silences(include_expired))
    if not items and not as_json:
        click.echo("no silences" if include_expired else "no active silences "
                   "(--all shows expired ones)")
    now = now_ms()
    for item in items:
        click.echo(_silence_json(item) if as_json else _silence_line(item, now))


def _silence_line(item: Silence, now: int) -> str:
    """``id  host=web-1  until 2026-12-01T05:20:00Z (in 2h)  since ... (now)  by alice: why``."""
    matchers = ",".join(f"{k}={v}" for k, v in sorted(item.matchers.items()))
    state = "until" if item.ends_ms > now else "expired"
    line = (f"{item.id}  {matchers}  {state} {when(item.ends_ms, now)}  "
            f"since {when(item.starts_ms, now)}  by {item.created_by or '?'}")
    return line + (f": {item.comment}" if item.comment else "")


def _silence_json(item: Silence) -> str:
    return json.dumps({**item.__dict__, "starts_at": iso(item.starts_ms),
                       "ends_at": iso(item.ends_ms)})


@silence.command("expire")
@click.argument("silence_id")
def silence_expire(silence_id: str) -> None:
    store = _alert_store(_settings())
    if not asyncio.run(store.expire_silence(silence_id)):
        raise click.ClickException(f"no silence {silence_id!r}")
    click.echo(f"expired {silence_id}")


@main.command("redis-acl")
@click.argument("role", type=click.Choice(["worker", "reader"]))
@click.option("--user", default=None, help="ACL user name (default: eventpulse-worker / "
              "feature-reader).")
def redis_acl(role: str, user: str | None) -> None:
    """Print the least-privilege ACL SETUSER line of the worker or of a feature reader, for
    EVENTPULSE_REDIS_NAMESPACE (docs/security.md). Replace <password> before running it."""
    from eventpulse.tables.acl import acl_setuser, reader_rules, worker_rules

    if user is not None and (not user or any(c.isspace() or not c.isprintable() for c in user)):
        raise OneLineError("--user", f"{user!r}: an ACL user name is one word, without spaces")
    settings = _settings()
    if role == "worker":
        click.echo(acl_setuser(user or "eventpulse-worker", worker_rules(settings.redis_namespace)))
    else:
        click.echo(acl_setuser(user or "feature-reader", reader_rules(settings.redis_namespace)))


@main.group()
def alerts() -> None:
    """Alert notifications."""


@alerts.group("outbox", invoke_without_command=True)
@click.pass_context
def alerts_outbox(ctx: click.Context) -> None:
    """Show notifications waiting for Slack, and those parked because Slack refused them."""
    if ctx.invoked_subcommand is not None:
        return
    from eventpulse.alerts.outbox import format_parked

    async def show(store: Any) -> tuple[int, list[Any]]:
        return await store.pending_count(), await store.parked()

    pending, parked = _with_alert_store(show)
    click.echo(f"{pending} waiting to be sent, {len(parked)} parked")
    for item in parked:
        click.echo(format_parked(item))
    if parked:
        click.echo("retry with: eventpulse alerts outbox retry KEY ... | --all")


@alerts_outbox.command("retry")
@click.argument("keys", nargs=-1)
@click.option("--all", "retry_all", is_flag=True, help="Retry every parked notification.")
def alerts_outbox_retry(keys: tuple[str, ...], retry_all: bool) -> None:
    """Put parked notifications back in the outbox (posted anew, in their original order)."""
    if not keys and not retry_all:
        raise click.UsageError("name the KEYs to retry (see `eventpulse alerts outbox`) or --all")

    async def retry(store: Any) -> list[Any]:
        return list(await store.unpark(None if retry_all else list(keys)))

    retried = _with_alert_store(retry)
    missing = set(keys) - {e.key for e in retried}
    for entry in retried:
        click.echo(f"retrying {entry.key}")
    if missing:
        raise click.ClickException(f"not parked: {', '.join(sorted(missing))}")


def _with_alert_store(action: Any) -> Any:
    """Run ``action(store)`` on the alert store (errors become one line: cliutil)."""
    settings = _settings()

    async def run() -> Any:
        store = _alert_store(settings)
        try:
            return await action(store)
        finally:
            await store.client.aclose()

    return asyncio.run(run())


@main.group("dead-letters")
def dead_letters() -> None:
    """Inspect refused records."""


@dead_letters.command("tail")
@click.option("-n", "count", default=20, show_default=True, type=click.IntRange(min=1),
              help="How many recent ones.")
@click.option("--follow", is_flag=True, help="Keep printing new ones.")
def dead_letters_tail(count: int, follow: bool) -> None:
    """Show recent dead letters readably."""
    from eventpulse.connections import kafka_options
    from eventpulse.streams.tail import tail

    settings = _settings()
    job = _job(settings)
    asyncio.run(tail(settings.bootstrap_servers, job.dead_letter_topic, count, follow, click.echo,
                     kafka_options=kafka_options(settings)))


@main.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path, exists=True))
@click.option("--input", "input_path", type=click.Path(path_type=Path, exists=True),
              required=True, help="JSON lines: {\"topic\": ..., \"record\": {...}} per line.")
@click.option("--until", "extra_ms", type=Duration(), default=0,
              help="Let time run on this long after the last record (e.g. 10m).")
def replay(config_path: Path | None, input_path: Path, extra_ms: int) -> None:
    """Run features and alert rules over recorded data, in event time."""
    from eventpulse.agents.replay import ReplayInputError, run_replay

    settings = _settings()
    job = _job(settings, config_path)
    try:
        run_replay(job, input_path, extra_ms, click.echo)
    except ReplayInputError as exc:
        raise click.ClickException(str(exc)) from None


# --- the offline twin: archive, training sets (eventpulse.archive, eventpulse.offline) -----------


def _check_archive(settings: Settings, job: JobConfig) -> None:
    from eventpulse.archive.service import ArchiveOptions, ArchiveSettingsError

    try:
        ArchiveOptions.from_settings(settings, job)
    except ArchiveSettingsError as exc:
        raise click.ClickException(str(exc)) from None


@main.command("training-set")
@click.option("--labels", "labels_path", type=click.Path(path_type=Path, exists=True),
              required=True, help="parquet or CSV: entity, entity_id, timestamp, label columns.")
@click.option("--out", "out_path", type=click.Path(path_type=Path), required=True,
              help="Where to write the labels with feature columns (.parquet or .csv).")
@click.option("--features", "names", help="Comma-separated features (default: every feature of "
              "the labels' entities).")
@click.option("--archive", "archive_url", help="Archive to read (default: EVENTPULSE_ARCHIVE_URL).")
@click.option("--config", "config_path", type=click.Path(path_type=Path, exists=True),
              help="Job YAML with the feature definitions (default: EVENTPULSE_CONFIG_PATH).")
@click.option("--redis-url", help="A Redis to compute in (default: a private one started here).")
@click.option("--settle", "settle_ms", type=Duration(), default="1s", show_default=True,
              help="Mark values counting records the broker had for less than this before the "
              "label's moment as lag_sensitive (0s: off).")
@click.option("--jobs", type=click.IntRange(min=1), default=None,
              help="Processes to split the label rows over, by entity (default: the CPUs this "
              "command may use, at most 8). Each holds the records of the archive its own "
              "entities need.")
def training_set(labels_path: Path, out_path: Path, names: str | None, archive_url: str | None,
                 config_path: Path | None, redis_url: str | None, settle_ms: int,
                 jobs: int | None) -> None:
    """Point-in-time feature values for label rows, recomputed from the archive with the
    worker's own feature code."""
    from eventpulse.archive.read import ArchiveError
    from eventpulse.offline.cli import run_training_set
    from eventpulse.offline.parallel import default_jobs
    from eventpulse.offline.training import TrainingSetError

    settings = _settings()
    job = _job(settings, config_path, say_default=True)
    url = archive_url or settings.archive_url
    if not url:
        raise click.ClickException("no archive: pass --archive or set EVENTPULSE_ARCHIVE_URL")
    # each named once, in order: a name twice would give the output two columns of one name
    chosen = (None if names is None
              else list(dict.fromkeys(n.strip() for n in names.split(",") if n.strip())))
    if chosen == []:
        raise click.ClickException("--features: name at least one feature (leave the option "
                                   "out for every feature of the labels' entities)")
    try:
        with sigterm_interrupts():  # a SIGTERM still stops the private Redis and processes
            run_training_set(settings, job, url, labels_path, out_path, chosen, redis_url,
                             click.echo, settle_ms, jobs or default_jobs())
    except (TrainingSetError, ArchiveError) as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.option("--since", required=True, type=Moment(ago=True),
              help="Reads from: epoch ms, ISO-8601, or e.g. 2h (ago).")
@click.option("--until", type=Moment(ago=True), help="Reads before (default: all).")
@click.option("--archive", "archive_url", help="Archive to read (default: EVENTPULSE_ARCHIVE_URL).")
@click.option("--topic", default="eventpulse-feature-reads", show_default=True,
              help="The archived topic of logged reads.")
@click.option("--config", "config_path", type=click.Path(path_type=Path, exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--metrics-file", type=click.Path(path_type=Path),
              help="Also write Prometheus metrics to this text file (textfile collector).")
@click.option("--redis-url", help="A Redis to compute in (default: a private one started here).")
def consistency(since: int, until: int | None, archive_url: str | None, topic: str,
                config_path: Path | None, as_json: bool, metrics_file: Path | None,
                redis_url: str | None) -> None:
    """Compare logged served reads with their recomputation from the archive."""
    import redis.asyncio as aioredis

    from eventpulse.archive.read import ArchiveEmpty, ArchiveError, require_files
    from eventpulse.archive.store import ArchiveStore, S3Options
    from eventpulse.offline import consistency as report
    from eventpulse.offline.cli import offline_redis
    from eventpulse.offline.training import TrainingSetError
    from eventpulse.tables.client import READ_PROTOCOL

    if until is not None and until <= since:  # a bad option value: exit 2, as the README says
        raise click.BadParameter(f"{iso(until)} must be after --since ({iso(since)})",
                                 param_hint="--until")
    if metrics_file is not None and (problem := unwritable(metrics_file)):
        raise click.ClickException(f"--metrics-file {metrics_file}: {problem}")
    settings = _settings()
    job = _job(settings, config_path, say_default=True)
    url = archive_url or settings.archive_url
    if not url:
        raise click.ClickException("no archive: pass --archive or set EVENTPULSE_ARCHIVE_URL")
    store = ArchiveStore.open(url, S3Options(
        settings.archive_s3_endpoint, settings.archive_s3_region,
        settings.archive_s3_access_key_id, settings.archive_s3_secret_access_key))
    try:
        require_files(store, [topic])
    except ArchiveEmpty as exc:
        raise click.ClickException(f"{exc} (the logged reads' topic is --topic)") from None
    except ArchiveError as exc:
        raise click.ClickException(str(exc)) from None
    start, end = since, until

    async def go(redis_at: str, drop: bool) -> dict[str, report.FeatureReport]:
        client = aioredis.Redis.from_url(redis_at, protocol=READ_PROTOCOL)  # parsed fastest
        try:
            return await report.report(job, store, topic, start, end, client, drop=drop)
        finally:
            await client.aclose()

    try:
        with sigterm_interrupts(), offline_redis(redis_url) as (redis_at, drop):
            reports = asyncio.run(go(redis_at, drop))
    except (TrainingSetError, ArchiveError) as exc:
        raise click.ClickException(str(exc)) from None
    if not reports:  # a scheduled run must not pass on nothing (a log that stopped, a typo)
        raise click.ClickException(
            f"no logged reads of this job's features on {topic} from {iso(since)} "
            f"{'until ' + iso(until) if until is not None else 'on'}: check --since and "
            "--until, --config, and that model servers log their reads (ServedReadLog)")
    if as_json:
        click.echo(json.dumps({n: r.to_dict() for n, r in reports.items()}, indent=2))
    else:
        click.echo(report.as_text(reports))
    if metrics_file is not None:
        report.write_metrics(reports, str(metrics_file))


@main.command()
def archive() -> None:
    """Run only the archive service (a sidecar; the worker then runs without
    EVENTPULSE_ARCHIVE_URL)."""
    from eventpulse.agents.app import ensure_topics
    from eventpulse.archive.run import run_archive
    from eventpulse.archive.service import ArchiveOptions, ArchiveSettingsError
    from eventpulse.connections import kafka_options
    from eventpulse.logconfig import configure

    settings = _settings()
    job = _job(settings)
    try:
        options = ArchiveOptions.from_settings(settings, job)
    except ArchiveSettingsError as exc:
        raise click.ClickException(str(exc)) from None
    if options is None:
        raise click.ClickException("EVENTPULSE_ARCHIVE_URL: set it to s3://bucket[/prefix] or a "
                                   "directory")
    configure(settings.log_format, settings.log_level)
    # as the worker does: a sidecar started first must not leave the topics to the broker's
    # auto-creation (its default partition count, not the job's)
    asyncio.run(ensure_topics(settings.bootstrap_servers, job, kafka_options(settings)))
    run_archive(settings, job, options)
