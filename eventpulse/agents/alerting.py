"""The alert driving: what moves the (plain Python) alert engine, and what saves its moves.

Three things move alert states: a batch's metric samples (fed before its fenced write, their
transitions and the states riding along in the batch's control slice, so that a replay feeds
exactly the samples Redis does not hold yet), the features a batch updated (rules over
features, read back from Redis by the holder of the alert lease), and time (the clock's tick:
``for`` elapses, absences appear, silences end). ``lock`` keeps them one at a time. Silences
change from the CLI at any time, so they are read again at most a second before they decide.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import redis.asyncio as aioredis

from eventpulse import metrics
from eventpulse.alerts.blind import InputView
from eventpulse.alerts.evaluate import AlertEvaluator
from eventpulse.alerts.outbox import AlertStore, encode_changes
from eventpulse.alerts.rules import AbsenceRule, RatioRule, SpikeRule
from eventpulse.alerts.state import Transition
from eventpulse.config import JobConfig
from eventpulse.durations import wall_ms
from eventpulse.redisretry import RedisRetry
from eventpulse.streams.schemas import MetricSample
from eventpulse.tables.batch import WritePlan
from eventpulse.tables.client import AsyncFeatureClient

log = logging.getLogger("eventpulse.pipeline")


def features_watched_by_alerts(job: JobConfig) -> dict[str, list[str]]:
    """entity -> feature names that feature-driven alert rules read."""
    names: set[str] = set()
    for rule in job.alerts.rules:
        if isinstance(rule, RatioRule | AbsenceRule) and rule.feature is not None:
            names.add(rule.feature)
        if isinstance(rule, SpikeRule):
            names.update((rule.feature, rule.baseline))
    out: dict[str, list[str]] = {}
    for spec in job.features:
        if spec.name in names:
            out.setdefault(spec.entity, []).append(spec.name)
    return out


class AlertDriver:
    """Feeds the alert engine and keeps its states in Redis; one per worker."""

    def __init__(self, job: JobConfig, redis: aioredis.Redis, namespace: str,
                 reader: AsyncFeatureClient, retry: RedisRetry,
                 clock: Callable[[], int] = wall_ms) -> None:
        self.reader = reader
        self.retry = retry
        #: alert time: the wall clock, or the records' event time (replay)
        self.clock = clock
        extensive = [f.name for f in job.features if f.aggregation in ("count", "sum")]
        self.alerts = AlertEvaluator.build(job.alerts, {f.name: f.window.size for f in job.features},
                                           extensive)
        self.store = AlertStore(redis, namespace)
        self.watched = features_watched_by_alerts(job)
        #: how long an entity stays under watch for feature-driven rules after its last update
        self.watch_horizon_ms = max(
            [f.window.size + f.window.lateness for f in job.features] + [0]) + 60_000
        self._silences_loaded = 0.0
        #: batches and clock ticks both move alert states; one at a time
        self.lock = asyncio.Lock()
        #: called when new outbox entries are in Redis (the deliverer's wake-up)
        self.on_outbox: Callable[[], None] = lambda: None

    async def reload(self) -> None:
        """Alert states as Redis holds them (at start, after a rebalance)."""
        async with self.lock:
            await self.reload_states()
        await self.refresh_silences(max_age_s=0)

    async def reload_states(self) -> None:
        """Alert states as Redis holds them (call with ``lock``; after a fence conflict)."""
        self.alerts.engine.states = await self.retry.call(self.store.load_states,
                                                          "redis alert states")

    async def refresh_silences(self, max_age_s: float = 1.0) -> None:
        """Decide with silences at most ``max_age_s`` old."""
        now = time.monotonic()
        if now - self._silences_loaded < max_age_s:
            return
        self.alerts.engine.silences = await self.retry.call(self.store.silences,
                                                            "redis silences")
        self._silences_loaded = now

    async def feed(self, samples: Sequence[tuple[str, MetricSample]], plan: WritePlan,
                   ) -> tuple[list[Transition], bool]:
        """Feed a batch's metric samples (call with ``lock``, right before the plan's write):
        the changed states and new outbox entries ride along in the plan's control slice.
        Returns the transitions and whether outbox entries were added."""
        transitions: list[Transition] = []
        if samples:
            await self.refresh_silences()
        read_ms = self.clock()  # no sample was sent after it was read, whatever its stamp
        for tp, sample in samples:
            transitions += self.alerts.on_metric(sample.name, sample.value, sample.labels,
                                                 sample.timestamp, tp, read_ms)
        entries = self.alerts.entries(transitions, wall_ms())
        for op in encode_changes(self.store.keys, self.alerts.engine.take_dirty(), entries):
            plan.add_write(*op)
        return transitions, bool(entries)

    def written(self, outbox: bool) -> None:
        """A fed batch is in Redis: wake the deliverer if it carried outbox entries."""
        if outbox:
            self.on_outbox()

    async def on_features(self, touched: dict[str, set[str]]) -> list[Transition]:
        """Rules over features (error rate, spike, absence per entity) for entities a written
        batch just updated.

        Every worker records what it touched in a shared sorted set; one worker, the holder of
        the alert lease, evaluates them, so two workers never announce the same alert.
        """
        now = self.clock()
        seen_until = self.alerts.seen_until(now)
        watched: dict[str, set[str]] = {}
        for entity, names in self.watched.items():
            ids = {i for name in names for i in touched.get(name, ())}
            if ids:
                watched[entity] = ids
        if not watched:
            return []
        await self.retry.call(partial(self.store.watch, watched, now), "redis alert watch")
        if not await self.retry.call(self.store.hold_lease, "redis alert lease"):
            return []
        transitions = await self._evaluate_features(seen_until, watched, touched)
        await self.save(transitions)
        return transitions

    async def _evaluate_features(self, at: int, only: dict[str, set[str]] | None = None,
                                 arrived: dict[str, set[str]] | None = None,
                                 ) -> list[Transition]:
        """Read watched entities' features at ``at`` and feed the feature-driven rules
        (``arrived``: feature name -> ids the batch just wrote records of).

        Windows close as time passes, so the clock tick calls this too (``only`` None: every
        entity updated within the longest window): an error rate falls back under its threshold
        without any new event.
        """
        transitions: list[Transition] = []
        for entity, names in self.watched.items():
            if only is not None:
                ids = sorted(only.get(entity, ()))
            else:
                ids = await self.retry.call(partial(self.store.watched, entity,
                                                    at - self.watch_horizon_ms),
                                            "redis watched entities")
            if not ids:
                continue
            # Any: FeatureValue (a NamedTuple, read-only) is what FeatureReading describes
            readings: Any = await self.retry.call(
                partial(self.reader.get_many, entity, ids, names, at), "redis feature read")
            transitions += self.alerts.on_features(entity, readings, at, arrived)
        return transitions

    async def tick(self, now_ms: int | None = None, owned: Sequence[str] | None = None,
                   view: Callable[[], InputView] | None = None) -> list[Transition]:
        """Time passes with no record: ``for`` elapses, absences appear, silences end.

        ``view``: what the worker has seen of its input, measured once ``lock`` is held (so no
        batch is half-fed meanwhile); None: everything (replay).
        """
        async with self.lock:
            now = self.clock() if now_ms is None else now_ms
            return await self._tick(now, owned, None if view is None else view())

    async def _tick(self, now: int, owned: Sequence[str] | None,
                    view: InputView | None) -> list[Transition]:
        await self.refresh_silences(max_age_s=0)
        transitions: list[Transition] = []
        if view is not None:
            transitions += self.alerts.see(view, now)
        leader = await self.retry.call(self.store.hold_lease, "redis alert lease")
        if leader and self.watched:
            transitions += await self._evaluate_features(self.alerts.seen_until(now))
        transitions += self.alerts.tick(now, owned, include_unowned=leader)
        await self.save(transitions)
        return transitions

    async def save(self, transitions: list[Transition]) -> None:
        """Changed states and the outbox entries of ``transitions``, in one write."""
        entries = self.alerts.entries(transitions, wall_ms())
        changed = self.alerts.engine.take_dirty()
        if changed or entries:
            await self.retry.call(lambda: self.store.save(changed, entries), "redis alert save")
        if entries:
            self.on_outbox()
        for state, count in self.alerts.engine.summary().items():
            metrics.ALERTS.labels(state).set(count)
