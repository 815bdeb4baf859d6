"""The Faust app of the worker: the record agent, the alert clock and Slack delivery.

The three run as services of one Faust app, so Faust's worker starts them in order, handles
signals and stops them cleanly (the record agent finishes and commits its batch first).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

import faust
import mode

from eventpulse import cancellation, connections, gctune, metrics
from eventpulse.agents.health import WorkerHealth
from eventpulse.agents.pipeline import Pipeline
from eventpulse.agents.reachable import until_reachable
from eventpulse.agents.records import RecordAgent
from eventpulse.agents.shutdown import BoundedWorker
from eventpulse.agents.sight import InputSight, InputStatus
from eventpulse.alerts.blind import InputView
from eventpulse.alerts.delivery import (
    BotTransport,
    Deliverer,
    LogTransport,
    Transport,
    WebhookTransport,
)
from eventpulse.alerts.state import Transition
from eventpulse.archive.process import ArchiveProcess, archive_metrics_port
from eventpulse.archive.service import ArchiveOptions, ArchiveService
from eventpulse.config import JobConfig
from eventpulse.metrics import DeliveryMetrics
from eventpulse.settings import Settings
from eventpulse.tables.store import held_shards, shard_mismatch

log = logging.getLogger("eventpulse.worker")


class AlertClock(mode.Service):
    """Advances alert time once a second, so ``for``, absence and silences work when the
    stream is quiet, and tells alerting what the worker has seen of its input (rules over data
    are held while it is blind; see ``alerts.blind``)."""

    #: how often fetch stamps are sampled (``InputSight.observe``): a fetch missed between
    #: two samples only makes the view older, by up to a fetch's long poll (0.5 s)
    observe_interval_s = 0.1

    def __init__(self, pipeline: Pipeline, agent: RecordAgent, interval_s: float = 1.0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pipeline = pipeline
        self.agent = agent
        self.interval_s = interval_s
        self.sight = InputSight(int(time.time() * 1000))
        #: the last published status: /metrics and /readyz both show this one
        self.status = self.publish(self.sight.measured_ms)

    def view(self, now_ms: int) -> InputView:
        """Measure the view now (call with the pipeline lock held: no batch half-fed)."""
        return self.sight.view(now_ms, self.agent.fetch_states(),
                               rebalancing=self.agent.rebalancing,
                               coordinator_known=self.agent.coordinator_known())

    def input_status(self) -> InputStatus:
        """Blind or not, and why: for ``/readyz`` (reported in its body; see ``health``). The
        status last published to the metrics, so the two never disagree."""
        return self.status

    async def tick_once(self, now_ms: int) -> list[Transition]:
        # the view is measured when the lock is held, which may be long after now_ms (a batch,
        # a frozen Redis): measured at that time, or it would look older than it is
        transitions = await self.pipeline.tick(now_ms, self.agent.owned_partitions(),
                                               lambda: self.view(int(time.time() * 1000)))
        self.publish(int(time.time() * 1000))
        return transitions

    def publish(self, now_ms: int) -> InputStatus:
        """The blind metrics and the status /readyz reads, from the last measured view at
        ``now_ms``, together: no Redis, no lock."""
        status, holds = self.sight.status(now_ms), self.pipeline.alerts.holds
        metrics.record_sight(status.blind_seconds, self.sight.last.age_ms(now_ms),
                             {c.value for c in status.causes},
                             len(holds.projected(self.sight.last, now_ms)) if holds else 0)
        self.status = status
        return status

    @mode.Service.task
    async def _publish(self) -> None:
        """Separate from the tick, which waits on Redis: a frozen Redis must not freeze them."""
        while not self.should_stop:
            await self.sleep(self.interval_s)
            self.publish(int(time.time() * 1000))

    @mode.Service.task
    async def _observe(self) -> None:
        """Sample fetch stamps between ticks (a fetch's view time is the one before it)."""
        while not self.should_stop:
            await self.sleep(self.observe_interval_s)
            if not self.agent.rebalancing:
                self.sight.observe(self.agent.fetch_states())

    @mode.Service.task
    async def _tick(self) -> None:
        while not self.should_stop:
            await self.sleep(self.interval_s)
            if self.should_stop:
                # the sleep ends when the stop begins, and asyncio.wait_for (3.11) may swallow
                # the cancel that follows: a tick now would wait on the pipeline lock for good
                break
            try:
                await self.tick_once(int(time.time() * 1000))
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


def create_app(settings: Settings, job: JobConfig, health: WorkerHealth | None = None,
               ) -> faust.App:
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
        broker_credentials=connections.faust_credentials(settings),
    )
    redis = connections.async_redis(settings)  # one Redis or a Redis Cluster, by the scheme
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
        kafka_options=connections.kafka_options(settings),
        dead_letter_max_request_size=settings.dead_letter_max_request_size,
        dead_letter_max_bytes=job.limits.dead_letter_max_bytes,
    )
    deliverer = Deliverer(pipeline.alert_store, job.alerts, make_transport(settings),
                          DeliveryMetrics(), rules=pipeline.alerts.engine.by_name)
    pipeline.on_outbox = deliverer.wakeup.set
    clock = AlertClock(pipeline, agent)
    if health is not None:
        health.attach(agent, pipeline, clock.input_status,
                      lambda: clock.publish(int(time.time() * 1000)))
    services: list[mode.Service] = [agent, clock, DeliveryService(deliverer)]
    archive = ArchiveOptions.from_settings(settings, job)
    if archive is not None and settings.archive_mode == "process":  # see archive/process.py
        services.append(ArchiveProcess(archive_metrics_port(settings)))
    elif archive is not None:  # its own consumer group: a store outage never stalls features
        services.append(ArchiveService(job, archive, settings.bootstrap_servers,
                                       f"{settings.consumer_group}-archive", secret,
                                       session_timeout_ms=settings.session_timeout_ms,
                                       kafka_options=connections.kafka_options(settings)))
    for service in services:
        app.service(service)  # type: ignore[arg-type]  # instances are accepted too

    @app.task  # type: ignore[untyped-decorator]
    async def announce() -> None:
        log.info("eventpulse worker started: topics=%s features=%d rules=%d", sorted(job.topics),
                 len(job.features), len(job.alerts.rules))

    return app


