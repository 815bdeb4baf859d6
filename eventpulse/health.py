"""Liveness, readiness and the metrics page, served from the worker's own event loop.

Why in the event loop and not in a thread (as ``prometheus_client.start_http_server`` does): a
worker whose loop is blocked or wedged consumes nothing, yet a thread would go on answering
``/healthz`` and ``/metrics`` as if all were well. Served from the loop, a blocked loop answers
nothing and the probe times out; on top of that a heartbeat task stamps the time every
``interval`` and ``/healthz`` fails when that stamp is older than its bound (a loop that runs
but starves its tasks).

- ``/healthz`` (liveness): only the process itself; never a dependency, or a Redis outage would
  restart every replica at once and fix nothing.
- ``/readyz`` (readiness): the checks the caller registers (partitions assigned, Redis reachable,
  progress); 503 with one line per reason when any fails.
- ``/metrics``: the Prometheus registry, as before.

This module knows nothing of Kafka or the pipeline: a check is a function of the monotonic
time returning a reason, or None when all is well.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from eventpulse.redisretry import failure_name

log = logging.getLogger("eventpulse.health")

#: now (time.monotonic()) -> a reason why not healthy / not ready, or None
Check = Callable[[float], str | None]
#: now -> several reasons (an empty list: fine)
MultiCheck = Callable[[float], Iterable[str]]


class Heartbeat:
    """A task stamps the time; stale stamps mean the loop no longer runs its tasks in time."""

    def __init__(self, max_age_s: float, interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if interval_s >= max_age_s:
            raise ValueError("the heartbeat interval must be shorter than its bound")
        self.max_age_s = max_age_s
        self.interval_s = interval_s
        self.clock = clock
        self.beat = clock()

    async def run(self) -> None:
        while True:
            self.beat = self.clock()
            await asyncio.sleep(self.interval_s)

    def reason(self, now: float) -> str | None:
        age = now - self.beat
        if age <= self.max_age_s:
            return None
        return f"event loop heartbeat is {age:.1f}s old (bound {self.max_age_s:g}s)"


class RedisWatch:
    """Pings Redis every ``interval``; not ready once no ping has succeeded for ``outage_s``.

    A short outage is ridden out (the pipeline retries its writes and replays exactly), so it
    must not flap readiness; a long one means this replica does nothing useful.
    """

    def __init__(self, ping: Callable[[], Awaitable[Any]], outage_s: float,
                 interval_s: float = 1.0, timeout_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ping = ping
        self.outage_s = outage_s
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.clock = clock
        #: when the first failed ping of the current outage was sent (None: reachable)
        self.down_since: float | None = None
        #: the last failure, by type (and Redis' reply code): a message could carry a host
        #: name or worse
        self.last_error = ""
        self.ever_reached = False

    async def check_once(self) -> bool:
        started = self.clock()
        try:
            await asyncio.wait_for(self.ping(), self.timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self.down_since is None:
                self.down_since = started
                log.warning("redis ping failed (%s); /readyz turns not ready if this lasts %gs",
                            failure_name(exc), self.outage_s)
            self.last_error = failure_name(exc)
            return False
        if self.down_since is not None:
            log.info("redis reachable again after %.1fs", self.clock() - self.down_since)
        self.down_since = None
        self.ever_reached = True
        return True

    async def run(self) -> None:
        while True:
            await self.check_once()
            await asyncio.sleep(self.interval_s)

    def reason(self, now: float) -> str | None:
        if self.down_since is None:
            return None
        down = now - self.down_since
        if down <= self.outage_s:
            return None
        return (f"redis unreachable for {down:.0f}s ({self.last_error}); "
                f"bound {self.outage_s:g}s")


class HealthServer:
    """An aiohttp app on the metrics port: ``/metrics``, ``/healthz`` and ``/readyz``."""

    def __init__(self, port: int, live: Sequence[Check], ready: Sequence[MultiCheck],
                 host: str = "0.0.0.0", registry: CollectorRegistry = REGISTRY,
                 describe: Callable[[], str] = lambda: "",
                 refresh: Callable[[], object] = lambda: None) -> None:
        self.port = port
        #: called before a page is answered: figures the worker publishes on its own schedule
        #: (which may not have started yet) are brought up to now
        self.refresh = refresh
        self.host = host
        self.live = list(live)
        self.ready = list(ready)
        self.registry = registry
        self.describe = describe
        self._runner: web.AppRunner | None = None

    def live_reasons(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        return [reason for check in self.live if (reason := check(now)) is not None]

    def ready_reasons(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        return [*self.live_reasons(now), *(r for check in self.ready for r in check(now))]

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        return app

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        log.info("metrics, /healthz and /readyz on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        self.refresh()
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return _answer("alive", "not alive", self.live_reasons(), "")

    async def _readyz(self, request: web.Request) -> web.Response:
        self.refresh()
        return _answer("ready", "not ready", self.ready_reasons(), self.describe())


def _answer(ok: str, not_ok: str, reasons: list[str], detail: str) -> web.Response:
    """Plain text: kubectl describe and docker inspect show the body as it is."""
    suffix = f" ({detail})" if detail else ""
    if reasons:
        return web.Response(status=503, text=f"{not_ok}{suffix}\n"
                            + "".join(f"- {reason}\n" for reason in reasons))
    return web.Response(text=f"{ok}{suffix}\n")
