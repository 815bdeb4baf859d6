"""Whether the running task was asked to stop, whatever a library made of the request.

redis-py's asyncio client can turn a cancellation that reaches it while its connection is being
closed into a ``ConnectionError`` (seen with redis 8.1 on Python 3.11). A loop that retries on
connection errors then keeps running after its task was cancelled: a deliverer that outlives
its worker and delivers someone else's alerts, or a Redis retry that never gives up on shutdown.
``Task.cancelling()`` still counts the request, so those loops ask here before retrying.
"""

from __future__ import annotations

import asyncio


def requested() -> bool:
    """True inside a task that has been cancelled, even if the CancelledError was swallowed."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