async def ensure_topics(bootstrap: list[str], job: JobConfig,
                        kafka_options: dict[str, Any] | None = None) -> None:
    """Create the topics the job reads and writes, if missing (idempotent); waits for the
    broker to answer."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    async def connect() -> AIOKafkaAdminClient:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **(kafka_options or {}))
        try:
            await admin.start()
        except BaseException:
            await admin.close()
            raise
        return admin

    admin = await until_reachable(connect, bootstrap, "topic set-up")
    try:
        existing = set(await admin.list_topics())
        wanted = [*job.topics, job.dead_letter_topic]
        new = [NewTopic(name, job.partitions, 1, topic_configs={"retention.ms": "604800000"})
               for name in wanted if name not in existing]
        for topic in new:  # the bound dead letters are cut to (read back at start-up)
            if topic.name == job.dead_letter_topic:
                topic.topic_configs["max.message.bytes"] = str(job.limits.dead_letter_max_bytes)
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(new)
    finally:
        await admin.close()


async def _prepare(settings: Settings, job: JobConfig) -> None:
    """Connect to Kafka and Redis once with the configured security (a wrong password or an
    untrusted certificate stops here, named), then create the topics."""
    await connections.preflight(settings)
    await _check_shard_count(settings)
    await ensure_topics(settings.bootstrap_servers, job, connections.kafka_options(settings))


async def _check_shard_count(settings: Settings) -> None:
    """A configured shard count that the fences in Redis contradict stops the worker here, in
    one line, before it starts. Best effort: a Redis not reachable yet is checked again by the
    worker's own start (``FeatureStore.prepare_layout``)."""
    if settings.redis_shards is None:
        return
    client = connections.async_redis(settings)
    try:
        async with asyncio.timeout(5):
            held = await held_shards(client, settings.redis_namespace)
    except Exception:  # unreachable, busy, loading: the worker's start waits that out
        return
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()
    if held is not None and held != settings.redis_shards:
        raise connections.ConnectionCheckError(
            shard_mismatch(settings.redis_shards, held, settings.redis_namespace))


def run_worker(settings: Settings, job: JobConfig) -> None:
    """Run until SIGINT/SIGTERM (Faust's worker handles the signals; the stop finishes and
    commits the batch in hand within ``stop_timeout_s``)."""
    from eventpulse.logconfig import logging_dict

    asyncio.run(_prepare(settings, job))
    health = WorkerHealth(settings)  # started before the app, stopped after it
    app = create_app(settings, job, health)
    gctune.tune_for_good()  # a batch allocates hundreds of thousands of short-lived objects
    worker = BoundedWorker(app, health, stop_timeout_s=settings.stop_timeout_s,
                           loglevel=settings.log_level, quiet=True,
                           logging_config=logging_dict(settings.log_format, settings.log_level),
                           redirect_stdouts=False)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        if worker.interrupted and exc.code in (0, None):
            raise SystemExit(128 + signal.SIGINT) from None  # after its clean stop, as shells do
        raise
