"""``eventpulse training-set``: run :mod:`eventpulse.offline.training` on a private Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path

import redis

from eventpulse.addresses import redis_url_address
from eventpulse.archive.read import require_files
from eventpulse.archive.store import ArchiveStore, S3Options
from eventpulse.cliutil import redis_reason
from eventpulse.config import JobConfig
from eventpulse.local.servers import LocalRedis
from eventpulse.offline import parallel, training
from eventpulse.redisconn import is_cluster_url
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


def run_training_set(settings: Settings, job: JobConfig, archive_url: str, labels_path: Path,
                     out_path: Path, names: Sequence[str] | None, redis_url: str | None,
                     echo: Callable[[str], None], settle_ms: int = 0, jobs: int = 1,
                     ) -> training.TrainingStats:
    labels = training.read_labels(labels_path)
    specs = training.choose_features(job, labels, names)
    store = ArchiveStore.open(archive_url, S3Options(
        settings.archive_s3_endpoint, settings.archive_s3_region,
        settings.archive_s3_access_key_id, settings.archive_s3_secret_access_key))
    require_files(store, (spec.topic for spec in specs))

    async def go(url: str) -> training.TrainingStats:
        table, stats = await parallel.build(job, store, labels, specs, url, jobs, settle_ms)
        training.write(table, out_path)
        return stats

    if redis_url is not None:
        check_redis_url(redis_url)
        stats = asyncio.run(go(redis_url))
    else:
        with LocalRedis() as private:
            stats = asyncio.run(go(private.url))
    echo(f"wrote {out_path}: {stats.rows} rows x {len(specs)} features from {stats.events} "
         f"archived events in {stats.seconds:.1f}s"
         + (f" ({jobs} processes)" if jobs > 1 else ""))
    if stats.lag_sensitive:
        echo(f"{stats.lag_sensitive} values count records the broker had for less than "
             f"{settle_ms} ms at the label's moment: status {training.LAG_SENSITIVE}")
    return stats
