"""The worker's probes: what ``/healthz`` and ``/readyz`` check, wired to the record agent.

A service of the Faust *worker* (not of the app), so it starts before the app, answers while
the app joins its group, and stops after it: a stopping worker still answers its probes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import mode
from aiokafka import TopicPartition

from eventpulse import metrics
from eventpulse.agents.pipeline import Pipeline
from eventpulse.agents.records import RecordAgent
from eventpulse.agents.sight import Cause, InputStatus
from eventpulse.health import HealthServer, Heartbeat, RedisWatch
from eventpulse.redisconn import ping
from eventpulse.settings import Settings

log = logging.getLogger("eventpulse.health")


class WorkerHealth(mode.Service):
    """Heartbeat, Redis watch and progress watch, served by :class:`HealthServer`."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.heartbeat = Heartbeat(settings.health_loop_stall_s)
        self.agent: RecordAgent | None = None
        #: the alert clock's view of the input (issue 16): blind or not, and why
        self.input_status: Callable[[], InputStatus] | None = None
        self.redis_watch: RedisWatch | None = None
        #: per partition: the next offset to apply when last seen moving, and since when
        self._progress: dict[TopicPartition, tuple[int, float]] = {}
        #: brings the input status and its metrics up to now (the alert clock's ``publish``)
        self.refresh_input: Callable[[], object] = lambda: None
        self.server = HealthServer(settings.metrics_port, live=[self.heartbeat.reason],
                                   ready=[self.pipeline_reasons, self._redis_reasons],
                                   describe=self.describe, refresh=lambda: self.refresh_input())

    def attach(self, agent: RecordAgent, pipeline: Pipeline,
               input_status: Callable[[], InputStatus] | None = None,
               refresh_input: Callable[[], object] | None = None) -> None:
        """``refresh_input``: publish the input status now. The clock publishes once a second
        once the app has started its services, seconds after the metrics page answers: without
        it, a starting worker showed 0 blind seconds beside the cause ``rebalancing``."""
        self.agent = agent
        self.input_status = input_status
        if refresh_input is not None:
            self.refresh_input = refresh_input
        redis = pipeline.redis
        self.redis_watch = RedisWatch(lambda: ping(redis), self.settings.ready_redis_outage_s)

    async def on_start(self) -> None:
        metrics.READY.set_function(lambda: 0.0 if self.server.ready_reasons() else 1.0)
        if self.settings.metrics_port:
            await self.server.start()

    async def on_shutdown(self) -> None:
        await self.server.stop()

    @mode.Service.task
    async def _heartbeat(self) -> None:
        await self.heartbeat.run()

    @mode.Service.task
    async def _watch_redis(self) -> None:
        if self.redis_watch is not None:
            await self.redis_watch.run()

    @mode.Service.task
    async def _watch_progress(self) -> None:
        while not self.should_stop:
            self.sample_progress(time.monotonic())
            await self.sleep(1.0)

    def sample_progress(self, now: float) -> None:
        """Remember when each partition last moved on, or had nothing waiting."""
        if self.agent is None:
            return
        lag = self.agent.lag_by_partition()
        for tp, behind in lag.items():
            offset = self.agent.next_offsets.get(tp, -1)
            seen = self._progress.get(tp)
            if seen is None or seen[0] != offset or behind == 0:
                self._progress[tp] = (offset, now)
        for tp in self._progress.keys() - lag.keys():
            del self._progress[tp]

    def pipeline_reasons(self, now: float) -> list[str]:
        """Why the pipeline is not doing its job (empty: it is). The one place that reads the
        agent's state for readiness; new states of the pipeline belong here."""
        agent = self.agent
        if agent is None:
            return ["starting"]
        if agent.should_stop:
            return ["stopping"]
        if agent.rebalancing:
            return ["no partition assignment yet (joining the consumer group or rebalancing)"]
        reasons = [f"{tp.topic}:{tp.partition} has records waiting and applied none for "
                   f"{now - since:.0f}s (bound {self.settings.ready_stall_s:g}s)"
                   for tp, (_, since) in sorted(self._progress.items())
                   if now - since > self.settings.ready_stall_s]
        status = self.input_status() if self.input_status is not None else None
        if (status is not None and status.blind and status.blind_seconds > self.settings.ready_stall_s
                and status.causes & {Cause.FETCH_STALLED, Cause.COORDINATOR_LOST}):
            # the broker has not answered for longer than the stall bound: stuck, not busy
            why = status.reason or ", ".join(sorted(status.causes))
            reasons.append(f"input blind for {status.blind_seconds:.0f}s: {why}")
        return reasons

    def _redis_reasons(self, now: float) -> list[str]:
        reason = self.redis_watch.reason(now) if self.redis_watch is not None else None
        return [] if reason is None else [reason]

    def describe(self) -> str:
        if self.agent is None or self.agent.consumer is None:
            return "starting"
        owned = len(self.agent.owned_partitions())
        text = f"{owned} partitions assigned" + (" (standby)" if owned == 0 else "")
        status = self.input_status() if self.input_status is not None else None
        if status is not None and status.blind:
            # shown while ready too: a catch-up or a short stall holds alerts (docs/design.md)
            why = status.reason or ", ".join(sorted(status.causes)) or "unknown"
            text += f"; input blind for {status.blind_seconds:.0f}s ({why}), " \
                    "data-driven alerts held"
        return text
