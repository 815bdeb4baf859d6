"""The Redis key layout, in one place (documented in docs/redis-layout.md).

Every key of one entity carries the same hash tag ``{entity:id}``, so that an entity's features
live in one Redis Cluster slot and one read touches one node.
"""

from __future__ import annotations


def entity_key(namespace: str, entity: str, entity_id: str) -> str:
    """The hash-tagged prefix every key of one entity starts with."""
    return f"{namespace}:{{{entity}:{entity_id}}}"


def features_key(namespace: str, entity: str, entity_id: str) -> str:
    """The entity's feature windows: one msgpack map, see :mod:`eventpulse.tables.ring`."""
    return entity_key(namespace, entity, entity_id) + ":f"


def features_keys(namespace: str, entity: str, entity_ids: list[str]) -> list[str]:
    """:func:`features_key` of many entities of one type: a read's MGET, built in one pass
    around the id (the layout stays in :func:`features_key`)."""
    before, after = features_key(namespace, entity, "\0").split("\0")
    return [f"{before}{entity_id}{after}" for entity_id in entity_ids]


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
    return f"{namespace}:meta"
