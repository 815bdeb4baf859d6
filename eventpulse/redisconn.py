"""One way to connect to Redis, standalone or Redis Cluster, chosen by the URL's scheme.

``redis://`` / ``rediss://`` / ``unix://`` reach one Redis (standalone, a Sentinel-managed or a
managed primary); ``redis+cluster://`` / ``rediss+cluster://`` reach a Redis Cluster through any
of its nodes (the client discovers the others and follows ``MOVED``/``ASK``). Everything else in
eventpulse takes the client this module returns and works on both: every key carries its fence
shard's hash tag (docs/redis-layout.md), so no command or script spans slots.

:func:`check_mode` runs at start-up: a cluster URL pointing at a standalone Redis, or the reverse,
stops the worker with one sentence naming ``EVENTPULSE_REDIS_URL`` and the fix.
"""

from __future__ import annotations

from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterPipeline as AsyncClusterPipeline
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import ClusterPipeline, RedisCluster
from redis.exceptions import ClusterDownError, RedisClusterException, RedisError, ResponseError

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
SCHEMES = {"redis", "rediss", "unix", *CLUSTER_SCHEMES}


class RedisModeError(RuntimeError):
    """The URL says cluster and the server is standalone, or the reverse; waiting won't help."""


def is_cluster_url(url: str) -> bool:
    return urlsplit(url).scheme in CLUSTER_SCHEMES


def _plain_url(url: str) -> str:
    """The cluster URL as redis-py's RedisCluster takes it (redis:// or rediss://)."""
    parts = urlsplit(url)
    if parts.path.strip("/") not in ("", "0"):
        raise RedisModeError("EVENTPULSE_REDIS_URL: a Redis Cluster has only database 0; "
                             "drop the /<db> from the redis+cluster:// URL")
    return urlunsplit((CLUSTER_SCHEMES[parts.scheme], parts.netloc, "", parts.query, ""))


def is_cluster(client: Any) -> bool:
    """True for a Redis Cluster client (sync or async, or one of their pipelines)."""
    return isinstance(client, AsyncRedisCluster | RedisCluster | AsyncClusterPipeline
                      | ClusterPipeline)


def connect_async(url: str, **kwargs: Any) -> aioredis.Redis:
    """An asyncio client for ``url``. A cluster client is typed as :class:`redis.asyncio.Redis`:
    it offers the same command, script and pipeline API eventpulse uses (``is_cluster`` tells
    them apart where routing matters: raw connections, multi-key reads)."""
    if is_cluster_url(url):
        return cast(aioredis.Redis, AsyncRedisCluster.from_url(_plain_url(url), **kwargs))
    return aioredis.Redis.from_url(url, **kwargs)


def connect(url: str, **kwargs: Any) -> redis.Redis:
    """The blocking twin of :func:`connect_async`."""
    if is_cluster_url(url):
        try:
            return cast(redis.Redis, RedisCluster.from_url(_plain_url(url), **kwargs))
        except RedisClusterException as exc:
            raise cluster_start_error(exc) from exc
    return redis.Redis.from_url(url, **kwargs)


def cluster_start_error(exc: RedisClusterException) -> BaseException:
    """What a cluster client's failed start means, as the error the rest of eventpulse knows.

    redis-py wraps every failure of its start (no node reachable, refused credentials, TLS
    spoken to a plain port, a slot no node serves) in one ``RedisClusterException``, which is
    not even a ``RedisError``: the retry policy did not wait out a node that was down, and
    commands reported it as unexpected. The error that made the start fail says what it was."""
    if "not enabled" in str(exc):
        return RedisModeError(TO_STANDALONE)
    cause = exc.__cause__
    if isinstance(cause, RedisError | OSError) and not isinstance(cause, RedisClusterException):
        return cause  # a connection refused or timed out, an authentication refused...
    if "not covered" in str(exc):  # a primary down and no replica promoted (yet)
        return ClusterDownError(str(exc))
    return exc


async def ping(client: aioredis.Redis) -> None:
    """PING one Redis, or every primary of a cluster: a batch's writes go to all of them, so one
    primary that does not answer stalls the worker (a PING to any one node, as redis-py sends
    it, said "reachable" two times out of three while one primary was frozen)."""
    if not is_cluster(client):
        await client.ping()
        return
    try:
        await client.ping(target_nodes=AsyncRedisCluster.PRIMARIES)
    except RedisClusterException as exc:
        raise cluster_start_error(exc) from exc


TO_STANDALONE = ("EVENTPULSE_REDIS_URL uses redis+cluster:// but the server is a standalone "
                  "Redis (cluster mode is not enabled): use redis:// (or rediss://)")
TO_CLUSTER = ("EVENTPULSE_REDIS_URL points at a Redis Cluster node: use redis+cluster:// "
               "(or rediss+cluster://) so that keys are routed to the node owning their slot")


async def check_mode(client: aioredis.Redis) -> None:
    """Raise :class:`RedisModeError` when the client's mode is not the server's. A standalone
    Redis refuses ``CLUSTER SLOTS`` ("cluster support disabled"): asked rather than ``INFO``,
    which the least-privilege users of tables/acl.py may not run."""
    if is_cluster(client):
        try:
            await cast(AsyncRedisCluster, client).initialize()
        except RedisClusterException as exc:
            raise cluster_start_error(exc) from exc
        return
    try:
        await client.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
    except ResponseError:  # "cluster support disabled": a standalone Redis, as the URL says
        return
    raise RedisModeError(TO_CLUSTER)


def check_mode_sync(client: redis.Redis) -> None:
    """:func:`check_mode` for a blocking client (cluster clients check when built)."""
    if is_cluster(client):
        return
    try:
        client.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
    except ResponseError:  # "cluster support disabled": a standalone Redis, as the URL says
        return
    raise RedisModeError(TO_CLUSTER)
