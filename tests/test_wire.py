"""One write, then the replies (eventpulse.tables.wire), against real redis-servers: replies in
order on RESP2 (hiredis' reader) and RESP3 (redis-py's path, the default of redis-py 8), a
key's error kept in place, any other error raised, and a server that dies mid-read a
connection error the retry policy waits out (an outside test saw a bare ConnectionResetError
reach the user: on RESP2 the socket's error came through as it was)."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from eventpulse.local.servers import LocalRedis
from eventpulse.redisretry import is_transient
from eventpulse.tables import wire

BUSY_LUA = "local t = redis.call('TIME')[1] + 3 while tonumber(redis.call('TIME')[1]) < t do end"


@pytest.mark.parametrize("protocol", [2, 3])
async def test_replies_in_order_key_errors_in_place(redis_url: str, protocol: int) -> None:
    client = aioredis.Redis.from_url(redis_url, protocol=protocol)
    try:
        await client.set("wire:s", "v")
        await client.hset("wire:h", mapping={"a": "1"})
        replies = await wire.round_trip(client, [
            ("GET", "wire:s"), ("HGETALL", "wire:s"), ("HGET", "wire:h", "a"),
            *[("INCR", "wire:n")] * 500])
        assert replies[0] == b"v" and replies[2] == b"1"
        assert isinstance(replies[1], redis.exceptions.ResponseError)  # WRONGTYPE, in place
        assert replies[3:] == list(range(1, 501))
        with pytest.raises(redis.exceptions.ResponseError, match="unknown command"):
            await wire.round_trip(client, [("PING",), ("NOSUCHCOMMAND",), ("PING",)])
        assert await wire.round_trip(client, [("GET", "wire:n")]) == [b"500"]  # in step
    finally:
        await client.aclose()


@pytest.mark.parametrize("protocol", [2, 3])
async def test_a_server_dying_mid_read_is_a_connection_error(protocol: int) -> None:
    with LocalRedis() as server:
        client = aioredis.Redis.from_url(server.url, protocol=protocol)
        try:
            read = asyncio.ensure_future(wire.round_trip(
                # 200 KB behind the script: left unread in the server's socket, its death is a
                # reset (ECONNRESET), not an end of stream
                client, [("EVAL", BUSY_LUA, 0), *[("SET", "wire:big", "x" * 2000)] * 100]))
            await asyncio.sleep(0.5)
            server.kill()
            with pytest.raises(redis.exceptions.ConnectionError) as caught:
                await read
            assert is_transient(caught.value)
        finally:
            await client.aclose()
