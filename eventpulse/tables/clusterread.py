"""Feature reads on a Redis Cluster: each node's commands in one write, every node at once.

A read is an ``HGET`` of the meta hash, one ``MGET`` of the entities' feature maps and the
sketch reads. A cluster refuses an ``MGET`` over several slots, so it is cut into one ``MGET``
per slot; the commands are then grouped by the node owning their slot (redis-py's slot map),
packed per node into one buffer (hiredis), written to every node, and the replies read node by
node: one round trip per node, all nodes concurrently. redis-py's cluster pipeline does the same
with a per-command cost that tripled the read's latency, so it serves only as the fallback: when
a node answers ``MOVED``/``ASK`` (a resharding, a failover) or a connection fails, the read is
sent again through it, which follows the redirections and refreshes the slot map.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from redis.crc import key_slot
from redis.exceptions import AskError, ClusterDownError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

#: what sends a read through redis-py's cluster pipeline instead
REROUTE = (AskError, TryAgainError, ClusterDownError, RedisConnectionError, RedisTimeoutError,
           ConnectionError, OSError)
#: commands with their place in the read's reply list, per slot
Split = tuple[list[tuple[int, tuple[Any, ...]]], list[list[list[int]] | None]]


class Stats:
    """Reads sent again through the cluster pipeline (a redirection or a failed connection)."""

    rerouted = 0


def split(commands: list[tuple[Any, ...]]) -> Split:
    """Each command with its slot (MGETs cut per slot) and, per original command, where its
    per-slot MGET keys went (``None`` for a command sent whole)."""
    out: list[tuple[int, tuple[Any, ...]]] = []
    spread: list[list[list[int]] | None] = []
    for cmd in commands:
        if cmd[0] != "MGET":
            out.append((key_slot(_bytes(cmd[1])), cmd))
            spread.append(None)
            continue
        by_slot: dict[int, list[int]] = {}
        for at, key in enumerate(cmd[1:]):
            by_slot.setdefault(key_slot(_bytes(key)), []).append(at)
        for slot, ats in by_slot.items():
            out.append((slot, ("MGET", *(cmd[1 + at] for at in ats))))
        spread.append(list(by_slot.values()))
    return out, spread


def gather(results: list[Any], spread: list[list[list[int]] | None]) -> list[Any]:
    """The replies of :func:`split`'s commands as the single-node read would get them."""
    out: list[Any] = []
    it = iter(results)
    for parts in spread:
        if parts is None:
            out.append(next(it))
            continue
        values: list[Any] = [None] * sum(len(ats) for ats in parts)
        for ats in parts:
            for at, value in zip(ats, next(it), strict=True):
                values[at] = value
        out.append(values)
    return out


def _by_node(client: Any, cmds: list[tuple[int, tuple[Any, ...]]],
             ) -> dict[str, tuple[Any, list[int]]]:
    """node name -> (node, indexes of its commands), from the client's slot map."""
    nodes: dict[str, tuple[Any, list[int]]] = {}
    for i, (slot, _) in enumerate(cmds):
        node = client.nodes_manager.get_node_from_slot(slot)
        nodes.setdefault(node.name, (node, []))[1].append(i)
    return nodes


def read_sync(client: Any, commands: list[tuple[Any, ...]],
              pack: Callable[[list[tuple[Any, ...]]], list[bytes]]) -> list[Any]:
    cmds, spread = split(commands)
    try:
        results = _direct_sync(client, cmds, pack)
    except REROUTE:
        Stats.rerouted += 1
        results = _pipeline_sync(client, cmds)
    return gather(results, spread)


def _direct_sync(client: Any, cmds: list[tuple[int, tuple[Any, ...]]],
                 pack: Callable[[list[tuple[Any, ...]]], list[bytes]]) -> list[Any]:
    results: list[Any] = [None] * len(cmds)
    taken: list[tuple[Any, Any, list[int]]] = []
    try:
        for node, indexes in _by_node(client, cmds).values():
            pool = client.get_redis_connection(node).connection_pool
            conn = pool.get_connection()
            taken.append((pool, conn, indexes))
            conn.send_packed_command(pack([cmds[i][1] for i in indexes]))
        for _, conn, indexes in taken:
            for i in indexes:
                results[i] = conn.read_response()
    except BaseException:
        for _, conn, _ in taken:
            conn.disconnect()  # never hand back a connection with unread replies
        raise
    finally:
        for pool, conn, _ in taken:
            pool.release(conn)
    return results


def _pipeline_sync(client: Any, cmds: list[tuple[int, tuple[Any, ...]]]) -> list[Any]:
    pipe = client.pipeline(transaction=False)
    for _, cmd in cmds:
        pipe.execute_command(*cmd)
    return list(pipe.execute())


async def read_async(client: Any, commands: list[tuple[Any, ...]],
                     pack: Callable[[list[tuple[Any, ...]]], list[bytes]]) -> list[Any]:
    cmds, spread = split(commands)
    try:
        results = await _direct_async(client, cmds, pack)
    except REROUTE:
        Stats.rerouted += 1
        results = await _pipeline_async(client, cmds)
    return gather(results, spread)


async def _direct_async(client: Any, cmds: list[tuple[int, tuple[Any, ...]]],
                        pack: Callable[[list[tuple[Any, ...]]], list[bytes]]) -> list[Any]:
    if client._initialize:  # the slot map is loaded on first use
        await client.initialize()
    results: list[Any] = [None] * len(cmds)
    taken: list[tuple[Any, Any, list[int]]] = []

    async def read(conn: Any, indexes: list[int]) -> None:
        for i in indexes:
            results[i] = await conn.read_response()

    try:
        for node, indexes in _by_node(client, cmds).values():
            conn = node.acquire_connection()
            taken.append((node, conn, indexes))
            await conn.send_packed_command(pack([cmds[i][1] for i in indexes]))
        await asyncio.gather(*(read(conn, indexes) for _, conn, indexes in taken))
    except BaseException:
        for _, conn, _ in taken:
            await conn.disconnect()
        raise
    finally:
        for node, conn, _ in taken:
            node.release(conn)
    return results


async def _pipeline_async(client: Any, cmds: list[tuple[int, tuple[Any, ...]]]) -> list[Any]:
    pipe = client.pipeline(transaction=False)
    for _, cmd in cmds:
        pipe.execute_command(*cmd)
    return list(await pipe.execute())


def _bytes(key: Any) -> bytes:
    return key if isinstance(key, bytes) else str(key).encode()
