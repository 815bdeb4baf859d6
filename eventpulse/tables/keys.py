"""The Redis key layout, in one place (documented in docs/redis-layout.md).

Layout 4: every key carries the hash tag of its fence shard (``{s:<k>}``, or ``{s:ctl}`` for the
control fence, the meta hash and the alert keys), so that each write script touches one Redis
Cluster slot: a shard's fence, its entities' feature maps and their sketch keys.
"""

from __future__ import annotations

from zlib import crc32

#: the hash tag of the control fence and of everything the control slice writes
CONTROL_TAG = "{s:ctl}"


def shard_of(entity: str, entity_id: str, shards: int) -> int:
    """The fence shard an entity belongs to: CRC-32 of ``<entity>:<id>`` (UTF-8) modulo the
    number of shards (docs/redis-layout.md). Stable across processes and languages."""
    return crc32(f"{entity}:{entity_id}".encode()) % shards


def shard_entity_key(namespace: str, shard: int, entity: str, entity_id: str) -> str:
    """The prefix every key of one entity starts with, under its shard's hash tag."""
    return f"{namespace}:{{s:{shard}}}:{entity}:{entity_id}"


def entity_key(namespace: str, entity: str, entity_id: str, shards: int) -> str:
    """:func:`shard_entity_key` of the entity's shard."""
    return shard_entity_key(namespace, shard_of(entity, entity_id, shards), entity, entity_id)


def features_key(namespace: str, entity: str, entity_id: str, shards: int) -> str:
    """The entity's feature windows: one msgpack map, see :mod:`eventpulse.tables.ring`."""
    return entity_key(namespace, entity, entity_id, shards) + ":f"


def shard_features_key(namespace: str, shard: int, entity: str, entity_id: str) -> str:
    """:func:`features_key` when the shard is known (the writer computed it already)."""
    return shard_entity_key(namespace, shard, entity, entity_id) + ":f"


def features_keys(namespace: str, entity: str, entity_ids: list[str], shards: int) -> list[str]:
    """:func:`features_key` of many entities of one type: a read's MGET, built in one pass
    around the shard and the id (the layout stays in :func:`shard_features_key`)."""
    before, after = shard_features_key(namespace, 0, entity, "\1").split("{s:0}", 1)
    head, tail = after.split("\1")
    seed = crc32(f"{entity}:".encode())
    return [f"{before}{{s:{crc32(i.encode(), seed) % shards}}}{head}{i}{tail}"
            for i in entity_ids]


def control_key(namespace: str, name: str) -> str:
    """A key the control slice writes (meta, alert state, outbox...), under the control tag."""
    return f"{namespace}:{CONTROL_TAG}:{name}"


def hll_key(entity_prefix: str, feature: str, bucket_start: int) -> str:
    return f"{entity_prefix}:hll:{feature}:{bucket_start}"


def sketch_key(entity_prefix: str, feature: str, bucket_start: int) -> str:
    return f"{entity_prefix}:sk:{feature}:{bucket_start}"


def offsets_key(namespace: str, group: str) -> str:
    """Layout 2's single offsets hash: read once, to migrate it into the shard fences."""
    return f"{namespace}:offsets:{group}"


def shard_tag(shard: int, shards: int) -> str:
    """The hash tag of one fence shard (``shards`` itself: the control fence). In a Redis
    Cluster every key of one shard is meant to share it (docs/design.md)."""
    return "{s:ctl}" if shard == shards else f"{{s:{shard}}}"


def fence_key(namespace: str, group: str, shard: int, shards: int) -> str:
    """One shard's applied positions for a consumer group: tp -> ``offset:watermark``."""
    return f"{namespace}:{shard_tag(shard, shards)}:fence:{group}"


def meta_key(namespace: str) -> str:
    """``observed_since``, ``layout``, ``shards``: written with the control fence."""
    return control_key(namespace, "meta")


def layout3_meta_key(namespace: str) -> str:
    """Layout 3's meta hash (untagged): read once, to migrate it."""
    return f"{namespace}:meta"
