"""The Faust worker of eventpulse: a stop on SIGTERM/SIGINT bounded in time, Ctrl-C exits 130.

Faust stops its services in order, and each may wait for the outside world: the record agent for
its batch in flight (a Redis write, a dead letter), aiokafka for the group coordinator it leaves
and the records it flushes. With the broker or Redis gone, those waits have no end (measured
before this: over 15 s ignoring SIGTERM), and an orchestrator then kills the worker anyway.

Ending the process hard is safe here: Redis holds the applied offsets, Kafka's commit comes
after, so a worker killed mid-batch loses nothing (the SIGKILL tests prove it). The bound only
makes that outcome come on time, with a log line saying so.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any

import faust

log = logging.getLogger("eventpulse.worker")

#: exit status of a stop that did not finish in time (EX_SOFTWARE)
EXIT_STOP_TIMEOUT = 70


class BoundedWorker(faust.Worker):
    """``faust.Worker`` that exits within ``stop_timeout_s`` of the first stop signal (or of the
    stop starting, whichever comes first), and remembers a Ctrl-C so that the process can exit
    130 after its clean stop, as shells expect."""

    def __init__(self, app: faust.App, *services: Any, stop_timeout_s: float,
                 **kwargs: Any) -> None:
        super().__init__(app, *services, **kwargs)
        self.stop_timeout_s = stop_timeout_s
        self.interrupted = False
        self._watchdog: threading.Timer | None = None

    def _on_sigterm(self) -> None:
        self.arm_watchdog()
        super()._on_sigterm()

    def _on_sigint(self) -> None:
        self.interrupted = True
        self.arm_watchdog()
        super()._on_sigint()

    async def on_stop(self) -> None:
        self.arm_watchdog()
        await super().on_stop()

    def arm_watchdog(self) -> None:
        """Start the countdown (once): a daemon thread, so a blocked event loop cannot stop it."""
        if self._watchdog is not None:
            return
        self._watchdog = threading.Timer(self.stop_timeout_s, self._expire)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _expire(self) -> None:
        log.error("stop did not finish within %.1fs (EVENTPULSE_STOP_TIMEOUT_S); exiting now: "
                  "the batch in flight is not committed and will be read again",
                  self.stop_timeout_s)
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        os._exit(EXIT_STOP_TIMEOUT)
