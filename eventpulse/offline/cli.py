"""``eventpulse training-set``: run :mod:`eventpulse.offline.training` on a private Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path

from eventpulse.archive.read import require_files
from eventpulse.archive.store import ArchiveStore, S3Options
from eventpulse.config import JobConfig
from eventpulse.local.servers import LocalRedis
from eventpulse.offline import parallel, training
from eventpulse.settings import Settings


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
