"""The worker's own health, as Prometheus metrics (served on ``EVENTPULSE_METRICS_PORT``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

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
ALERTS = Gauge("eventpulse_alerts", "Alerts by state", ["state"])
NOTIFICATIONS_SENT = Counter("eventpulse_notifications_sent_total", "Notifications delivered",
                             ["kind"])
NOTIFICATIONS_FAILED = Counter("eventpulse_notifications_failed_total",
                               "Delivery attempts that failed (and will be retried)", ["reason"])
NOTIFICATIONS_RETRIED = Counter("eventpulse_notifications_retried_total",
                                "Delivery attempts made again after a failure")
NOTIFICATIONS_SUPPRESSED = Counter("eventpulse_notifications_suppressed_total",
                                   "Transitions not sent because a silence covered them")
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


def serve(port: int) -> None:
    if port:
        start_http_server(port, addr="0.0.0.0")
