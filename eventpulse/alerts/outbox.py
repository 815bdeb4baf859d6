"""Durable alert state, the notification outbox and silences, in Redis.

A transition is written to the outbox in the same atomic step as the alert state that produced it
(and, for record-driven transitions, as the Kafka offsets that fed it), so that a crash can neither
lose a decided notification nor decide it twice. Delivery drains the outbox in order.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from eventpulse.alerts.state import AlertState, Kind, Silence, Transition
from eventpulse.durations import wall_ms
from eventpulse.tables.keys import control_key

#: How long a delivery receipt dedupes a re-sent transition, and how long a resolve can still
#: find its firing message's thread.
RECEIPT_TTL_MS = 7 * 24 * 3_600_000
THREAD_TTL_MS = 30 * 24 * 3_600_000



@dataclass(frozen=True)
class OutboxEntry:
    """One transition waiting to be told; entries with the same ``group`` go out together."""

    key: str
    group: str
    rule: str
    channel: str
    transition: Transition
    not_before_ms: int
    decided_ms: int

    def to_json(self) -> str:
        data = asdict(self)
        return json.dumps(data, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> OutboxEntry:
        data = json.loads(raw)
        t = data["transition"]
        t["kind"] = Kind(t["kind"])
        data["transition"] = Transition(**t)
        return cls(**data)


@dataclass(frozen=True)
class ParkedEntry:
    entry: OutboxEntry
    reason: str
    parked_ms: int


def format_parked(item: ParkedEntry) -> str:
    """One readable line for a person deciding whether to retry."""
    t = item.entry.transition
    labels = ",".join(f"{k}={v}" for k, v in sorted(t.labels.items()) if k != "alertname")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(item.parked_ms / 1000))
    return (f"{item.entry.key}  {t.rule} {t.kind.value} {{{labels}}} to {item.entry.channel}"
            f"  parked {when} UTC: {item.reason}")


class AlertKeys:
    """Every alert key carries the control fence's hash tag (docs/redis-layout.md): the control
    slice writes states and outbox with that fence, and the multi-key steps (MULTI/EXEC, the
    receipts' MGET) stay within one Redis Cluster slot."""

    def __init__(self, namespace: str) -> None:
        self.state = control_key(namespace, "alerts:state")
        self.outbox = control_key(namespace, "alerts:outbox")
        self.attempts = control_key(namespace, "alerts:attempts")
        #: entries Slack refused for good (archived channel, invalid blocks...), with the reason
        self.parked = control_key(namespace, "alerts:parked")
        #: receipts and thread records are one key each, so that they expire on their own
        self.sent_prefix = control_key(namespace, "alerts:sent:")
        self.thread_prefix = control_key(namespace, "alerts:thread:")
        self.silences = control_key(namespace, "silences")
        self.lease = control_key(namespace, "alerts:lease")
        #: which worker posts to Slack: one at a time, so no post is in flight twice
        self.delivery_lease = control_key(namespace, "alerts:delivery-lease")
        self.watched_prefix = control_key(namespace, "alerts:watched:")


def encode_changes(keys: AlertKeys, states: dict[str, AlertState],
                   entries: list[OutboxEntry]) -> list[tuple[str, str, str, str]]:
    """The writes for states and outbox entries as (op, key, field, value) for ``apply.lua``."""
    ops = [("S", keys.state, fp, state.to_json()) for fp, state in states.items()]
    ops += [("R", keys.outbox, "", entry.to_json()) for entry in entries]
    return ops


#: How long the alert lease outlives its holder's last renewal (ticks renew every second).
LEASE_MS = 10_000
#: How long the delivery lease outlives its holder's last renewal. It is renewed before each
#: batch it posts, so it must outlast one post with the transport's retries (10 s timeouts):
#: after a holder dies, another worker delivers within this time.
DELIVERY_LEASE_MS = 30_000
#: Take the lease if free, renew it if ours: one atomic step, so a lease that expires between
#: checking and renewing cannot be renewed for someone else.
_HOLD_LEASE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class AlertStore:
    def __init__(self, client: aioredis.Redis, namespace: str) -> None:
        self.client = client
        self.keys = AlertKeys(namespace)
        self.holder = uuid.uuid4().hex
        self._hold_lease = client.register_script(_HOLD_LEASE)
        self._release_lease = client.register_script(_RELEASE_LEASE)

    async def hold_lease(self) -> bool:
        """True if this worker holds (or just took) the lease to evaluate feature-driven rules."""
        return bool(await self._hold_lease(keys=[self.keys.lease], args=[self.holder, LEASE_MS]))

    async def hold_delivery_lease(self) -> bool:
        """True if this worker holds (or just took) the lease to post to Slack. Several
        workers share one outbox; the receipts dedupe what was recorded, but not a post still
        in flight at another worker: only the holder posts."""
        return bool(await self._hold_lease(keys=[self.keys.delivery_lease],
                                           args=[self.holder, DELIVERY_LEASE_MS]))

    async def release_delivery_lease(self) -> None:
        """On a clean stop: hand delivery over at once instead of after the lease's time."""
        await self._release_lease(keys=[self.keys.delivery_lease], args=[self.holder])

    async def watch(self, entities: dict[str, set[str]], at_ms: int) -> None:
        """Note entities just updated, for whichever worker evaluates feature-driven rules."""
        async with self.client.pipeline(transaction=False) as pipe:
            for entity, ids in entities.items():
                pipe.zadd(self.keys.watched_prefix + entity, dict.fromkeys(ids, at_ms))
            await pipe.execute()

    async def watched(self, entity: str, since_ms: int) -> list[str]:
        key = self.keys.watched_prefix + entity
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zremrangebyscore(key, "-inf", f"({since_ms}")
            pipe.zrange(key, 0, -1)
            _, ids = await pipe.execute()
        return [i.decode() for i in ids]

    async def load_states(self) -> dict[str, AlertState]:
        raw: dict[Any, Any] = await self.client.hgetall(self.keys.state)
        return {k.decode(): AlertState.from_json(v) for k, v in raw.items()}

    async def save(self, states: dict[str, AlertState], entries: list[OutboxEntry]) -> None:
        """For wall-clock transitions, which no Kafka offset orders: one MULTI/EXEC."""
        if not states and not entries:
            return
        async with self.client.pipeline(transaction=True) as pipe:
            for fp, state in states.items():
                pipe.hset(self.keys.state, fp, state.to_json())
            for entry in entries:
                pipe.rpush(self.keys.outbox, entry.to_json())
            await pipe.execute()

    async def outbox(self, limit: int = 200) -> list[OutboxEntry]:
        raw: list[Any] = await self.client.lrange(self.keys.outbox, 0, limit - 1)
        return [OutboxEntry.from_json(r) for r in raw]

    async def sent_keys(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        if not keys:
            return {}
        raw = await self.client.mget([self.keys.sent_prefix + k for k in keys])
        return {k: json.loads(v) for k, v in zip(keys, raw, strict=True) if v is not None}

    async def mark_sent(self, entries: list[OutboxEntry], channel: str, ts: str | None,
                        thread_record: dict[str, Any] | None) -> None:
        """Record delivery and drop the entries from the outbox, atomically."""
        receipt = json.dumps({"channel": channel, "ts": ts, "at": wall_ms()})
        async with self.client.pipeline(transaction=True) as pipe:
            for entry in entries:
                pipe.set(self.keys.sent_prefix + entry.key, receipt, px=RECEIPT_TTL_MS)
                pipe.hdel(self.keys.attempts, entry.key)
                if thread_record is not None and entry.transition.kind == Kind.FIRING:
                    # the episode too: a resolve threads only under its own episode's firing
                    record = {**thread_record, "active_since": entry.transition.active_since}
                    pipe.set(self.keys.thread_prefix + entry.transition.fingerprint,
                             json.dumps(record), px=THREAD_TTL_MS)
                pipe.lrem(self.keys.outbox, 1, entry.to_json())
            await pipe.execute()

    async def note_attempt(self, keys: list[str], channel: str, thread_ts: str | None) -> None:
        """Before posting: where the message for these keys is about to go (a channel ID)."""
        record = json.dumps({"channel": channel, "thread_ts": thread_ts, "at": wall_ms()})
        await self.client.hset(self.keys.attempts, mapping=dict.fromkeys(keys, record))

    async def attempts(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        if not keys:
            return {}
        raw = await self.client.hmget(self.keys.attempts, keys)
        return {k: dict(json.loads(v)) for k, v in zip(keys, raw, strict=True) if v is not None}

    # -- parked entries ----------------------------------------------------------------------
    async def park(self, entries: list[OutboxEntry], reason: str) -> None:
        """Take entries Slack will never accept out of the outbox, with the reason, atomically:
        they wait for a person (``eventpulse alerts outbox``) instead of blocking the rest."""
        at = wall_ms()
        async with self.client.pipeline(transaction=True) as pipe:
            for entry in entries:
                record = {"entry": json.loads(entry.to_json()), "reason": reason, "parked_ms": at}
                pipe.hset(self.keys.parked, entry.key, json.dumps(record))
                pipe.hdel(self.keys.attempts, entry.key)
                pipe.lrem(self.keys.outbox, 1, entry.to_json())
            await pipe.execute()

    async def parked(self) -> list[ParkedEntry]:
        raw: dict[Any, Any] = await self.client.hgetall(self.keys.parked)
        out = []
        for value in raw.values():
            data = json.loads(value)
            entry = OutboxEntry.from_json(json.dumps(data["entry"]))
            out.append(ParkedEntry(entry, data["reason"], data["parked_ms"]))
        return sorted(out, key=lambda p: (p.entry.decided_ms, p.entry.transition.fingerprint,
                                          p.entry.transition.seq))

    async def pending_count(self) -> int:
        return int(await self.client.llen(self.keys.outbox))

    async def unpark(self, keys: list[str] | None = None) -> list[OutboxEntry]:
        """Put parked entries (all, or these keys) back in the outbox, to be posted anew: each
        before any newer entry of its alert still in the outbox (so the alert's order holds),
        else at the end; in the order they were decided."""
        chosen = [p.entry for p in await self.parked() if keys is None or p.entry.key in keys]
        if not chosen:
            return []
        async with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    # the deliverer may take entries meanwhile: a moved pivot starts over
                    await pipe.watch(self.keys.outbox)
                    raw: list[Any] = await pipe.lrange(self.keys.outbox, 0, -1)
                    pivots: dict[str, str] = {}
                    for item in raw:
                        entry_json = item.decode() if isinstance(item, bytes) else str(item)
                        fp = OutboxEntry.from_json(entry_json).transition.fingerprint
                        pivots.setdefault(fp, entry_json)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    for entry in chosen:
                        pipe.hdel(self.keys.parked, entry.key)
                        pivot = pivots.get(entry.transition.fingerprint)
                        if pivot is None:
                            pipe.rpush(self.keys.outbox, entry.to_json())
                        else:
                            pipe.linsert(self.keys.outbox, "BEFORE", pivot, entry.to_json())
                    await pipe.execute()
                    return chosen
                except redis.exceptions.WatchError:
                    continue

    async def thread_of(self, key: str) -> dict[str, Any] | None:
        """The message an alert fingerprint fired in, or a message's latest content."""
        raw = await self.client.get(self.keys.thread_prefix + key)
        return None if raw is None else dict(json.loads(raw))

    async def save_thread(self, key: str, record: dict[str, Any]) -> None:
        await self.client.set(self.keys.thread_prefix + key, json.dumps(record), px=THREAD_TTL_MS)

    # -- silences ----------------------------------------------------------------------------
    async def add_silence(self, matchers: dict[str, str], duration_ms: int, comment: str,
                          created_by: str) -> Silence:
        now = wall_ms()
        silence = Silence(uuid.uuid4().hex[:12], matchers, now, now + duration_ms, comment,
                          created_by)
        await self.client.hset(self.keys.silences, silence.id,
                               json.dumps(asdict(silence)))
        return silence

    async def silences(self, include_expired: bool = False) -> list[Silence]:
        raw: dict[Any, Any] = await self.client.hgetall(self.keys.silences)
        now = wall_ms()
        out = [Silence(**json.loads(v)) for v in raw.values()]
        return sorted((s for s in out if include_expired or s.ends_ms > now),
                      key=lambda s: s.starts_ms)

    async def expire_silence(self, silence_id: str) -> bool:
        raw = await self.client.hget(self.keys.silences, silence_id)
        if raw is None:
            return False
        data = json.loads(raw)
        data["ends_ms"] = min(data["ends_ms"], wall_ms())
        await self.client.hset(self.keys.silences, silence_id, json.dumps(data))
        return True
