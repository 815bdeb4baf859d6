"""Writes feature batches to Redis atomically, fenced by the partitions' applied offsets."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from eventpulse.tables.batch import PartitionPosition, WritePlan
from eventpulse.tables.client import registry_key
from eventpulse.tables.keys import meta_key, offsets_key
from eventpulse.tables.spec import FeatureSpec

APPLY_LUA = (resources.files("eventpulse.tables") / "lua" / "apply.lua").read_text()


@dataclass(frozen=True, slots=True)
class Conflict:
    """Another writer moved ``tp`` on: reload positions and rebuild the batch."""

    tp: str
    current: PartitionPosition


class FeatureStore:
    """The write side of the feature tables."""

    def __init__(self, client: aioredis.Redis, namespace: str, group: str) -> None:
        self.client = client
        self.namespace = namespace
        self.offsets_key = offsets_key(namespace, group)
        self.meta_key = meta_key(namespace)
        self._apply: AsyncScript = client.register_script(APPLY_LUA)

    async def positions(self, tps: Iterable[str]) -> dict[str, PartitionPosition | None]:
        names = list(tps)
        if not names:
            return {}
        raw = await self.client.hmget(self.offsets_key, names)
        return {tp: PartitionPosition.decode(v) if v is not None else None
                for tp, v in zip(names, raw, strict=True)}

    async def publish(self, specs: Iterable[FeatureSpec]) -> None:
        """Publish feature definitions so that readers need no copy of the YAML."""
        mapping: dict[Any, Any] = {s.name: s.model_dump_json() for s in specs}
        key = registry_key(self.namespace)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            if mapping:
                pipe.hset(key, mapping=mapping)
            await pipe.execute()

    async def apply(self, plan: WritePlan) -> Conflict | None:
        if plan.is_empty:
            return None
        result = await self._apply(keys=[self.offsets_key, self.meta_key, *plan.keys], args=plan.argv)
        status = _text(result[0])
        if status == "ok":
            return None
        return Conflict(_text(result[1]), PartitionPosition.decode(_text(result[2]) or None))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
