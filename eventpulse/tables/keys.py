"""The Redis key layout, in one place (documented in docs/redis-layout.md).

Every key of one entity carries the same hash tag ``{entity:id}``, so that an entity's features
live in one Redis Cluster slot and one read touches one node.
"""

from __future__ import annotations


def entity_key(namespace: str, entity: str, entity_id: str) -> str:
    return f"{namespace}:{{{entity}:{entity_id}}}"


def hll_key(entity_hash: str, feature: str, window_end: int) -> str:
    return f"{entity_hash}:hll:{feature}:{window_end}"


def sketch_key(entity_hash: str, feature: str, window_end: int) -> str:
    return f"{entity_hash}:sk:{feature}:{window_end}"


def offsets_key(namespace: str, group: str) -> str:
    return f"{namespace}:offsets:{group}"


def meta_key(namespace: str) -> str:
    return f"{namespace}:meta"


def window_field(feature: str, window_end: int, suffix: str = "") -> str:
    return f"{feature}|{window_end}{suffix}"


def newest_field(feature: str) -> str:
    return f"{feature}|t"
