"""``eventpulse training-set`` (and the Redis of ``eventpulse consistency``): run
:mod:`eventpulse.offline.training` on a private Redis, or on ``--redis-url``."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import redis

from eventpulse.addresses import redis_url_address
from eventpulse.archive.read import require_files
from eventpulse.archive.store import ArchiveStore, S3Options
from eventpulse.cliutil import redis_reason, unwritable
from eventpulse.config import JobConfig
from eventpulse.local.servers import LocalRedis
from eventpulse.offline import parallel, training
from eventpulse.offline.gaps import INCOMPLETE
from eventpulse.offline.ties import ORDER_DEPENDENT
from eventpulse.redisconn import is_cluster_url
from eventpulse.redisretry import failure_name
from eventpulse.settings import Settings


def check_redis_url(url: str) -> None:
    """``--redis-url`` of the offline commands: one Redis that answers, refused in one sentence
    naming the option otherwise (the replay orders each moment's writes and reads on one
    connection, which a Redis Cluster's slots would split)."""
    if is_cluster_url(url):
        raise training.TrainingSetError(
            "--redis-url: the offline commands compute in one Redis, not a cluster; give a "
            "redis:// or rediss:// URL, or leave it unset for a private Redis started here")
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    except ValueError as exc:
        raise training.TrainingSetError(f"--redis-url: {exc}") from None
    try:
        client.ping()
    except redis.RedisError as exc:
        raise training.TrainingSetError(
            f"--redis-url: cannot reach Redis at {redis_url_address(url)} "
            f"({redis_reason(exc)})") from None
    finally:
        client.close()


@contextlib.contextmanager
def offline_redis(redis_url: str | None) -> Iterator[tuple[str, bool]]:
    """The Redis an offline command computes in, and whether to remove its namespaces after:
    ``--redis-url`` (checked first; the user's Redis keeps nothing of the command) or a private
    one started here (stopped after, whole). A Redis that fails during the command is named in
    the one sentence raised: the option's, or the private one, not EVENTPULSE_REDIS_URL (these
    commands do not read it)."""
    if redis_url is not None:
        check_redis_url(redis_url)
        where = f"Redis at {redis_url_address(redis_url)} (--redis-url)"
        server: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    else:
        server = LocalRedis()
        where = "the private Redis this command started"
    with server as private:
        try:
            yield (redis_url or private.url), redis_url is not None
        except redis.RedisError as exc:
            reason = (redis_reason(exc) if isinstance(exc, redis.ConnectionError | redis.TimeoutError)
                      else failure_name(exc))
            raise training.TrainingSetError(f"{where} failed during the command ({reason})"
                                            ) from None


def check_output(path: Path, labels: pa.Table) -> None:
    """Refuse, before any work, an output the build could not write: another format than
    parquet or CSV, a directory that is not there (or a directory itself), label columns CSV
    cannot hold."""
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise training.TrainingSetError(f"--out {path}: write .parquet or .csv")
    if problem := unwritable(path):
        raise training.TrainingSetError(f"--out {path}: {problem}")
    if suffix == ".csv":
        nested = [f.name for f in labels.schema if pa.types.is_nested(f.type)]
        if nested:
            raise training.TrainingSetError(
                f"--out {path}: CSV cannot hold the label columns {nested} (lists, structs or "
                "maps); write .parquet")


def run_training_set(settings: Settings, job: JobConfig, archive_url: str, labels_path: Path,
                     out_path: Path, names: Sequence[str] | None, redis_url: str | None,
                     echo: Callable[[str], None], settle_ms: int = 0, jobs: int = 1,
                     ) -> training.TrainingStats:
    labels = training.read_labels(labels_path)
    check_output(out_path, labels.table)
    specs = training.choose_features(job, labels, names)
    known = {spec.entity for spec in specs}
    others = Counter(entity for entity in labels.entities if entity not in known)
    if others:  # a typo ("usr") would otherwise only show as columns of not_applicable
        listed = ", ".join(f"{entity!r} ({count})" for entity, count in others.most_common(5))
        echo(f"note: {others.total()} label rows are of an entity type no chosen feature has: "
             f"{listed}{', ...' if len(others) > 5 else ''}; their feature columns are "
             f"{training.NOT_APPLICABLE} (entity types of the features: "
             f"{', '.join(sorted(known))})")
    store = ArchiveStore.open(archive_url, S3Options(
        settings.archive_s3_endpoint, settings.archive_s3_region,
        settings.archive_s3_access_key_id, settings.archive_s3_secret_access_key))
    require_files(store, (spec.topic for spec in specs))

    with offline_redis(redis_url) as (url, drop):
        table, stats = asyncio.run(parallel.build(job, store, labels, specs, url, jobs,
                                                  settle_ms, drop))
    training.write(table, out_path)
    echo(f"wrote {out_path}: {stats.rows} rows x {len(specs)} features from {stats.events} "
         f"archived events in {stats.seconds:.1f}s"
         + (f" ({stats.processes} processes)" if stats.processes > 1 else ""))
    if stats.lag_sensitive:
        echo(f"{stats.lag_sensitive} values count records the broker had for less than "
             f"{settle_ms} ms at the label's moment: status {training.LAG_SENSITIVE}")
    if stats.order_dependent:
        echo(f"{stats.order_dependent} `last` values were decided by records of the same event "
             f"time in two partitions, which the worker may have applied in the other order: "
             f"status {ORDER_DEPENDENT}")
    if stats.incomplete:
        echo(f"{stats.incomplete} values may count records whose archive files are missing "
             f"(the warning above names them): status {INCOMPLETE}; restore the files to build "
             "them exactly")
    return stats
