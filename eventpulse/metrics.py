"""The worker's own health, as Prometheus metrics (served on ``EVENTPULSE_METRICS_PORT`` by
:mod:`eventpulse.health`, beside ``/healthz`` and ``/readyz``)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from functools import partial

from prometheus_client import Counter, Gauge, Histogram

RECORDS = Counter("eventpulse_records_consumed_total", "Records read from Kafka", ["topic"])
APPLIED = Counter("eventpulse_records_applied_total", "Valid records applied to features", ["topic"])
REPLAYED = Counter("eventpulse_records_skipped_replayed_total",
                   "Records skipped because Redis already had their effect (after a crash)")
DEAD_LETTERS = Counter("eventpulse_dead_letters_total", "Refused records", ["topic", "reason"])
DEAD_LETTER_FAILURES = Counter(
    "eventpulse_dead_letter_failures_total",
    "Dead letters the broker refused for good (the record's partition moved on without one)",
    ["reason"])
DEAD_LETTER_RETRIES = Counter("eventpulse_dead_letter_retries_total",
                              "Dead-letter sends retried after a failure that can heal")
LATE = Counter("eventpulse_late_events_total", "Events later than allowed lateness", ["feature"])
BATCH_SECONDS = Histogram("eventpulse_batch_seconds", "Time to decode, combine and write a batch",
                          buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
BATCH_RECORDS = Histogram("eventpulse_batch_records", "Records per batch",
                          buckets=(1, 10, 100, 1000, 5000, 10000, 20000, 50000))
REDIS_RETRIES = Counter("eventpulse_redis_retries_total", "Redis writes retried after an error")
FENCE_CONFLICTS = Counter("eventpulse_offset_fence_conflicts_total",
                          "Batches rebuilt because another writer moved a partition on")
LAG_RECORDS = Gauge("eventpulse_consumer_lag_records", "Records behind the fetch high watermark",
                    ["topic", "partition"])
EVENT_TIME_LAG = Gauge("eventpulse_event_time_lag_seconds",
                       "Wall clock minus the newest event time applied")
FEATURE_FRESHNESS = Gauge("eventpulse_feature_freshness_seconds",
                          "Wall clock minus the newest event time applied to the feature, "
                          "by this worker", ["feature"])
READY = Gauge("eventpulse_ready", "1 while /readyz answers 200, else 0")
INPUT_BLIND_SECONDS = Gauge("eventpulse_input_blind_seconds",
                            "How long the worker has not seen (all of) its input; 0 when it does")
INPUT_VIEW_AGE = Gauge("eventpulse_input_view_age_seconds",
                       "Wall clock minus the time up to which all input reached alerting "
                       "(NaN while unknown: rebalancing, nothing fetched yet)")
INPUT_BLIND = Gauge("eventpulse_input_blind", "1 while the worker is blind, by cause",
                    ["cause"])
RULES_HELD = Gauge("eventpulse_alert_rules_held",
                   "Data-driven alert rules held because the worker cannot see its input")
ALERTS = Gauge("eventpulse_alerts", "Alerts by state", ["state"])
NOTIFICATIONS_SENT = Counter("eventpulse_notifications_sent_total", "Notifications delivered",
                             ["kind"])
NOTIFICATIONS_FAILED = Counter("eventpulse_notifications_failed_total",
                               "Delivery attempts that failed (and will be retried)", ["reason"])
NOTIFICATIONS_RETRIED = Counter("eventpulse_notifications_retried_total",
                                "Delivery attempts made again after a failure")
NOTIFICATIONS_SUPPRESSED = Counter("eventpulse_notifications_suppressed_total",
                                   "Transitions not sent because a silence covered them")
NOTIFICATIONS_PARKED = Counter("eventpulse_notifications_parked_total",
                               "Outbox entries Slack refused for good, parked for a person "
                               "(eventpulse alerts outbox)", ["reason"])
OUTBOX_PENDING = Gauge("eventpulse_outbox_pending", "Notifications waiting to be delivered")
OUTBOX_PARKED = Gauge("eventpulse_outbox_parked",
                      "Notifications parked until a person retries them (eventpulse alerts outbox)")
SLACK_CHANNELS_UNRESOLVED = Gauge("eventpulse_slack_channels_unresolved",
                                  "Configured Slack channels the bot cannot find (at start-up)")
DELIVERY_SECONDS = Histogram("eventpulse_notification_delivery_seconds",
                             "From deciding a transition to Slack accepting it",
                             buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300))


class DeliveryMetrics:
    """Hooks the alert deliverer calls (it does not import prometheus itself)."""

    def sent(self, kind: str, latency_s: float) -> None:
        NOTIFICATIONS_SENT.labels(kind).inc()
        DELIVERY_SECONDS.observe(latency_s)

    def failed(self, reason: str) -> None:
        NOTIFICATIONS_FAILED.labels(reason).inc()
        NOTIFICATIONS_RETRIED.inc()  # the outbox keeps the entry: every failure is retried

    def suppressed(self) -> None:
        NOTIFICATIONS_SUPPRESSED.inc()

    def parked(self, reason: str) -> None:
        NOTIFICATIONS_PARKED.labels(reason).inc()

    def outbox(self, pending: int, parked: int) -> None:
        OUTBOX_PENDING.set(pending)
        OUTBOX_PARKED.set(parked)

    def unresolved_channels(self, count: int) -> None:
        SLACK_CHANNELS_UNRESOLVED.set(count)


#: feature name -> newest event time (epoch ms) this process applied to it
_newest_event_ms: dict[str, int] = {}


def features_applied(newest_ms: Mapping[str, int]) -> None:
    """After a batch is written: its newest event time per feature. The gauge computes the
    age when scraped, so it keeps growing while a feature receives nothing."""
    for name, ts in newest_ms.items():
        known = _newest_event_ms.get(name)
        if known is None:
            FEATURE_FRESHNESS.labels(name).set_function(partial(_age_s, name))
        if known is None or ts > known:
            _newest_event_ms[name] = ts


def _age_s(name: str) -> float:
    return max(0.0, time.time() - _newest_event_ms[name] / 1000)
#: every cause of blindness, so each series exists (at 0) from the start
#: (``agents.sight.Cause``; a test checks the two agree)
BLIND_CAUSES = ("rebalancing", "not_fetched", "fetch_stalled", "behind", "coordinator_lost",
                "offsets_ahead", "not_measured")


def record_sight(blind_s: float, age_ms: int | None, causes: set[str], held: int) -> None:
    INPUT_BLIND_SECONDS.set(blind_s)
    INPUT_VIEW_AGE.set(float("nan") if age_ms is None else age_ms / 1000)
    for cause in BLIND_CAUSES:
        INPUT_BLIND.labels(cause).set(1 if cause in causes else 0)
    RULES_HELD.set(held)
