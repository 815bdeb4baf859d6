"""One write, then the replies: a round trip without redis-py's per-command path.

redis-py sends a command through its connection pool, its retry wrapper and a timer per reply,
and packs it argument by argument in Python. For the reads of a recommender (tens to hundreds
of commands per read) and the worker's writes (about a thousand scripts per 50k-event batch),
that path cost more client CPU than the work: here commands are packed by hiredis into one
buffer, sent in one write on a pooled connection, and the replies taken off hiredis' reader in
a loop under one timeout (docs/performance.md). Errors stay redis-py's own classes.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from redis.connection import Connection

from eventpulse.tables.replies import raise_read_errors, read_reply_async

try:
    import hiredis
except ImportError:  # pragma: no cover - hiredis is a dependency; redis-py packs without it
    hiredis = None  # type: ignore[assignment]

try:  # the sentinel redis-py's hiredis parser has its reader return for "more bytes needed"
    from redis._parsers.hiredis import NOT_ENOUGH_DATA
except ImportError:  # pragma: no cover - another redis-py layout: the per-reply path serves
    NOT_ENOUGH_DATA = None


def packed(commands: list[tuple[Any, ...]]) -> list[bytes]:
    """RESP for all commands in one buffer (one send), as the one-item list redis-py's
    ``send_packed_command`` takes; hiredis packs in C what redis-py packs arg by arg."""
    if hiredis is not None:
        return [b"".join([hiredis.pack_command(cmd) for cmd in commands])]
    return [b"".join(  # pragma: no cover
        chunk for cmd in commands for chunk in Connection().pack_command(*cmd))]


@contextlib.asynccontextmanager
async def pooled(client: aioredis.Redis) -> AsyncIterator[Any]:
    """A connection of ``client``'s pool (one Redis, not a cluster) for a run of round trips;
    dropped on any error, so that it never goes back to the pool with replies unread."""
    pool = client.connection_pool
    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        yield conn
    except BaseException:
        await conn.disconnect()
        raise
    finally:
        await pool.release(conn)


async def send(conn: Any, commands: list[tuple[Any, ...]]) -> None:
    """Write ``commands`` on ``conn`` in one write, now.

    Onto the open connection's stream directly: redis-py's ``send_packed_command`` runs the
    write under ``asyncio.wait_for`` when the client has a socket timeout, which makes it a task
    of its own and costs event-loop turns per write (the worker writes about a thousand waves
    per batch between the combiner's yields). The write is bounded by what the caller leaves
    unanswered; a connection that broke shows on the read of the replies, as redis-py's
    errors. A connection not yet open (or another redis-py layout) goes through redis-py."""
    writer = getattr(conn, "_writer", None)
    if writer is None or not conn.is_connected or writer.is_closing():
        await conn.send_packed_command(packed(commands), check_health=False)
        return
    writer.writelines(packed(commands))


async def round_trip(client: aioredis.Redis, commands: list[tuple[Any, ...]]) -> list[Any]:
    """Send ``commands`` in one write on a connection of ``client``'s pool (one Redis, not a
    cluster) and read their replies: each key error in place of its value, any other error
    raised (and the connection dropped, whatever it left unread)."""
    async with pooled(client) as conn:
        await send(conn, commands)
        return await read_replies_async(conn, len(commands))


async def read_replies_async(conn: Any, n: int) -> list[Any]:
    """``n`` replies of an asyncio connection, under one socket timeout for them all, each key
    error kept in place of its value (any other error raised).

    One timeout for the lot: redis-py's per-reply timeout (a timer armed and cancelled for each
    reply) cost more than parsing the reply (a read of 10 entities with a percentile feature
    has about 60). And with hiredis on RESP2, the replies come straight off its reader:
    redis-py's per-reply path (two coroutines and their checks) cost more than hiredis' parsing
    too (a training set's replay reads about 700,000). RESP3 (push messages may come between
    replies) and a parser without a hiredis reader take redis-py's path."""
    timeout = conn.socket_timeout
    if timeout is None:
        return await _read_replies(conn, n)
    try:
        async with asyncio.timeout(timeout):
            return await _read_replies(conn, n)
    except TimeoutError:  # what redis-py raises for a read that timed out
        raise redis.exceptions.TimeoutError(f"Timeout reading {n} replies") from None


async def _read_replies(conn: Any, n: int) -> list[Any]:
    parser: Any = getattr(conn, "_parser", None)
    reader = getattr(parser, "_reader", None)
    if (reader is None or NOT_ENOUGH_DATA is None or str(conn.protocol) == "3"
            or not getattr(parser, "_connected", False)):
        return [await read_reply_async(conn, timeout=math.inf) for _ in range(n)]
    gets, fill = reader.gets, parser.read_from_socket
    replies: list[Any] = []
    while len(replies) < n:
        reply = gets()
        if reply is NOT_ENOUGH_DATA:
            try:
                await fill()
            except OSError as exc:  # as redis-py words it: a connection error, retried as one
                raise redis.exceptions.ConnectionError(
                    f"Error while reading from Redis: {exc}") from exc
            continue
        if isinstance(reply, redis.exceptions.ConnectionError):
            raise reply
        replies.append(reply)
    return raise_read_errors(replies)
