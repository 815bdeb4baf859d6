"""``eventpulse archive``: the archive service alone, as its own process (a sidecar).

The same service the worker runs when ``EVENTPULSE_ARCHIVE_URL`` is set, in the same consumer
group, so either deployment writes the same objects. Why a separate process at all: the archive
decodes every record again, and inside the worker that work takes turns with the feature agent on
one interpreter lock; as its own process it runs on another core (docs/performance.md).
"""

from __future__ import annotations

import os

import mode

from eventpulse import connections
from eventpulse.archive.process import exit_with_parent
from eventpulse.archive.service import ArchiveOptions, ArchiveService
from eventpulse.config import JobConfig
from eventpulse.settings import Settings


def run_archive(settings: Settings, job: JobConfig, options: ArchiveOptions) -> None:
    """Run until SIGINT/SIGTERM (mode's worker handles the signals)."""
    from prometheus_client import start_http_server

    from eventpulse.logconfig import logging_dict

    exit_with_parent()
    if settings.archive_nice:
        # the archive may lag (Kafka is its buffer); features and alerts may not
        os.nice(settings.archive_nice)
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr="0.0.0.0")
    secret = settings.privacy_secret.get_secret_value().encode() if settings.privacy_secret \
        else None
    service = ArchiveService(job, options, settings.bootstrap_servers,
                             f"{settings.consumer_group}-archive", secret,
                             session_timeout_ms=settings.session_timeout_ms,
                             kafka_options=connections.kafka_options(settings))
    worker = mode.Worker(service, loglevel=settings.log_level, quiet=True,
                         logging_config=logging_dict(settings.log_format, settings.log_level),
                         redirect_stdouts=False)
    worker.execute_from_commandline()
