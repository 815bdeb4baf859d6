"""The alert lifecycle: inactive -> pending -> firing -> resolved, in plain Python.

No I/O and no clock of its own: the caller says what was observed and what time it is (event time
of the newest record, or wall time when the stream is quiet), and gets back the transitions to
announce. The live worker and ``eventpulse replay`` drive this same class, which is why a replay
predicts exactly what the worker will send.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum

from eventpulse.alerts.rules import AbsenceRule, RatioRule, Rule, SpikeRule, ThresholdRule


class Phase(StrEnum):
    INACTIVE = "inactive"
    PENDING = "pending"
    FIRING = "firing"


class Kind(StrEnum):
    FIRING = "firing"
    RESOLVED = "resolved"
    REMINDER = "reminder"


def fingerprint(rule: str, labels: dict[str, str]) -> str:
    """Stable identity of one alert (a rule and one label set), as Alertmanager does."""
    body = json.dumps([rule, sorted(labels.items())], separators=(",", ":"))
    return hashlib.sha1(body.encode()).hexdigest()[:16]


@dataclass
class AlertState:
    rule: str
    labels: dict[str, str]
    phase: Phase = Phase.INACTIVE
    active_since: int | None = None
    fired_at: int | None = None
    last_notified: int | None = None
    last_seen: int | None = None
    #: when a sample of an absence rule's series was last read (the worker's clock; None: not
    #: known, as in replay): a series whose samples keep arriving is not absent, however far
    #: behind its producer's clock stamps them
    last_read: int | None = None
    value: float | None = None
    #: Kafka partition whose records last fed this alert; wall-clock ticks are evaluated only by
    #: the worker that owns it, so two workers never announce the same alert.
    partition: str | None = None
    seq: int = 0
    #: True while a firing was held back by a silence: announce it when the silence ends.
    held: bool = False
    held_until: int | None = None
    #: why, in words, for alerts whose cause is not in their labels (the input-blind alert)
    note: str | None = None
    #: an absence series whose next sample follows records never read (skipped offsets): the
    #: gap before it is not judged. Kept with the state, so a restart in between keeps it too
    across_skip: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> AlertState:
        """The state as :meth:`to_json` wrote it; fields a newer version added are ignored, so
        that workers of two versions can share a group during a rolling upgrade from this one
        on (fields this version added read as their defaults in states older ones wrote)."""
        data = json.loads(raw)
        data["phase"] = Phase(data["phase"])
        return cls(**{name: value for name, value in data.items() if name in _STATE_FIELDS})


_STATE_FIELDS = frozenset(AlertState.__dataclass_fields__)


@dataclass(frozen=True)
class Transition:
    """One thing to tell people. ``key`` is unique per (alert, transition): the outbox's id."""

    fingerprint: str
    rule: str
    kind: Kind
    at_ms: int
    seq: int
    labels: dict[str, str]
    value: float | None
    active_since: int | None
    #: set: the transition is recorded but not sent, a silence covers it until then
    silenced_until: int | None = None
    #: set: this firing was held by a silence that ended then (the message says so)
    silence_ended_ms: int | None = None
    note: str | None = None

    @property
    def key(self) -> str:
        return f"{self.fingerprint}:{self.seq}:{self.kind.value}"


@dataclass(frozen=True)
class Silence:
    id: str
    matchers: dict[str, str]
    starts_ms: int
    ends_ms: int
    comment: str = ""
    created_by: str = ""

    def covers(self, labels: dict[str, str], at_ms: int) -> bool:
        if not self.starts_ms <= at_ms < self.ends_ms:
            return False
        return all(labels.get(k) == v for k, v in self.matchers.items())


@dataclass
class Observation:
    """What a rule saw for one series at one time; ``value`` None means 'cannot tell'."""

    rule: Rule
    labels: dict[str, str]
    value: float | None
    at_ms: int
    partition: str | None = None
    threshold: float | None = None
    note: str | None = None
    #: when the sample was read (None: not known, as in replay): a notification it causes is
    #: sent then, and reminders count ``repeat_interval`` from then, as Alertmanager does from
    #: its last notification; ``at_ms`` (its stamp, data time) is when the condition began
    read_ms: int | None = None


