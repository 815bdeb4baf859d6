"""Ship structured logs and behaviour events from a Python service to Kafka, without ever
blocking or crashing it.

    import logging
    from eventpulse.logging import KafkaHandler, configure_events, log_event

    logging.getLogger("inference").addHandler(
        KafkaHandler("kafka-1:9092", topic="inference"))
    configure_events("kafka-1:9092", topic="events")
    log_event(action="click", user_id="u1", item_id="i9", device="ios")

Nothing here imports the eventpulse worker; a service needs only this subpackage (and aiokafka,
python-json-logger).
"""

from eventpulse.logging.events import EventLogger, configure_events, log_event, request_id
from eventpulse.logging.handler import KafkaHandler

__all__ = ["EventLogger", "KafkaHandler", "configure_events", "log_event", "request_id"]
