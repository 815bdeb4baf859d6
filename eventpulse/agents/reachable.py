"""Start Kafka clients when the broker is not there yet: wait and retry, saying where.

A worker started before its broker (a compose file, a broker restart, a typo in the address)
should neither die with ``KafkaConnectionError: Unable to bootstrap`` nor wait silently: it logs
which address it cannot reach and tries again, with a growing delay, for as long as it takes, the
way the pipeline waits for Redis.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError, NodeNotReadyError

from eventpulse.addresses import broker_address

log = logging.getLogger("eventpulse.worker")
T = TypeVar("T")
#: What a broker that is down, still starting, or not listening at that address raises.
UNREACHABLE = (KafkaConnectionError, KafkaTimeoutError, NodeNotReadyError, OSError)
FIRST_DELAY_S = 0.5
MAX_DELAY_S = 10.0


async def until_reachable(start: Callable[[], Awaitable[T]], bootstrap: Sequence[str], what: str,
                          stopping: Callable[[], bool] = lambda: False) -> T:
    """``await start()`` until the broker answers; ``start`` must clean up after itself when it
    fails (a fresh client per attempt), as a half-started aiokafka client cannot be restarted."""
    delay = FIRST_DELAY_S
    while True:
        try:
            return await start()
        except UNREACHABLE as exc:
            if stopping():
                raise
            log.warning("Kafka broker at %s unreachable (%s) while starting the %s; "
                        "retrying in %.1fs", broker_address(bootstrap), _reason(exc), what, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_DELAY_S)


def _reason(exc: BaseException) -> str:
    """aiokafka's "Unable to bootstrap from [('127.0.0.1', 9092, <AddressFamily...>)]" says
    nothing the address does not; other errors keep their own words."""
    if isinstance(exc, KafkaConnectionError):
        return "no connection"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
