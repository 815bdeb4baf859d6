"""How a Redis or a Kafka broker is named in logs and error messages: host, port (and database),
never the user name or password a URL may carry.

One place, so that the worker's retry log lines and the command line's error sentences name a
server the same way, and none of them can leak a secret.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit


def redis_url_address(url: str) -> str:
    """``redis://:secret@host:6380/2`` -> ``host:6380/2``; ``unix:///run/redis.sock`` -> the path."""
    try:
        parts = urlsplit(url)
        if parts.scheme == "unix":
            db = parse_qs(parts.query).get("db", ["0"])[0]
            return f"{parts.path}?db={db}" if db != "0" else parts.path
        port = parts.port or 6379
    except ValueError:  # a port that is not a number: say nothing of the rest, it may be secret
        return "an unparsable EVENTPULSE_REDIS_URL"
    return f"{parts.hostname or 'localhost'}:{port}/{parts.path.lstrip('/') or '0'}"


def redis_client_address(client: Any) -> str:
    """The address a redis-py client (sync or asyncio) connects to, from its pool's settings
    (a cluster client: the node it was given, which has no pool of its own)."""
    manager = getattr(client, "nodes_manager", None)
    if manager is not None and getattr(manager, "startup_nodes", None):
        return "cluster " + ",".join(sorted(manager.startup_nodes))
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", None) or {}
    db = kwargs.get("db", 0)
    if "path" in kwargs:
        return f"{kwargs['path']}?db={db}" if db else str(kwargs["path"])
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{db}"


def broker_address(bootstrap: Sequence[str]) -> str:
    """``["a:9092", "b:9092"]`` -> ``a:9092,b:9092`` (bootstrap servers carry no credentials:
    SASL secrets are settings of their own)."""
    return ",".join(bootstrap)