@dataclass
class AlertEngine:
    """All alert states of this worker, and the rules that drive them."""

    rules: list[Rule]
    states: dict[str, AlertState] = field(default_factory=dict)
    silences: list[Silence] = field(default_factory=list)
    dirty: set[str] = field(default_factory=set)
    #: (rule, start, end) -> whether some of that data time was not judged live by the clock
    #: (``Holds.unjudged``); None: nothing was (only a gap the clock could not judge is a
    #: silence announced late)
    unjudged: Callable[[str, int, int], bool] | None = None

    def __post_init__(self) -> None:
        self.by_name = {rule.name: rule for rule in self.rules}

    # -- feeding -----------------------------------------------------------------------------
    def observe(self, obs: Observation) -> list[Transition]:
        rule = obs.rule
        labels = {**obs.labels, **rule.labels, "alertname": rule.name}
        fp = fingerprint(rule.name, labels)
        state = self.states.get(fp)
        if state is None:
            if obs.value is None or not self._is_bad(rule, obs.value, Phase.INACTIVE):
                return []  # nothing to remember about a healthy series we never alerted on
            state = self.states[fp] = AlertState(rule.name, labels)
        state.last_seen = obs.at_ms
        if obs.partition is not None:
            state.partition = obs.partition
        state.value = obs.value
        if obs.note is not None:
            state.note = obs.note
        self.dirty.add(fp)
        bad = obs.value is not None and self._is_bad(rule, obs.value, state.phase)
        # notified when read, or at the stamp of a sample stamped ahead of the reader's clock
        now = obs.at_ms if obs.read_ms is None else max(obs.read_ms, obs.at_ms)
        return self._step(fp, state, rule, bad, now, seen=obs.at_ms)

    def tick(self, now_ms: int, owned: Iterable[str] | None = None,
             include_unowned: bool = True, seen_until_ms: int | None = None,
             ) -> list[Transition]:
        """Advance time: ``for`` elapses, reminders fall due, silences end, absences appear.

        ``owned``: partitions this worker owns (None = all, as in replay); states fed by no
        partition (feature-driven rules) are advanced only with ``include_unowned``.
        ``seen_until_ms``: input produced before it has all been seen; an absence is judged up
        to there, not up to now, so a sample still on its way does not count as missing, and
        ``for`` elapses up to there: a pending alert fires only once the input has been seen up
        to its activeSince + ``for`` (the sample that ends it may still be on its way).
        """
        known = now_ms if seen_until_ms is None else min(now_ms, seen_until_ms)
        owned_set = None if owned is None else set(owned)
        out: list[Transition] = []
        for fp, state in list(self.states.items()):
            if state.partition is None:
                if not include_unowned:
                    continue
            elif owned_set is not None and state.partition not in owned_set:
                continue
            rule = self.by_name.get(state.rule)
            if rule is None:
                continue
            since = None
            if isinstance(rule, AbsenceRule):
                # absent in data time (stamps, up to what was seen) and, where the read times
                # are known, in arrival time too: a producer whose clock is behind by more
                # than `after` stamps every sample "too old", yet its samples keep coming
                bad = (state.last_seen is not None and known - state.last_seen >= rule.after
                       and (state.last_read is None or now_ms - state.last_read >= rule.after))
                if state.last_seen is not None:
                    # absent since then, however late the clock could tell (as a late
                    # announced silence says too); by the read time where that is later (a
                    # clock behind: its stamps would start the silence, and `for`, too early)
                    since = max(state.last_seen, state.last_read or state.last_seen) + rule.after
            else:
                bad = state.phase != Phase.INACTIVE and state.value is not None and self._is_bad(
                    rule, state.value, state.phase)
            out += self._step(fp, state, rule, bad, now_ms, known, since)
        return out

    def skipping(self, partition: str) -> None:
        """Records of ``partition`` are being skipped (never read): the gap its series' next
        samples leave cannot be judged, so it is not announced."""
        for fp, state in self.states.items():
            if (state.partition == partition and not state.across_skip
                    and isinstance(self.by_name.get(state.rule), AbsenceRule)):
                state.across_skip = True
                self.dirty.add(fp)

    def seen(self, rule: AbsenceRule, labels: dict[str, str], at_ms: int,
             partition: str | None = None, now_ms: int | None = None,
             reread: bool = False) -> list[Transition]:
        """A sample or event arrived for an absence rule's series: it is present again.
        ``now_ms``: when it was read (it cannot have been sent later, whatever its stamp).
        ``reread``: ``at_ms`` is the newest event of a feature read again (every tick): the
        same stamp as last time is the same event, not a new one (each re-read resolved the
        absence and the next tick fired it again, found by an outside test); a newer one
        arrived by ``now_ms``, whatever its stamp (a producer whose clock is behind by more
        than ``after`` flapped the same way while its events kept coming)."""
        full = {**labels, **rule.labels, "alertname": rule.name}
        fp = fingerprint(rule.name, full)
        state = self.states.get(fp)
        if state is None:
            state = self.states[fp] = AlertState(rule.name, full)
        if reread and state.last_seen is not None and at_ms <= state.last_seen:
            return []  # the newest event read before (nothing newer arrived since)
        if now_ms is not None and (state.last_read is None or now_ms > state.last_read):
            state.last_read = now_ms  # it arrived, even stamped out of order
            self.dirty.add(fp)
        if state.last_seen is not None and at_ms < state.last_seen:
            return []
        if state.across_skip:
            state.across_skip = False
            out = []
        else:
            out = self._missed_absence(fp, state, rule, at_ms, partition, now_ms)
        state.last_seen = at_ms
        if partition is not None:
            state.partition = partition
        self.dirty.add(fp)
        # resolved when read (or at its stamp, if stamped ahead of the reader's clock), as
        # observe() notifies: a clock behind must not stamp the resolve before the firing
        now = at_ms if now_ms is None else max(at_ms, now_ms)
        return out + self._step(fp, state, rule, False, now, seen=at_ms)

    def _missed_absence(self, fp: str, state: AlertState, rule: AbsenceRule, at_ms: int,
                        partition: str | None, now_ms: int | None) -> list[Transition]:
        """A silence the clock never judged: the series was absent from ``last_seen + after``
        until this sample, in data time, but eventpulse could not see it then (worker down, a
        backlog, the input blind) and now sees it already over. It is announced once: fired,
        then resolved by this sample. Only between two samples of one partition, whose order
        is the log's: samples of one series spread over partitions arrive out of order during
        a catch-up, and a gap between them would be no silence. Only where the clock did not
        judge it live (``unjudged``), and only up to when the sample was read: a sample stamped
        in the future (a producer's clock jump) ends no silence the clock was watching."""
        previous = state.last_seen
        if (previous is None or partition is None or state.partition != partition
                or state.phase == Phase.FIRING):
            return []
        absent_from = previous + rule.after
        absent_to = at_ms if now_ms is None else min(at_ms, now_ms)
        if absent_to - absent_from < max(rule.for_ms, 1):
            return []
        if self.unjudged is not None and not self.unjudged(rule.name, absent_from, absent_to):
            return []
        # pending from when the absence began, firing once `for` had elapsed in data time
        return (self._step(fp, state, rule, True, at_ms, seen=absent_from)
                + self._step(fp, state, rule, True, at_ms, seen=at_ms))

    # -- lifecycle ---------------------------------------------------------------------------
    @staticmethod
    def _is_bad(rule: Rule, value: float, phase: Phase) -> bool:
        if isinstance(rule, ThresholdRule | RatioRule):
            return not rule.is_clear(value) if phase == Phase.FIRING else rule.is_bad(value)
        if isinstance(rule, SpikeRule):
            return value > rule.factor
        return False

    def _step(self, fp: str, state: AlertState, rule: Rule, bad: bool, now: int,
              seen: int | None = None, since: int | None = None) -> list[Transition]:
        """``seen``: the input is seen up to there (None: up to ``now``); data time, in which
        a condition starts and ``for`` elapses. ``since``: when a condition found bad began,
        if known (an absence: its last sample + ``after``). Notifications happen at ``now``."""
        out: list[Transition] = []
        silence_end = self.silenced_until(state.labels, now)
        seen = now if seen is None else min(now, seen)
        if state.phase == Phase.INACTIVE and bad:
            state.phase = Phase.PENDING
            state.active_since = seen if since is None else min(seen, since)
            self.dirty.add(fp)
        if state.phase == Phase.PENDING:
            if not bad:
                state.phase, state.active_since = Phase.INACTIVE, None  # never notified: silent
                self.dirty.add(fp)
            elif seen - (seen if state.active_since is None else state.active_since) >= rule.for_ms:
                state.phase, state.fired_at = Phase.FIRING, now
                out.append(self._announce(fp, state, Kind.FIRING, now, silence_end))
        elif state.phase == Phase.FIRING:
            if not bad:
                was_held = state.held
                resolved = self._transition(fp, state, Kind.RESOLVED, now, None)
                state.phase, state.active_since, state.fired_at = Phase.INACTIVE, None, None
                state.held = False
                if not was_held:  # a firing nobody was told about needs no resolve
                    out.append(resolved)
            elif state.held and silence_end is None:
                ended = state.held_until
                announced = self._announce(fp, state, Kind.FIRING, now, None)
                out.append(replace(announced, silence_ended_ms=ended))
            elif (not state.held and state.last_notified is not None
                  and now - state.last_notified >= rule.repeat_interval) and silence_end is None:
                out.append(self._transition(fp, state, Kind.REMINDER, now, None))
                state.last_notified = now
        return out

    def _announce(self, fp: str, state: AlertState, kind: Kind, now: int,
                  silence_end: int | None) -> Transition:
        """A firing: sent now, or held while a silence covers it (evaluated, not sent)."""
        state.held = silence_end is not None
        state.held_until = silence_end
        transition = self._transition(fp, state, kind, now, silence_end)
        if not state.held:
            state.last_notified = now
        return transition

    def _transition(self, fp: str, state: AlertState, kind: Kind, now: int,
                    silenced_until: int | None) -> Transition:
        state.seq += 1
        self.dirty.add(fp)
        return Transition(fp, state.rule, kind, now, state.seq, dict(state.labels), state.value,
                          state.active_since, silenced_until, note=state.note)

    def silenced_until(self, labels: dict[str, str], at_ms: int) -> int | None:
        ends = [s.ends_ms for s in self.silences if s.covers(labels, at_ms)]
        return max(ends) if ends else None

    def take_dirty(self) -> dict[str, AlertState]:
        changed = {fp: self.states[fp] for fp in self.dirty if fp in self.states}
        self.dirty.clear()
        return changed

    def summary(self) -> dict[str, int]:
        counts = {phase.value: 0 for phase in Phase}
        for state in self.states.values():
            counts[state.phase.value] += 1
        return counts
