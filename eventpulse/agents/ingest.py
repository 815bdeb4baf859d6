"""Step 1 of a batch: raw Kafka records -> decoded records, combined into a write plan, and the
dead letters of the refused ones.

No I/O: the positions the plan is fenced by are given (the :class:`~eventpulse.agents.checkpoint.
Checkpoint` reads them from Redis), so this step runs, and is tested, without Redis or Kafka. It
calls the decoders (``streams.decode``, privacy included) and the combiner (``tables.batch``);
what it adds is the batch-level order: skip what Redis already holds, decode, dead-letter the
refusals, combine the rest, and keep the metric samples the alert engine has not seen.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from eventpulse import metrics
from eventpulse.config import JobConfig
from eventpulse.durations import wall_ms
from eventpulse.streams.deadletter import DeadLetter, make_dead_letter
from eventpulse.streams.decode import DecodeError, RecordDecoder
from eventpulse.streams.schemas import MetricSample
from eventpulse.tables.batch import (
    UNBOUNDED,
    BatchCombiner,
    BatchStats,
    Fence,
    PartitionPosition,
    WritePlan,
)
from eventpulse.tables.spec import CompiledFeature
from eventpulse.tables.writebounds import DEFAULT_SHARDS

log = logging.getLogger("eventpulse.pipeline")
#: records combined between two yields to the event loop: the previous batch's slices are
#: written meanwhile, each waiting for a yield to send the next (50 records: about 1 ms, the
#: Redis time of the one budget of waves in flight, so Redis is not left idle for long)
YIELD_EVERY = 50
#: event-loop turns per yield. A wave's reply takes at least two turns to become the next wave
#: on the wire (the socket read wakes the writing task, which writes the next one); at one turn
#: per yield that was several yields for a wave of about 1 ms of Redis work, and Redis sat idle
#: while the batch was combined. With the waves streamed on one connection, one or two turns
#: per yield still left the previous batch's write 0.1-0.2 s behind the combining of the next
#: (2026-12-02); four do not. A turn costs about 4 us.
TURNS_PER_YIELD = 4



class KafkaRecord(Protocol):
    """What a batch step needs of a Kafka record: aiokafka's ``ConsumerRecord`` as fetched
    (the worker passes those on as they are: copying 50k of them per batch into objects of
    our own cost 4% of the worker's time), or a :class:`RawRecord`."""

    @property
    def topic(self) -> str: ...

    @property
    def partition(self) -> int: ...

    @property
    def offset(self) -> int: ...

    @property
    def value(self) -> bytes | None: ...


@dataclass(slots=True)
class RawRecord:
    """A Kafka record made by hand (``replay`` reads them from files; tests)."""

    topic: str
    partition: int
    offset: int
    value: bytes | None


@dataclass
class Ingested:
    """A decoded and combined batch, not yet written."""

    records: Sequence[KafkaRecord]
    plan: WritePlan
    dead: list[tuple[str, DeadLetter]]
    #: metric samples to feed the alert engine before the write, with their partition
    samples: list[tuple[str, MetricSample]]
    stats: BatchStats
    #: per topic, records not applied: refused, or applied before (a replay)
    not_applied: Counter[str] = field(default_factory=Counter)
    #: newest offset per (topic, partition) once the plan is written: what Kafka may commit
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    #: newest event-time watermark over the batch's partitions
    watermark_ms: int | None = None


class _RecordFailed(Exception):
    """One record raised while being combined: where it is and the refusal it becomes."""

    def __init__(self, at: tuple[str, int, int], error: DecodeError) -> None:
        super().__init__(error.detail)
        self.at = at
        self.error = error


def _trial(scratch: BatchCombiner | None, tp: str, raw: KafkaRecord, record: Any,
           ) -> DecodeError | None:
    """Fold ``record`` into an empty scratch combiner: the refusal it earns if that raises."""
    assert scratch is not None
    scratch.reset({tp: None})
    try:
        scratch.add(tp, raw.topic, raw.offset, record)
    except Exception as exc:  # the record's own fault: the scratch combiner does no I/O
        return DecodeError("internal_error", f"{type(exc).__name__} while combining: "
                           f"{str(exc)[:300]}")
    return None


class Ingest:
    """Decodes and combines batches for one job; one per consumer loop (holds no batch)."""

    def __init__(self, job: JobConfig, namespace: str, privacy_secret: bytes | None = None,
                 check_clock: bool = True, *, shards: int = DEFAULT_SHARDS) -> None:
        self.namespace = namespace
        self.shards = shards
        self.features = [CompiledFeature(spec, i) for i, spec in enumerate(job.features)]
        self.pseudonymisers = job.pseudonymisers(privacy_secret)
        #: topic -> decoder (validation and privacy); a topic without one is not applied
        self.decoders = job.decoders(self.pseudonymisers, check_clock)

    async def __call__(self, records: Sequence[KafkaRecord], positions: Mapping[str, Fence],
                       max_cost: float = UNBOUNDED,
                       fed: Mapping[str, PartitionPosition] | None = None) -> Ingested:
        """Decode and combine ``records`` from ``positions`` (per ``topic:partition``, what
        Redis holds), cutting slices of at most ``max_cost``; ``fed``: where the batch before
        left each partition, when this one continues it (``BatchCombiner.reset``).

        A record that still raises while being combined (the decoder bounds what reaches the
        combiner, so this is the last line of defence) becomes a dead letter ``internal_error``
        and the batch is combined again without it: a record half-folded in must not leave half
        its effect. The combiner does no I/O, so whatever it raises comes from the record. The
        combining again tries each record on a scratch combiner first, so a batch full of such
        records costs two passes, not one per record.
        """
        poisoned: dict[tuple[str, int, int], DecodeError] = {}
        while True:
            try:
                batch = await self._combine_once(records, positions, max_cost, poisoned,
                                                 isolate=bool(poisoned), fed=fed)
            except _RecordFailed as failed:
                poisoned[failed.at] = failed.error
                continue
            for at, error in poisoned.items():
                log.error("record %s:%s@%s could not be combined, dead-lettered: %s", *at,
                          error.detail)
            for topic, letter in batch.dead:
                metrics.DEAD_LETTERS.labels(topic, letter.reason).inc()
            return batch

    async def _combine_once(self, records: Sequence[KafkaRecord], positions: Mapping[str, Fence],
                            max_cost: float, poisoned: dict[tuple[str, int, int], DecodeError],
                            isolate: bool = False,
                            fed: Mapping[str, PartitionPosition] | None = None) -> Ingested:
        # a combiner per batch: a batch rebuilt after a fence conflict may be combined while the
        # next one is (both yield to the event loop)
        combiner = BatchCombiner(self.namespace, self.features, positions, shards=self.shards,
                                 max_cost=max_cost, fed=fed)
        scratch = (BatchCombiner(self.namespace, self.features, shards=self.shards)
                   if isolate else None)
        dead: list[tuple[str, DeadLetter]] = []
        samples: list[tuple[str, MetricSample]] = []
        not_applied: Counter[str] = Counter()
        now = wall_ms()
        add = combiner.add
        # what the records of one partition share (a batch comes partition by partition): its
        # "topic:partition" name, position and decoder, looked up when the partition changes
        topic_at: str | None = None
        partition_at = -1
        tp = ""
        position = PartitionPosition()
        decoder: RecordDecoder | None = None
        for index, raw in enumerate(records):
            if index % YIELD_EVERY == 0:
                # let the event loop run between slices of a long batch: the Kafka fetcher then
                # sends the next fetch while this one is combined, and heartbeats keep going
                for _ in range(TURNS_PER_YIELD):
                    await asyncio.sleep(0)
            topic, offset = raw.topic, raw.offset
            if raw.partition != partition_at or topic != topic_at:
                topic_at, partition_at = topic, raw.partition
                tp = f"{topic}:{partition_at}"
                position = combiner.positions[tp]
                decoder = self.decoders.get(topic)
            if offset <= position.offset:  # applied before (a replay): not even decoded
                combiner.stats.skipped_replayed += 1
                not_applied[topic] += 1
                continue
            if decoder is None:
                not_applied[topic] += 1
                continue
            record = decoder.decode(raw.value, now)
            if poisoned and (topic, partition_at, offset) in poisoned:
                record = poisoned[(topic, partition_at, offset)]
            elif isolate and record.__class__ is not DecodeError:
                failure = _trial(scratch, tp, raw, record)
                if failure is not None:
                    record = poisoned[(topic, partition_at, offset)] = failure
            if record.__class__ is DecodeError:
                assert isinstance(record, DecodeError)
                add(tp, topic, offset, None)
                letter = make_dead_letter(record, raw.value, topic, partition_at, offset,
                                          self.pseudonymisers.get(topic))
                dead.append((topic, letter))
                not_applied[topic] += 1
                log.debug("dead letter %s:%s@%s: %s", topic, partition_at, offset,
                          record.reason)
                continue
            try:
                add(tp, topic, offset, record)
            except Exception as exc:  # see __call__: the record's own fault
                raise _RecordFailed((topic, partition_at, offset), DecodeError(
                    "internal_error", f"{type(exc).__name__} while combining: "
                    f"{str(exc)[:300]}")) from exc
            # a sample the control fence holds already moved the alert states Redis has
            if record.__class__ is MetricSample and not combiner.control_holds(tp, offset):
                samples.append((tp, record))
        batch = Ingested(records, combiner.plan(), dead, samples, combiner.stats, not_applied)
        for tp, position in combiner.positions.items():
            topic, _, partition = tp.rpartition(":")
            if position.offset >= 0:
                batch.offsets[(topic, int(partition))] = position.offset
            if position.watermark > (batch.watermark_ms or -(2**62)):
                batch.watermark_ms = position.watermark
        return batch
