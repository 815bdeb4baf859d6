"""The archive as a child process of the worker, supervised by it.

Why: the archive decodes every record again; inside the worker's interpreter that work takes
turns with the feature agent on one lock, which no OS priority can arbitrate. As a separate,
niced process it lags rather than slows the features when the cores are busy: in the calmest
measured rounds 1-7% of the features' throughput against 12-16% inline (docs/performance.md).
It stays "in the
worker" for whoever deploys it: started, restarted and stopped with it. The child is
``eventpulse archive`` with the worker's environment; it stops by itself when the worker is gone
(even after a SIGKILL), and the worker restarts it if it dies.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import mode

from eventpulse.settings import ARCHIVE_PARENT_VARIABLE

log = logging.getLogger("eventpulse.archive")


class ArchiveProcess(mode.Service):
    """Runs ``eventpulse archive`` and keeps it running."""

    def __init__(self, metrics_port: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.metrics_port = metrics_port
        self.process: subprocess.Popen[bytes] | None = None

    def _spawn(self) -> None:
        env = {**os.environ, "EVENTPULSE_METRICS_PORT": str(self.metrics_port),
               ARCHIVE_PARENT_VARIABLE: str(os.getpid())}
        self.process = subprocess.Popen([sys.executable, "-m", "eventpulse", "archive"], env=env)
        log.info("archive process %d started", self.process.pid)

    async def on_start(self) -> None:
        self._spawn()

    @mode.Service.task
    async def _supervise(self) -> None:
        while not self.should_stop:
            await self.sleep(1.0)
            process = self.process
            if process is not None and process.poll() is not None and not self.should_stop:
                log.warning("archive process exited with %s; restarting it", process.returncode)
                self._spawn()

    async def on_stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            await asyncio.to_thread(process.wait, 30)
        except subprocess.TimeoutExpired:
            process.kill()


def archive_metrics_port(settings: Any) -> int:
    """``EVENTPULSE_ARCHIVE_METRICS_PORT``, else the worker's metrics port + 1 (0: off)."""
    if settings.archive_metrics_port is not None:
        return int(settings.archive_metrics_port)
    return int(settings.metrics_port) + 1 if settings.metrics_port else 0


def exit_with_parent() -> None:
    """In the child: stop (as on SIGTERM) once the worker that started us is gone."""
    parent = os.environ.get(ARCHIVE_PARENT_VARIABLE)
    if not parent:
        return

    def watch() -> None:
        while os.getppid() == int(parent):
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="archive-parent-watch", daemon=True).start()
