"""eventpulse: Kafka events in, real-time ML features in Redis and on-call alerts in Slack out."""

__version__ = "0.1.0"
