"""Error replies that belong to one key of a read, not to the read.

A feature read asks for many keys at once. When one of them holds another type than eventpulse
writes there (a sketch's bucket key made a string by some other program), Redis refuses that
command alone with ``WRONGTYPE``; the other replies are fine. Such a reply is kept in place of
the value, so that the value it was for reads as ``missing`` and the rest of the read stands
(as with bins that are not numbers, docs/redis-layout.md). Every other error reply (a server
state, a refused command) still fails the read: it says nothing about one key.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import redis.exceptions
from redis.exceptions import ResponseError

try:  # the sentinel redis-py's hiredis parser has its reader return for "more bytes needed"
    from redis._parsers.hiredis import NOT_ENOUGH_DATA
except ImportError:  # pragma: no cover - another redis-py layout: the per-reply path serves
    NOT_ENOUGH_DATA = None


def is_key_error(reply: Any) -> bool:
    """True for an error reply about the content of the key the command named."""
    return isinstance(reply, ResponseError) and str(reply).startswith("WRONGTYPE")


def read_reply(conn: Any, **options: Any) -> Any:
    """The next reply on a blocking connection; a key's error reply comes back as the value."""
    try:
        return conn.read_response(**options)
    except ResponseError as exc:  # read whole: the connection stays in step
        if not is_key_error(exc):
            raise
        return exc


async def read_reply_async(conn: Any, **options: Any) -> Any:
    """:func:`read_reply` on an asyncio connection."""
    try:
        return await conn.read_response(**options)
    except ResponseError as exc:
        if not is_key_error(exc):
            raise
        return exc


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
            await fill()
            continue
        if isinstance(reply, redis.exceptions.ConnectionError):
            raise reply
        replies.append(reply)
    return raise_read_errors(replies)


def raise_read_errors(replies: list[Any]) -> list[Any]:
    """``replies`` (a pipeline's, errors returned in place) unless one is an error that is not
    a key's: that one is raised."""
    for reply in replies:
        if isinstance(reply, Exception) and not is_key_error(reply):
            raise reply
    return replies
