"""The one retry policy for Redis calls: what is worth waiting out, how long to wait, and the
single log line when something will not heal.

Transient: the connection (refused, reset, timed out) and the server states that end by
themselves — ``BUSY`` (another client's script is running), ``LOADING`` (a restart reading its
data), ``MASTERDOWN`` (a replica lost its primary), ``TRYAGAIN`` and ``CLUSTERDOWN`` (a Redis
Cluster resharding or failing over; ``MOVED``/``ASK`` a cluster client could not follow by
itself, its slot map then refreshed). Anything else Redis answers (a wrong type, a missing
permission, a script error...) will answer the same next time: it is raised, after one clear
``CRITICAL`` line naming the call's purpose and the reply.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from eventpulse import cancellation, metrics

log = logging.getLogger("eventpulse.redis")
T = TypeVar("T")

#: error classes redis-py raises for states that pass
TRANSIENT_CLASSES: tuple[type[BaseException], ...] = (
    RedisConnectionError, RedisTimeoutError, BusyLoadingError, TryAgainError, ClusterDownError,
    MasterDownError, ConnectionError, OSError,
    # MOVED/ASK that redis-py's cluster client hands back (a MULTI/EXEC after a failover): it
    # refreshes its slot map on them, so the next attempt goes to the slot's new owner
    AskError)
#: first words of server replies that pass, for those redis-py maps to a plain ResponseError
#: (BUSY always; the others on a client that does not know them, e.g. outside cluster mode)
TRANSIENT_REPLIES = ("BUSY", "LOADING", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN")


#: how redis-py rewrites the reply of a pipeline's failed command:
#: ``Command # 1 (HMGET ...) of pipeline caused error: BUSY ...`` (or ``...error: ('BUSY ...',)``)
PIPELINE_PREFIX = " of pipeline caused error: "


def server_reply(exc: ResponseError) -> str:
    """The server's own reply, also when redis-py wrapped it in a pipeline's message."""
    text = str(exc)
    _, wrapped, reply = text.partition(PIPELINE_PREFIX)
    return reply.lstrip("(\"' ") if wrapped else text


def failure_name(exc: BaseException) -> str:
    """The error's type, and for a reply of the server its code (``ResponseError BUSY``): what
    a log line or a health page may say of it (a message could carry a host name or worse)."""
    name = type(exc).__name__
    if isinstance(exc, ResponseError):
        code = server_reply(exc).split(" ", 1)[0]
        if code.isalpha() and code.isupper():
            return f"{name} {code}"
    return name


def is_transient(exc: BaseException) -> bool:
    """True for an error that waiting can heal."""
    if isinstance(exc, TRANSIENT_CLASSES):
        return True
    return isinstance(exc, ResponseError) and server_reply(exc).startswith(TRANSIENT_REPLIES)


class RedisRetry:
    """Retries a Redis call on transient errors, with capped exponential backoff and jitter
    (redis-py's), for as long as it takes unless ``stopping()`` says to give up."""

    def __init__(self, base_s: float = 0.05, cap_s: float = 2.0,
                 stopping: Callable[[], bool] = lambda: False, address: str = "?") -> None:
        self.backoff = ExponentialWithJitterBackoff(base=base_s, cap=cap_s)
        self.stopping = stopping
        #: where the client connects (host:port/db, never a password), for the log line
        self.address = address

    async def call(self, fn: Callable[[], Awaitable[T]], what: str = "redis call") -> T:
        failures = 0
        self.backoff.reset()  # type: ignore[no-untyped-call]
        while True:
            try:
                result = await fn()
            except RedisError as exc:
                if not is_transient(exc):
                    log.critical("%s on redis at %s failed and will not heal by retrying: %s: %s",
                                 what, self.address, type(exc).__name__, exc)
                    raise
                await self._wait(exc, failures, what)
            except (ConnectionError, OSError) as exc:
                await self._wait(exc, failures, what)
            else:
                if failures:  # the warning said it was retrying: say that it went through
                    log.info("%s on redis at %s went through after %d retries", what,
                             self.address, failures)
                return result
            failures += 1

    async def _wait(self, exc: BaseException, failures: int, what: str) -> None:
        if cancellation.requested():  # a cancel that redis-py turned into an error
            raise asyncio.CancelledError from exc
        if self.stopping():
            raise exc
        delay = self.backoff.compute(failures)
        metrics.REDIS_RETRIES.inc()
        # one line per outage, then one every 20 attempts: a BUSY script can last seconds
        if failures % 20 == 0:
            log.warning("redis at %s unavailable (%s: %s) during %s; retrying", self.address,
                        type(exc).__name__, str(exc)[:120], what)
        await asyncio.sleep(delay)

