"""How much of its input the worker has seen: the consumer's fetch state -> an ``InputView``.

aiokafka updates a partition's high watermark, and the time of that update, only when a fetch
succeeds: while the broker does not answer, the worker looks caught up with an old watermark. So
a partition's view is a wall time of this worker: a time before which everything produced is
below the high watermark of a fetch that everything applied has reached. While behind, that is
the newest such fetch sampled earlier, or unknown: never an event time (a producer's clock, which
may run ahead) nor a record timestamp (also set by the producer). The worker's view is the oldest
over its partitions; it is unknown while rebalancing or before a partition's first fetch, and
capped at the time the group coordinator was lost while it is.

Which time of a fetch? aiokafka stamps a fetch (``last_poll_timestamp``) when the worker
*processes* its answer, which may be long after the broker answered: a fetch answered while the
worker was paused (SIGSTOP, a GC or VM pause, CPU throttling) and processed after looks fresh
while carrying the high watermark of before the pause. What is certain is when the request was
sent: aiokafka's fetcher sends a partition's next fetch only once the previous answer for it was
processed (one request in flight per broker, none while its records wait to be consumed), so a
fetch's high watermark reflects the log at some time after the *previous* fetch of that
partition was processed. That earlier stamp is the fetch's view time (``observe`` keeps it;
sampled often, so that fetches between two ticks are not missed, which would only make the view
older).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from eventpulse.alerts.blind import FRESH_MS, InputView

log = logging.getLogger("eventpulse.sight")

#: fetches remembered per partition while behind (one per clock tick): a backlog longer than
#: this many ticks is judged against the oldest kept, which only makes the view older
MARKS_KEPT = 3_600


class Cause(StrEnum):
    """Why the worker is blind (bounded: a metric label)."""

    REBALANCING = "rebalancing"
    NOT_FETCHED = "not_fetched"
    FETCH_STALLED = "fetch_stalled"
    BEHIND = "behind"
    COORDINATOR_LOST = "coordinator_lost"
    #: the applied position is past the partition's log end: the broker lost data, or the
    #: topic was recreated; the records there now are not the ones the position counts
    OFFSETS_AHEAD = "offsets_ahead"
    #: the clock has not measured the view lately: its tick waits on Redis (or a batch does)
    NOT_MEASURED = "not_measured"


@dataclass(frozen=True)
class PartitionFetch:
    """One assigned partition as the consumer knows it."""

    #: the high watermark of the last successful fetch (None: no fetch has succeeded yet)
    highwater: int | None
    #: wall time (ms) when that fetch's answer was processed (aiokafka's last poll timestamp)
    fetched_ms: int | None
    #: the next offset whose record has not reached the alert engine yet
    next_offset: int


@dataclass(frozen=True)
class InputStatus:
    """For health checks: is the worker blind, and why (``/readyz`` reasoning)."""

    blind: bool
    reason: str | None
    causes: frozenset[Cause]
    blind_seconds: float


class InputSight:
    """Measures the view; one per worker, asked once per clock tick."""

    def __init__(self, started_ms: int) -> None:
        self._caught_up: dict[str, int] = {}
        #: per partition, (high watermark, fetch time) of fetches not yet reached by what is
        #: applied, oldest first
        self._marks: dict[str, deque[tuple[int, int]]] = {}
        #: partitions whose position is past the log end, as (position, log end) last logged
        self._ahead: dict[str, tuple[int, int]] = {}
        self._last_seen_until: int | None = None
        self._unknown_since: int | None = started_ms
        self._coordinator_lost: int | None = None
        #: per partition: (the fetch stamp last seen, the different one seen before it)
        self._stamps: dict[str, tuple[int, int | None]] = {}
        self.last: InputView = InputView(None, started_ms, "starting")
        #: when the view was last measured (the clock's tick, which may wait on Redis)
        self.measured_ms = started_ms
        self.causes: frozenset[Cause] = frozenset({Cause.REBALANCING})

    def observe(self, partitions: Mapping[str, PartitionFetch]) -> None:
        """Note each partition's fetch stamp: a fetch's view time is the stamp of the one
        before it (the module's docstring says why). Call often; ``view`` calls it too."""
        for tp in self._stamps.keys() - partitions.keys():
            del self._stamps[tp]
        for tp, fetch in partitions.items():
            last = self._stamps.get(tp)
            if fetch.fetched_ms is None:
                self._stamps.pop(tp, None)
            elif last is None:
                self._stamps[tp] = (fetch.fetched_ms, None)
            elif last[0] != fetch.fetched_ms:
                self._stamps[tp] = (fetch.fetched_ms, last[0])

    def view(self, now_ms: int, partitions: Mapping[str, PartitionFetch], *, rebalancing: bool,
             coordinator_known: bool = True) -> InputView:
        self.observe(partitions)
        self.measured_ms = now_ms
        reasons: list[tuple[int | None, Cause, str]] = []  # (seen until, cause, words)
        if rebalancing:
            reasons.append((None, Cause.REBALANCING, "rebalancing: partitions not assigned"))
        if coordinator_known:
            self._coordinator_lost = None
        else:
            lost = self._coordinator_lost = self._coordinator_lost or now_ms
            reasons.append((lost, Cause.COORDINATOR_LOST,
                            f"group coordinator lost {(now_ms - lost) / 1000:.0f}s ago"))
        for known in (self._caught_up, self._marks, self._ahead):
            for tp in list(known):
                if tp not in partitions:
                    del known[tp]
        for tp, fetch in sorted(partitions.items()):
            reasons.append(self._partition(tp, fetch, now_ms))
        seen = [until for until, _, _ in reasons]
        if any(until is None for until in seen):
            seen_until = None
        else:
            seen_until = min([now_ms, *[u for u in seen if u is not None]])
        stale = [(until, cause, words) for until, cause, words in reasons
                 if until is None or now_ms - until > FRESH_MS]
        # the worst reason first: unknown, then the oldest
        stale.sort(key=lambda r: -1 if r[0] is None else r[0])
        reason = "; ".join(words for _, _, words in stale[:3]) or None
        if len(stale) > 3:
            reason = f"{reason}; and {len(stale) - 3} more"
        if seen_until is None:
            if self._unknown_since is None:
                self._unknown_since = self._last_seen_until or now_ms
        else:
            self._unknown_since = None
            self._last_seen_until = seen_until
        view = InputView(seen_until, self._unknown_since, reason, frozenset(self._ahead))
        causes = frozenset(cause for _, cause, _ in stale)
        if causes != self.causes:
            log.info("input %s", f"blind: {reason}" if reason else "seen")
        self.last, self.causes = view, causes
        return view

    def _partition(self, tp: str, fetch: PartitionFetch,
                   now_ms: int) -> tuple[int | None, Cause, str]:
        sent_after = self._stamps.get(tp, (0, None))[1]
        if fetch.highwater is None or sent_after is None:
            # no fetch, or only the first: when its request was sent is not known
            return None, Cause.NOT_FETCHED, f"{tp} not fetched yet"
        if fetch.next_offset > fetch.highwater:
            return self._offsets_ahead(tp, fetch.next_offset, fetch.highwater)
        if self._ahead.pop(tp, None) is not None:
            log.warning("%s: the log end passed the applied position again; reading on from "
                        "there (the new log's records below it were never applied)", tp)
        marks = self._marks.setdefault(tp, deque(maxlen=MARKS_KEPT))
        if not marks or marks[-1] != (fetch.highwater, sent_after):
            marks.append((fetch.highwater, sent_after))
        while marks and marks[0][0] <= fetch.next_offset:
            _, fetched = marks.popleft()  # everything below that fetch's high watermark applied
            self._caught_up[tp] = max(fetched, self._caught_up.get(tp, fetched))
        if fetch.next_offset >= fetch.highwater:
            age = (now_ms - sent_after) / 1000
            return sent_after, Cause.FETCH_STALLED, f"no fetch of {tp} answered for {age:.0f}s"
        behind = fetch.highwater - fetch.next_offset
        until = self._caught_up.get(tp)
        if until is None:
            return None, Cause.BEHIND, f"{tp} {behind} records behind, not caught up since assigned"
        return until, Cause.BEHIND, (f"{tp} {behind} records behind, "
                                     f"seen up to {(now_ms - until) / 1000:.0f}s ago")

    def _offsets_ahead(self, tp: str, position: int,
                       log_end: int) -> tuple[int | None, Cause, str]:
        """Redis says everything below ``position`` is applied, the broker's log ends before
        it: what the broker holds now was never applied, and what was applied is gone. Blind
        (the view is unknown, every data-driven rule is held) until a person acts."""
        if self._ahead.get(tp) != (position, log_end):
            if tp not in self._ahead:
                log.error(
                    "%s: Redis holds offsets applied up to %d, past the broker's log end %d: "
                    "the broker lost data or the topic was recreated. Its records are not "
                    "applied and data-driven alerts are held until a person resets the "
                    "position (docs/configuration.md, 'When eventpulse is blind')",
                    tp, position - 1, log_end)
            self._ahead[tp] = (position, log_end)
        return None, Cause.OFFSETS_AHEAD, (f"{tp} offsets ahead: applied up to {position - 1}, "
                                           f"past the log end {log_end}")

    def status(self, now_ms: int) -> InputStatus:
        """The last view as health checks and metrics want it, at ``now_ms``: it needs neither
        Redis nor the pipeline lock, so it keeps counting while the clock's tick waits on them
        (then the cause ``not_measured`` says the view is as old as its last measurement)."""
        blind_ms = self.last.blind_ms(now_ms)
        blind = blind_ms > 0 or self.last.seen_until_ms is None
        causes, reason = self.causes, self.last.reason
        unmeasured_ms = now_ms - self.measured_ms
        if blind and unmeasured_ms > FRESH_MS:
            causes = causes | {Cause.NOT_MEASURED}
            words = (f"input not measured for {unmeasured_ms / 1000:.0f}s "
                     "(the alert clock waits on Redis or on a batch)")
            reason = f"{words}; {reason}" if reason else words
        return InputStatus(blind, reason, causes, blind_ms / 1000)
