"""Error replies that belong to one key of a read, not to the read.

A feature read asks for many keys at once. When one of them holds another type than eventpulse
writes there (a sketch's bucket key made a string by some other program), Redis refuses that
command alone with ``WRONGTYPE``; the other replies are fine. Such a reply is kept in place of
the value, so that the value it was for reads as ``missing`` and the rest of the read stands
(as with bins that are not numbers, docs/redis-layout.md). Every other error reply (a server
state, a refused command) still fails the read: it says nothing about one key.
"""

from __future__ import annotations

from typing import Any

from redis.exceptions import ResponseError


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


def raise_read_errors(replies: list[Any]) -> list[Any]:
    """``replies`` (a pipeline's, errors returned in place) unless one is an error that is not
    a key's: that one is raised."""
    for reply in replies:
        if isinstance(reply, Exception) and not is_key_error(reply):
            raise reply
    return replies
