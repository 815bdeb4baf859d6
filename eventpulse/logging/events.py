"""``log_event``: behaviour events with a timestamp and request id filled in."""

from __future__ import annotations

import contextvars
import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from eventpulse.logging.sender import KafkaSender

#: The current request's id; a middleware sets it so that every event of a request shares it.
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "eventpulse_request_id", default=None)


class EventLogger:
    """Builds behaviour events and queues them on a :class:`KafkaSender`."""

    def __init__(self, bootstrap_servers: str | Sequence[str], topic: str = "events",
                 **sender_options: Any) -> None:
        self.sender = KafkaSender(bootstrap_servers, topic, **sender_options)

    def log(self, action: str, user_id: str, **fields: Any) -> bool:
        """Queue one event; False if it was dropped (queue full). Never raises."""
        try:
            event = {"timestamp": datetime.now(UTC).isoformat(timespec="milliseconds"),
                     "action": action, "user_id": user_id,
                     "request_id": fields.pop("request_id", None) or request_id.get()
                     or uuid.uuid4().hex, **fields}
            return self.sender.submit(json.dumps(event, default=str).encode(), str(user_id).encode())
        except Exception:
            self.sender.count_drop()
            return False

    def close(self, timeout: float = 5.0) -> None:
        self.sender.close(timeout)


_default: EventLogger | None = None


def configure_events(bootstrap_servers: str | Sequence[str], topic: str = "events",
                     **sender_options: Any) -> EventLogger:
    """Set up the process-wide logger behind :func:`log_event`."""
    global _default
    if _default is not None:
        _default.close()
    _default = EventLogger(bootstrap_servers, topic, **sender_options)
    return _default


def log_event(action: str, user_id: str, **fields: Any) -> bool:
    """Send one behaviour event (``click``, ``view``...). Without :func:`configure_events`
    it is a no-op that returns False, so that libraries can call it unconditionally."""
    if _default is None:
        return False
    return _default.log(action, user_id, **fields)
