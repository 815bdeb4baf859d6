"""When eventpulse cannot see its input, rules over data are held: the view and the holds.

"Blind" means the alert engine may be missing input that already exists: the broker does not
answer fetches, the group coordinator is lost, no partitions are assigned (a rebalance), records
wait behind a backlog, or a fetched batch is prepared but its samples have not reached the engine
yet. An absence, a ratio or a spike judged then would be judged on data not seen yet, so each
data-driven rule is held while the view is older than that rule's own horizon (``after`` for an
absence, the window for a ratio or spike, ``for`` for a threshold), and for a settle period after
sight returns, so records that producers buffered meanwhile arrive before anything is judged.

Plain Python: the agents measure the view (``eventpulse.agents.sight``), this module decides.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from eventpulse.alerts.rules import AbsenceRule, RatioRule, Rule, SpikeRule, ThresholdRule

#: a view at most this old is "fresh": a fetch's view time is the stamp of the fetch before it
#: (fetches long-poll for half a second, so up to a second old), the view is measured once a
#: tick (a second) and a batch takes a moment to reach the engine; older than this the worker
#: counts as blind
FRESH_MS = 3_000
#: after sight returns, a held rule waits this long (or its horizon, if shorter) before it is
#: judged again: producers that buffered during a broker stall need a moment to flush
SETTLE_MAX_MS = 30_000
#: periods not judged live remembered per rule: older ones count as judged (a silence that
#: began before the oldest kept is not announced late; the clock judged it or could not)
UNJUDGED_KEPT = 64


@dataclass(frozen=True)
class InputView:
    """What the worker has seen of its input at one wall time.

    ``seen_until_ms``: every record produced before it has reached the alert engine (None: not
    known at all, e.g. during a rebalance). ``blind_since_ms``: since when the view has been
    unknown. ``reason``: why the view is old or unknown, for people (None when fresh).
    """

    seen_until_ms: int | None
    blind_since_ms: int | None = None
    reason: str | None = None
    #: partitions whose applied position is past their log end: the records the broker holds
    #: there now were never read, so no gap between samples across them can be judged
    skipping: frozenset[str] = field(default_factory=frozenset)

    def age_ms(self, now_ms: int) -> int | None:
        """How old the view is (None: unknown)."""
        if self.seen_until_ms is None:
            return None
        return max(0, now_ms - self.seen_until_ms)

    def blind_ms(self, now_ms: int) -> int:
        """How long the worker has not seen its input (0 while the view is fresh)."""
        age = self.age_ms(now_ms)
        if age is None:
            since = now_ms if self.blind_since_ms is None else self.blind_since_ms
            return max(0, now_ms - since)
        return age if age > FRESH_MS else 0


def horizon_ms(rule: Rule, window_sizes: Mapping[str, int]) -> int | None:
    """How old the view may be before ``rule`` is judged on data it has not seen.

    None: the rule never needs holding (a threshold without ``for`` changes only on samples).
    """
    if isinstance(rule, AbsenceRule):
        return rule.after
    if isinstance(rule, RatioRule):
        return window_sizes.get(rule.feature, 0) or FRESH_MS
    if isinstance(rule, SpikeRule):
        return window_sizes.get(rule.feature, 0) or FRESH_MS
    if isinstance(rule, ThresholdRule) and rule.for_ms > 0:
        return rule.for_ms
    return None


class Holds:
    """Which rules are held now; a held rule resumes only after the view has been fresh for
    its settle period, so a catch-up does not flap alerts.

    It also remembers which stretches of data time each rule's clock has not judged live (a
    held rule's clock does not look; before this process first looked at all, nothing was
    judged by it): a silence between two samples is announced late only where it overlaps
    such a stretch (``unjudged``). A gap the clock judged live was no silence (a producer's
    clock jump, one sample stamped in the future)."""

    def __init__(self, rules: Iterable[Rule], window_sizes: Mapping[str, int]) -> None:
        self.horizons = {rule.name: h for rule in rules
                         if (h := horizon_ms(rule, window_sizes)) is not None}
        self.held: set[str] = set()
        self._fresh_since: int | None = None
        #: per rule: data time its clock has judged live up to (absent: never, in this process)
        self._judged: dict[str, int] = {}
        #: per rule: closed stretches of data time (start, end) its clock did not judge live
        self._unjudged: dict[str, deque[tuple[int, int]]] = {}

    @property
    def shortest(self) -> int | None:
        return min(self.horizons.values(), default=None)

    def update(self, view: InputView, now_ms: int) -> None:
        age = view.age_ms(now_ms)
        fresh = age is not None and age <= FRESH_MS
        if not fresh:
            self._fresh_since = None
        elif self._fresh_since is None:
            self._fresh_since = now_ms
        was_held = self.held
        self.held = {name for name, horizon in self.horizons.items()
                     if age is None or age > horizon
                     or (name in self.held and self._settling(horizon, now_ms))}
        if view.seen_until_ms is None:
            return
        known = min(now_ms, view.seen_until_ms)
        for name in self.horizons.keys() - self.held:
            judged = self._judged.get(name)
            if judged is None or name in was_held:
                # judged live again from here: what lay between was not
                kept = self._unjudged.setdefault(name, deque(maxlen=UNJUDGED_KEPT))
                kept.append((0 if judged is None else judged, known))
            self._judged[name] = known if judged is None else max(judged, known)

    def unjudged(self, rule: str, start_ms: int, end_ms: int) -> bool:
        """Whether some of data time ``start_ms``..``end_ms`` was not judged live for
        ``rule``: not yet (past what its clock has judged), or while it was held."""
        if end_ms <= start_ms or rule not in self.horizons:
            return False
        judged = self._judged.get(rule)
        if judged is None or end_ms > judged:
            return True
        return any(start_ms < end and start < end_ms
                   for start, end in self._unjudged.get(rule, ()))

    def projected(self, view: InputView, now_ms: int) -> set[str]:
        """The rules held now if the view has not changed since it was last measured: what a
        tick would hold (for metrics while ticks wait on Redis; no tick judges anything then)."""
        age = view.age_ms(now_ms)
        return self.held | {name for name, horizon in self.horizons.items()
                            if age is None or age > horizon}

    def _settling(self, horizon: int, now_ms: int) -> bool:
        """Sight has not been back long enough for a rule that was held to be judged."""
        if self._fresh_since is None:
            return True
        return now_ms - self._fresh_since < min(horizon, SETTLE_MAX_MS)
