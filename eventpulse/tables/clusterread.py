"""Feature reads on a Redis Cluster: each node's commands in one write, every node at once.

A read is an ``HGET`` of the meta hash, one ``MGET`` of the entities' feature maps and the
sketch reads. A cluster refuses an ``MGET`` over several slots, so it is cut into one ``MGET``
per slot; the commands are then grouped by the node owning their slot (redis-py's slot map),
packed per node into one buffer (hiredis), written to every node, and the replies read node by
node: one round trip per node, all nodes concurrently.

The read's own cost is kept per node, not per key or per reply, because on a cluster it is
paid ~50 times (the 100 entities of a typical read fall in ~50 of the 64 shard slots):

- a key's slot comes from its hash tag, each tag's slot computed once per process
  (:func:`slot_of`; eventpulse's keys carry one of ``shards + 1`` tags);
- a slot's node is looked up once per read, in the client's slot map;
- a node's first reply is read through redis-py (it waits on the socket and turns a broken
  connection into redis-py's errors); the replies after it, already received with it, come
  straight out of the connection's hiredis reader, without redis-py's per-reply wrapping.

redis-py's cluster pipeline does the same with a per-command cost that tripled the read's
latency, so it serves only as the fallback: when a node answers ``MOVED``/``ASK`` (a
resharding, a failover) or a connection fails, the read is sent again through it, which follows
the redirections and refreshes the slot map. What the pipeline itself still meets while the
cluster settles (``TRYAGAIN``, a primary not yet replaced) sends it again a few times, with
backoff, before redis-py's error is raised.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from redis.backoff import ExponentialWithJitterBackoff
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from eventpulse.tables.replies import (
    is_key_error,
    raise_read_errors,
    read_reply,
    read_reply_async,
)

try:
    import hiredis
    from redis._parsers.hiredis import NOT_ENOUGH_DATA
except ImportError:  # pragma: no cover - redis[hiredis] is a dependency; replies one by one
    hiredis = None  # type: ignore[assignment]
    NOT_ENOUGH_DATA = object()
#: the module of redis-py's hiredis parsers (they set up their reader with NOT_ENOUGH_DATA)
_HIREDIS_PARSERS = "redis._parsers.hiredis"
#: a RESP3 push message (invalidation, maintenance notice) as hiredis hands it over
_PUSH: type | None = getattr(hiredis, "PushNotification", None)

#: what sends a read through redis-py's cluster pipeline instead (``MovedError`` is an
#: ``AskError``; a slot missing from the client's map asks the pipeline to reload it)
REROUTE = (AskError, TryAgainError, ClusterDownError, SlotNotCoveredError,
           RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)
#: what the cluster pipeline itself may still meet while a resharding or a failover settles
#: (``TRYAGAIN`` from a multi-key command on a slot half migrated, redirections it gave up
#: following, a primary not yet replaced): the read is sent through it again, a few times
SETTLING = (*REROUTE, ClusterError)
#: attempts through the pipeline, with waits between them of ~1 s at most in all; then
#: redis-py's error is raised (a reader wants an answer or an error, not an endless wait)
ATTEMPTS = 6
Command = tuple[Any, ...]
Pack = Callable[[list[Command]], list[bytes]]
#: hash tag -> slot; bounded so that keys with arbitrary tags cannot grow it without end
_TAG_SLOTS: dict[str, int] = {}
_TAG_SLOTS_MAX = 4096


class Stats:
    """Reads sent again through the cluster pipeline (a redirection or a failed connection)."""

    rerouted = 0


def slot_of(key: str | bytes) -> int:
    """The Redis Cluster slot of ``key`` (``redis.crc.key_slot``'s answer, UTF-8 for text):
    CRC16 of the hash tag (what lies between the first ``{`` and the next ``}``, when not
    empty), else of the whole key. A tag's slot is remembered: a read's keys share few tags."""
    if not isinstance(key, str):
        return key_slot(bytes(key))
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            tag = key[start + 1:end]
            slot = _TAG_SLOTS.get(tag)
            if slot is None:
                # UTF-8 never puts a brace inside a multi-byte character: the tag's bytes are
                # the bytes between the braces of the encoded key
                slot = key_slot(tag.encode())
                if len(_TAG_SLOTS) < _TAG_SLOTS_MAX:
                    _TAG_SLOTS[tag] = slot
            return slot
    return key_slot(key.encode())


class Route:
    """One read's commands cut per slot, and how their replies go back together.

    ``parts``: each per-slot command with its slot; ``targets``: for each part, the index of
    the command it comes from and, for a piece of an ``MGET``, the places of its keys in that
    command (``None`` for a command sent whole).
    """

    __slots__ = ("commands", "parts", "targets")

    def __init__(self, commands: list[Command]) -> None:
        self.commands = commands
        self.parts: list[tuple[int, Command]] = []
        self.targets: list[tuple[int, list[int] | None]] = []
        tags = _TAG_SLOTS
        for origin, cmd in enumerate(commands):
            if cmd[0] != "MGET":
                self.parts.append((slot_of(cmd[1]), cmd))
                self.targets.append((origin, None))
                continue
            # slot -> (the slot's MGET, the places of its keys in this one)
            by_slot: dict[int, tuple[list[Any], list[int]]] = {}
            for at, key in enumerate(cmd[1:]):
                # slot_of's remembered tags, looked up in line: this loop runs once per key
                slot = -1
                if type(key) is str:
                    start = key.find("{")
                    if start >= 0:
                        end = key.find("}", start + 1)
                        if end > start + 1:
                            slot = tags.get(key[start + 1:end], -1)
                if slot < 0:
                    slot = slot_of(key)
                part = by_slot.get(slot)
                if part is None:
                    by_slot[slot] = (["MGET", key], [at])
                else:
                    part[0].append(key)
                    part[1].append(at)
            for slot, (mget, places) in by_slot.items():
                self.parts.append((slot, tuple(mget)))
                self.targets.append((origin, places))

    def by_node(self, slots_cache: dict[int, list[Any]]) -> dict[str, tuple[Any, list[int]]]:
        """node name -> (node, indexes of its parts), from the client's slot map (its
        primaries: a read sees what the writer's fence wrote)."""
        nodes: dict[str, tuple[Any, list[int]]] = {}
        owner: dict[int, Any] = {}
        for i, (slot, _) in enumerate(self.parts):
            node = owner.get(slot)
            if node is None:
                holders = slots_cache.get(slot)
                if not holders:
                    raise SlotNotCoveredError(f"slot {slot} is not in the client's slot map")
                node = owner[slot] = holders[0]
            entry = nodes.get(node.name)
            if entry is None:
                nodes[node.name] = (node, [i])
            else:
                entry[1].append(i)
        return nodes

    def replies(self, results: list[Any]) -> list[Any]:
        """The parts' replies as the single-node read gets them, one per command."""
        out: list[Any] = [None] * len(self.commands)
        for origin, cmd in enumerate(self.commands):
            if cmd[0] == "MGET":
                out[origin] = [None] * (len(cmd) - 1)
        for (origin, places), result in zip(self.targets, results, strict=True):
            if places is None:
                out[origin] = result
                continue
            values = out[origin]
            for at, value in zip(places, result, strict=True):
                values[at] = value
        return out


def _reader(conn: Any) -> Any:
    """The connection's hiredis reader, where its replies can be taken from it directly, else
    None (replies then go one by one through ``read_response``)."""
    parser = conn._parser
    if hiredis is None or type(parser).__module__ != _HIREDIS_PARSERS:
        return None  # not the parser whose reader answers NOT_ENOUGH_DATA when it runs dry
    reader = getattr(parser, "_reader", None)
    return reader if isinstance(reader, hiredis.Reader) else None


def _buffered(reader: Any, results: list[Any], indexes: list[int], start: int,
              ) -> tuple[int, Any]:
    """Put the replies the reader already holds in place, from ``indexes[start]`` on. Returns
    where it stopped (the replies after it are still on the way) and the RESP3 push message
    that stopped it, if one did (the caller hands it to redis-py, as ``read_response`` does)."""
    at = start
    while at < len(indexes):
        reply = reader.gets()
        if reply is NOT_ENOUGH_DATA:
            break
        if isinstance(reply, Exception) and not is_key_error(reply):
            raise reply  # an error reply (MOVED, ASK...): as redis-py raises
        if _PUSH is not None and isinstance(reply, _PUSH):
            return at, reply
        results[indexes[at]] = reply
        at += 1
    return at, None


def read_sync(client: Any, commands: list[Command], pack: Pack) -> list[Any]:
    """The replies of ``commands`` from a blocking ``RedisCluster``."""
    route = Route(commands)
    try:
        results = _direct_sync(client, route, pack)
    except REROUTE:
        Stats.rerouted += 1
        results = _pipeline_sync(client, route)
    return route.replies(results)


def _direct_sync(client: Any, route: Route, pack: Pack) -> list[Any]:
    results: list[Any] = [None] * len(route.parts)
    taken: list[tuple[Any, Any, list[int]]] = []
    try:
        for node, indexes in route.by_node(client.nodes_manager.slots_cache).values():
            pool = client.get_redis_connection(node).connection_pool
            conn = pool.get_connection()
            taken.append((pool, conn, indexes))
            conn.send_packed_command(pack([route.parts[i][1] for i in indexes]))
        for _, conn, indexes in taken:
            reader = _reader(conn)
            at = 0
            while at < len(indexes):
                results[indexes[at]] = read_reply(conn)  # waits for more of the replies
                at += 1
                while reader is not None:
                    at, push = _buffered(reader, results, indexes, at)
                    if push is None:
                        break
                    conn._parser.handle_push_response(push)
    except BaseException:
        for _, conn, _ in taken:
            conn.disconnect()  # never hand back a connection with unread replies
        raise
    finally:
        for pool, conn, _ in taken:
            pool.release(conn)
    return results


def _backoff() -> ExponentialWithJitterBackoff:
    return ExponentialWithJitterBackoff(base=0.02, cap=0.5)


def _pipeline_sync(client: Any, route: Route) -> list[Any]:
    backoff = _backoff()
    for attempt in range(1, ATTEMPTS + 1):
        pipe = client.pipeline(transaction=False)
        for _, cmd in route.parts:
            pipe.execute_command(*cmd)
        try:
            return raise_read_errors(pipe.execute(raise_on_error=False))
        except SETTLING:
            if attempt == ATTEMPTS:
                raise
        time.sleep(backoff.compute(attempt))
    raise AssertionError("unreachable")  # pragma: no cover


async def read_async(client: Any, commands: list[Command], pack: Pack) -> list[Any]:
    """The replies of ``commands`` from an asyncio ``RedisCluster``."""
    route = Route(commands)
    try:
        results = await _direct_async(client, route, pack)
    except REROUTE:
        Stats.rerouted += 1
        results = await _pipeline_async(client, route)
    return route.replies(results)


async def _direct_async(client: Any, route: Route, pack: Pack) -> list[Any]:
    if client._initialize:  # the slot map is loaded on first use
        await client.initialize()
    results: list[Any] = [None] * len(route.parts)
    taken: list[tuple[Any, Any, list[int]]] = []
    try:
        for node, indexes in route.by_node(client.nodes_manager.slots_cache).values():
            conn = node.acquire_connection()
            taken.append((node, conn, indexes))
            await conn.send_packed_command(pack([route.parts[i][1] for i in indexes]))
        # every node has its commands: the nodes work at once while the replies are read one
        # node after the other (a task per node would only add its own cost)
        for _, conn, indexes in taken:
            reader = _reader(conn)
            at = 0
            while at < len(indexes):
                results[indexes[at]] = await read_reply_async(conn)
                at += 1
                while reader is not None:
                    at, push = _buffered(reader, results, indexes, at)
                    if push is None:
                        break
                    await conn._parser.handle_push_response(push)
    except BaseException:
        for _, conn, _ in taken:
            await conn.disconnect()
        raise
    finally:
        for node, conn, _ in taken:
            node.release(conn)
    return results


async def _pipeline_async(client: Any, route: Route) -> list[Any]:
    backoff = _backoff()
    for attempt in range(1, ATTEMPTS + 1):
        pipe = client.pipeline(transaction=False)
        for _, cmd in route.parts:
            pipe.execute_command(*cmd)
        try:
            return raise_read_errors(await pipe.execute(raise_on_error=False))
        except SETTLING:
            if attempt == ATTEMPTS:
                raise
        await asyncio.sleep(backoff.compute(attempt))
    raise AssertionError("unreachable")  # pragma: no cover
