"""The Faust app of the worker: the record agent, the alert clock and Slack delivery.

The three run as services of one Faust app, so Faust's worker starts them in order, handles
signals and stops them cleanly (the record agent finishes and commits its batch first).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable
from typing import Any

import faust
import mode

from eventpulse import cancellation
from eventpulse.agents.pipeline import Pipeline
from eventpulse.agents.records import RecordAgent
from eventpulse.alerts.delivery import (
    BotTransport,
    Deliverer,
    LogTransport,
    Transport,
    WebhookTransport,
)
from eventpulse.config import JobConfig
from eventpulse.metrics import DeliveryMetrics
from eventpulse.redisconn import connect_async
from eventpulse.settings import Settings

log = logging.getLogger("eventpulse.worker")


class AlertClock(mode.Service):
    """Advances alert time once a second, so ``for``, absence and silences work when the
    stream is quiet, and raises the pipeline-lag alert while the record agent is behind."""

    def __init__(self, pipeline: Pipeline, agent: RecordAgent, max_lag_ms: int,
                 interval_s: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pipeline = pipeline
        self.agent = agent
        self.max_lag_ms = max_lag_ms
        self.interval_s = interval_s
        self._lagging = False

    def is_lagging(self, now_ms: int) -> bool:
        """Rebalancing, or some partition has records waiting while the newest event applied
        from it is older than the bound: what alerting would see there is not yet known."""
        reason = self._lag_reason(now_ms)
        if (reason is not None) != self._lagging:
            self._lagging = reason is not None
            log.info("pipeline %s", f"lagging: {reason}" if reason else "caught up")
        return self._lagging

    def _lag_reason(self, now_ms: int) -> str | None:
        if self.agent.rebalancing:
            return "rebalancing"
        for tp, behind in self.agent.lag_by_partition().items():
            if behind is None:
                return f"{tp.topic}:{tp.partition} not fetched yet"
            if behind == 0:
                continue
            watermark = self.pipeline.watermark_of(f"{tp.topic}:{tp.partition}")
            if watermark is None or now_ms - watermark > self.max_lag_ms:
                age = "unknown" if watermark is None else f"{(now_ms - watermark) / 1000:.0f}s"
                return f"{tp.topic}:{tp.partition} {behind} records behind, newest event {age} old"
        return None

    @mode.Service.task
    async def _tick(self) -> None:
        while not self.should_stop:
            await self.sleep(self.interval_s)
            now = int(time.time() * 1000)
            try:
                await self.pipeline.tick(now, self.agent.owned_partitions(), self.is_lagging(now))
            except Exception as exc:  # never let a tick kill the clock
                if cancellation.requested():  # a cancel that redis-py turned into an error
                    raise asyncio.CancelledError from exc
                log.exception("alert tick failed")


class DeliveryService(mode.Service):
    def __init__(self, deliverer: Deliverer, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.deliverer = deliverer

    @mode.Service.task
    async def _deliver(self) -> None:
        await self.deliverer.run(lambda: self.should_stop)


def make_transport(settings: Settings, sink: Callable[[str], None] | None = None) -> Transport:
    if settings.slack_token is not None:
        return BotTransport(settings.slack_token.get_secret_value(), settings.slack_base_url)
    if settings.slack_webhook_url is not None:
        return WebhookTransport(settings.slack_webhook_url.get_secret_value())
    return LogTransport(sink)


def create_app(settings: Settings, job: JobConfig) -> faust.App:
    app = faust.App(
        f"{settings.consumer_group}-app",
        broker=settings.broker_url,
        web_enabled=False,
        store="memory://",
        topic_partitions=job.partitions,
        broker_session_timeout=settings.session_timeout_ms / 1000,
        broker_heartbeat_interval=1.0,
        broker_rebalance_timeout=max(settings.session_timeout_ms / 1000, 10.0),
        producer_acks=-1,
        consumer_auto_offset_reset="earliest",
    )
    redis = connect_async(settings.redis_url)  # one Redis or a Redis Cluster, by the scheme
    secret = settings.privacy_secret.get_secret_value().encode() if settings.privacy_secret else None
    pipeline = Pipeline(job, redis, settings.redis_namespace, settings.consumer_group, secret,
                        shards=settings.redis_shards,
                        script_budget_ms=settings.redis_script_budget_ms)
    # before a batch's Kafka commit, its writes reach this many replicas (docs/design.md)
    pipeline.store.wait_replicas = settings.redis_wait_replicas
    pipeline.store.wait_timeout_ms = settings.redis_wait_timeout_ms
    agent = RecordAgent(
        pipeline, settings.bootstrap_servers, settings.consumer_group, list(job.topics),
        job.dead_letter_topic, max_records=settings.batch_max_records,
        max_wait_ms=settings.batch_max_wait_ms, session_timeout_ms=settings.session_timeout_ms,
    )
    deliverer = Deliverer(pipeline.alert_store, job.alerts, make_transport(settings),
                          DeliveryMetrics(), rules=pipeline.alerts.engine.by_name)
    pipeline.on_outbox = deliverer.wakeup.set
    clock = AlertClock(pipeline, agent, job.alerts.pipeline.max_lag_ms)
    for service in (agent, clock, DeliveryService(deliverer)):
        app.service(service)  # type: ignore[arg-type]  # instances are accepted too

    @app.task  # type: ignore[untyped-decorator]
    async def announce() -> None:
        log.info("eventpulse worker started: topics=%s features=%d rules=%d", sorted(job.topics),
                 len(job.features), len(job.alerts.rules))

    return app


async def ensure_topics(bootstrap: list[str], job: JobConfig) -> None:
    """Create the topics the job reads and writes, if missing (idempotent)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [*job.topics, job.dead_letter_topic]
        new = [NewTopic(name, job.partitions, 1, topic_configs={"retention.ms": "604800000"})
               for name in wanted if name not in existing]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(new)
    finally:
        await admin.close()


def tune_gc() -> None:
    """A batch allocates hundreds of thousands of short-lived objects (records, partials); with
    CPython's default thresholds that triggers a collection every 700 allocations and regular
    full collections over everything the worker holds. Start-up objects are frozen out of the
    collector's sight and young collections run less often (measured: ~15% of a batch's CPU)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def run_worker(settings: Settings, job: JobConfig) -> None:
    """Run until SIGINT/SIGTERM (Faust's worker handles the signals)."""
    from eventpulse.logconfig import logging_dict
    from eventpulse.metrics import serve

    asyncio.run(ensure_topics(settings.bootstrap_servers, job))
    serve(settings.metrics_port)
    app = create_app(settings, job)
    tune_gc()
    worker = faust.Worker(app, loglevel=settings.log_level, quiet=True,
                          logging_config=logging_dict(settings.log_format, settings.log_level),
                          redirect_stdouts=False)
    worker.execute_from_commandline()
