"""Layout 3 -> 4 (docs/redis-layout.md): every key moves under its fence shard's hash tag.

Layout 3 tagged an entity's keys with the entity (``ep:{user:u1}:f``) and left the meta hash and
the alert keys untagged; layout 4 puts an entity's keys under its shard's tag
(``ep:{s:56}:user:u1:f``) and the meta hash and alert keys under the control tag
(``ep:{s:ctl}:meta``, ``ep:{s:ctl}:alerts:state``...), so that each write script is one Redis
Cluster slot. A layout-3 namespace can only live on a single Redis (its writes spanned slots), where
a key renames to any other: one ``SCAN`` and one ``RENAME`` per key, values and TTLs kept.
Run at start-up, before any write; idempotent, so workers starting together may all run it.
"""

from __future__ import annotations

import logging

import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError

from eventpulse.redisconn import is_cluster
from eventpulse.tables.keys import (
    CONTROL_TAG,
    layout3_meta_key,
    meta_key,
    shard_entity_key,
    shard_of,
)

log = logging.getLogger("eventpulse.tables")

#: rename unless the new key exists (a layout-4 write got there first: the old value is older)
_MOVE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
redis.call('RENAME', KEYS[1], KEYS[2])
return 1
"""
#: layout 3's untagged keys that belong to the control slice
_CONTROL_PREFIXES = ("alerts:", "silences")


def new_name(namespace: str, key: str, shards: int) -> str | None:
    """Layout 4's name of a layout-3 key, or ``None`` for a key that stays (fences, registry,
    layout 1's per-entity hashes, which nothing reads any more)."""
    rest = key[len(namespace) + 1:]
    if key == layout3_meta_key(namespace):
        return meta_key(namespace)
    if rest.startswith(_CONTROL_PREFIXES):
        return f"{namespace}:{CONTROL_TAG}:{rest}"
    if not rest.startswith("{") or "}" not in rest:
        return None
    tag, _, suffix = rest[1:].partition("}")
    entity, _, entity_id = tag.partition(":")
    if entity == "s" or not suffix.startswith(":") or not entity_id:
        return None  # a layout-4 key (or a fence), or layout 1's hash
    return shard_entity_key(namespace, shard_of(entity, entity_id, shards), entity,
                            entity_id) + suffix


async def from_layout3(client: aioredis.Redis, namespace: str, shards: int) -> int:
    """Rename every layout-3 key of ``namespace``; returns how many moved."""
    if is_cluster(client):
        return 0
    layout = await client.hget(meta_key(namespace), "layout")
    if layout is not None and int(layout) >= 4:
        return 0
    # a Redis that held layout 2 or 3 has their untagged meta hash or alert keys: without any,
    # there is nothing to move (and no SCAN, which least-privilege users may not run)
    untagged = [layout3_meta_key(namespace), f"{namespace}:alerts:state",
                f"{namespace}:alerts:outbox", f"{namespace}:silences"]
    if not await client.exists(*untagged):
        return 0
    move = client.register_script(_MOVE)
    moved = kept = 0
    try:
        async for raw in client.scan_iter(match=f"{namespace}:*", count=1000):
            key = raw.decode() if isinstance(raw, bytes) else raw
            target = new_name(namespace, key, shards)
            if target is None:
                continue
            done = int(await move(keys=[key, target]))
            moved += done == 1
            kept += done == -1
    except NoPermissionError:
        # least privilege grants no SCAN: a Redis that never held layout 3 has nothing to move;
        # one that did needs this run once as a user who may SCAN (docs/redis-layout.md)
        log.warning("cannot SCAN namespace %r for layout-3 keys to move (the Redis user may "
                    "not SCAN); skipped", namespace)
    if moved or kept:
        log.warning("moved %d keys of namespace %r from layout 3 to layout 4 (%d left under "
                    "their old name: a layout-4 key of the same name existed)",
                    moved, namespace, kept)
    return moved
