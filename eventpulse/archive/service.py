"""The archive service: its own consumer group, parquet segments, offsets committed after upload.

It runs in the worker beside the feature agent but shares nothing with it but the process: its
own Kafka consumer group (``<group>-archive``), so a store outage only holds back the archive's
own offsets while features and alerts go on. Records are decoded and pseudonymised by the same
decoders as the feature pipeline (:meth:`JobConfig.decoders`); the clock check uses the record's
broker timestamp instead of the wall clock, so that whether a record is valid does not depend on
when it is archived (a replay a week later keeps it).

Order per landing: cut marker, data files, then the Kafka commit. A crash anywhere re-reads from
the last commit and rewrites the same names with the same bytes (see segment.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import mode
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from eventpulse import cancellation
from eventpulse.archive import metrics
from eventpulse.archive.layout import KindLayout, cut_path, decode_cut, encode_cut
from eventpulse.archive.segment import CutRules, PartitionSegmenter, Segment
from eventpulse.archive.store import ArchiveStore, S3Options
from eventpulse.archive.writer import encode
from eventpulse.config import JobConfig
from eventpulse.streams.decode import DecodeError, RecordDecoder
from eventpulse.streams.topics import RecordKind

log = logging.getLogger("eventpulse.archive")
T = TypeVar("T")


class ArchiveSettingsError(ValueError):
    pass


@dataclass(frozen=True)
class ArchiveOptions:
    url: str
    topics: list[str]
    rules: CutRules
    idle_flush_ms: int
    s3: S3Options

    @classmethod
    def from_settings(cls, settings: Any, job: JobConfig) -> ArchiveOptions | None:
        """None when ``EVENTPULSE_ARCHIVE_URL`` is unset; a clear error for unknown topics."""
        if not settings.archive_url:
            return None
        topics = ([t.strip() for t in settings.archive_topics.split(",") if t.strip()]
                  if settings.archive_topics else list(job.topics))
        unknown = sorted(set(topics) - set(job.topics))
        if unknown or not topics:
            raise ArchiveSettingsError(
                f"EVENTPULSE_ARCHIVE_TOPICS: {unknown or 'no topic'} not among the job's topics "
                f"{sorted(job.topics)}; list some of those, or unset it to archive them all")
        return cls(settings.archive_url, topics,
                   CutRules(settings.archive_max_records, settings.archive_max_bytes,
                            settings.archive_max_span_ms),
                   settings.archive_idle_flush_ms,
                   S3Options(settings.archive_s3_endpoint, settings.archive_s3_region,
                             settings.archive_s3_access_key_id,
                             settings.archive_s3_secret_access_key))


class _Partition:
    """What the service keeps per assigned partition."""

    def __init__(self, tp: TopicPartition, rules: CutRules, committed: int | None = None,
                 ) -> None:
        # the first segment starts at the committed offset, where the last one landed ended
        self.segmenter = PartitionSegmenter(tp.topic, tp.partition, rules, next_start=committed)
        #: look for cut markers at segment starts until the first start without one
        self.probing = True
        self.last_record = time.monotonic()


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, service: ArchiveService) -> None:
        self.service = service

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # wait for a single store call in flight (never for a whole outage), then forget: the
        # next owner re-reads from the committed offset and writes the same objects
        async with self.service.store_lock:
            for tp in revoked:
                self.service.partitions.pop(tp, None)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self.service.resume(assigned)


class ArchiveService(mode.Service):
    """Consumes the archived topics and lands them in the store, exactly once."""

    def __init__(self, job: JobConfig, options: ArchiveOptions, bootstrap: Sequence[str],
                 group: str, privacy_secret: bytes | None, *, max_records: int = 20_000,
                 session_timeout_ms: int = 10_000, store: ArchiveStore | None = None,
                 kafka_options: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.options = options
        #: TLS / SASL options (eventpulse.connections)
        self.kafka_options = kafka_options or {}
        self.bootstrap = list(bootstrap)
        self.group = group
        self.max_records = max_records
        self.session_timeout_ms = session_timeout_ms
        self.store = store or ArchiveStore.open(options.url, options.s3)
        decoders = job.decoders(job.pseudonymisers(privacy_secret))
        self.decoders: dict[str, RecordDecoder] = {t: decoders[t] for t in options.topics}
        self.layouts = {t: KindLayout(RecordKind(job.topics[t])) for t in options.topics}
        self.partitions: dict[TopicPartition, _Partition] = {}
        self.store_lock = asyncio.Lock()
        self.consumer: AIOKafkaConsumer | None = None
        self.stopping = False

    async def on_start(self) -> None:
        log.info("archive: topics %s to %s", self.options.topics, self.store.description)
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=self.group, enable_auto_commit=False,
            auto_offset_reset="earliest", max_poll_records=self.max_records,
            session_timeout_ms=self.session_timeout_ms,
            heartbeat_interval_ms=max(500, self.session_timeout_ms // 6),
            rebalance_timeout_ms=max(self.session_timeout_ms, 10_000),
            # an outage holds the loop in retries, not in getmany(); stay in the group meanwhile
            max_poll_interval_ms=24 * 3_600_000, **self.kafka_options,
        )
        self.consumer.subscribe(self.options.topics, listener=_Rebalance(self))
        await self.consumer.start()

    async def on_stop(self) -> None:
        self.stopping = True
        if self.consumer is not None:
            await self.consumer.stop()

    async def resume(self, assigned: list[TopicPartition]) -> None:
        """Start each partition at its committed offset: the open tail a previous owner held in
        memory is read again and cut at the same places."""
        assert self.consumer is not None
        for tp in assigned:
            committed = await self.consumer.committed(tp)
            if committed is None:
                await self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, committed)
            self.partitions[tp] = _Partition(tp, self.options.rules, committed)
        log.info("archive: assigned %s", sorted(f"{tp.topic}:{tp.partition}" for tp in assigned))

    @mode.Service.task
    async def _consume(self) -> None:
        # here, not in on_start: a store down at start-up must not hold the worker's other
        # services back
        await self._retry("reach the store", self.store.check)
        while not self.should_stop:
            assert self.consumer is not None
            try:
                batches = await self.consumer.getmany(timeout_ms=200, max_records=self.max_records)
            except KafkaError as exc:
                log.warning("archive: fetch failed: %s", exc)
                await asyncio.sleep(0.5)
                continue
            closed = await self._cut_fetched(batches)
            closed += self._idle_cuts()
            if closed:
                await self._land(closed)

    async def _cut_fetched(self, batches: dict[TopicPartition, list[Any]],
                           ) -> list[tuple[_Partition, Segment]]:
        """Cut what one fetch returned, each partition's records by the state that owned the
        partition when they were fetched (called right after the fetch, so the owners are
        looked up before anything can wait).

        Cutting a partition can wait on the store (a cut marker) while a rebalance hands a
        later partition of the same fetch back to this worker: its new state starts again at
        the committed offset, and the records fetched before belong to the old one. Fed to the
        new state, they opened a segment at a later offset, the re-read records followed, and
        the cut marker said the segment ended before it began: rows landed twice (found by
        outside testing: a worker killed during an S3 outage, its successor rebalancing)."""
        owners = {tp: self.partitions.get(tp) for tp in batches}
        closed: list[tuple[_Partition, Segment]] = []
        for tp, messages in batches.items():
            state = owners[tp]
            if state is None or not messages or self.partitions.get(tp) is not state:
                continue  # revoked or assigned again since: the new owner reads from the commit
            closed += [(state, s) for s in await self._cut(tp, state, messages)]
        return closed

    async def _cut(self, tp: TopicPartition, state: _Partition, messages: list[Any],
                   ) -> list[Segment]:
        decoder, layout = self.decoders[tp.topic], self.layouts[tp.topic]
        segmenter = state.segmenter
        closed: list[Segment] = []
        refused = 0
        for index, message in enumerate(messages):
            if index % 2000 == 1999:
                await asyncio.sleep(0)  # let the feature agent and heartbeats run
            if (message.offset <= segmenter.last_offset if segmenter.is_open else
                    message.offset < segmenter.start_for(message.offset)):
                # records out of order would make a segment's files overlap others: never
                # cut them, read the partition again from its commit (a guard: nothing known
                # leads here since _cut_fetched)
                log.error("archive: %s:%d went back from offset %d to %d; reading it again "
                          "from the committed offset", tp.topic, tp.partition,
                          segmenter.last_offset, message.offset)
                await self._restart(tp)
                return []
            raw = message.value
            broker_ms = message.timestamp
            record = decoder.decode(raw, broker_ms if broker_ms and broker_ms > 0 else None)
            if isinstance(record, DecodeError):
                ts, row = None, None
                refused += 1
            else:
                ts = record.timestamp
                row = layout.row(record, tp.partition, message.offset, broker_ms)
            if segmenter.closes_before(message.offset, ts):
                closed.append(segmenter.close())
            if not segmenter.is_open:
                start = segmenter.start_for(message.offset)
                fixed = await self._marker(tp, state, start)
                if self.partitions.get(tp) is not state:
                    return []  # revoked while we asked the store
                segmenter.begin(start, fixed)
            if segmenter.append(message.offset, len(raw or b""), ts, row):
                closed.append(segmenter.close())
        state.last_record = time.monotonic()
        if refused:
            metrics.REFUSED.labels(tp.topic).inc(refused)
        return closed

    async def _marker(self, tp: TopicPartition, state: _Partition, start: int) -> int | None:
        if not state.probing:
            return None
        raw = await self._retry("read a cut marker",
                                lambda: self.store.get(cut_path(tp.topic, tp.partition, start)))
        if raw is None:
            state.probing = False
            return None
        end = decode_cut(raw)
        log.info("archive: %s:%d resumes a cut made before: offsets %d-%d", tp.topic,
                 tp.partition, start, end)
        return end

    def _idle_cuts(self) -> list[tuple[_Partition, Segment]]:
        """A tail with no new record for ``idle_flush_ms`` lands now (its marker fixes the cut)."""
        now = time.monotonic()
        closed = []
        for state in self.partitions.values():
            segmenter = state.segmenter
            if segmenter.is_open and segmenter.fixed_end is None and segmenter.rows and \
                    (now - state.last_record) * 1000 >= self.options.idle_flush_ms:
                closed.append((state, segmenter.close()))
        return closed

    async def _land(self, segments: list[tuple[_Partition, Segment]]) -> None:
        """Markers and files of each segment, then one commit. Segments of partitions revoked
        since they were cut are dropped (their next owner rewrites the same objects)."""
        assert self.consumer is not None
        offsets: dict[TopicPartition, int] = {}
        for state, segment in segments:
            tp = TopicPartition(segment.topic, segment.partition)
            if self.partitions.get(tp) is not state:
                continue
            if not segment.from_marker:
                claimed = await self._put_owned(
                    tp, state, cut_path(segment.topic, segment.partition, segment.start),
                    encode_cut(segment.end), claim=True)
                if claimed is False:
                    continue
                if isinstance(claimed, bytes) and decode_cut(claimed) != segment.end:
                    # another writer (a worker that lost the partition without knowing) cut
                    # this segment first, elsewhere: its cut stands; read again from the commit
                    log.warning("archive: %s:%d offsets from %d were cut at %d by another writer; "
                                "re-reading", tp.topic, tp.partition, segment.start,
                                decode_cut(claimed))
                    await self._restart(tp)
                    continue
            files = await asyncio.to_thread(encode, self.layouts[segment.topic], segment)
            for name, data, _ in files:
                if not await self._put_owned(tp, state, name, data):
                    break
            else:
                offsets[tp] = segment.end + 1
                for _, data, rows in files:
                    metrics.FILES.labels(segment.topic).inc()
                    metrics.BYTES.labels(segment.topic).inc(len(data))
                    metrics.ROWS.labels(segment.topic).inc(rows)
        owned = {TopicPartition(s.topic, s.partition): st for st, s in segments}
        offsets = {tp: o for tp, o in offsets.items() if self.partitions.get(tp) is owned[tp]}
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as exc:
            # the files are there; whoever reads these partitions next rewrites the same ones
            log.info("archive: offset commit failed (%s); the next owner rewrites the same files",
                     exc)
            return
        for tp, offset in offsets.items():
            metrics.COMMITTED.labels(tp.topic, str(tp.partition)).set(offset)

    async def _restart(self, tp: TopicPartition) -> None:
        """Forget a partition's state and read it again from its committed offset."""
        await self.resume([tp])

    async def _put_owned(self, tp: TopicPartition, state: _Partition, name: str,
                         data: bytes, claim: bool = False) -> bool | bytes:
        """Put one object while we still own its partition (False: revoked, do not commit).
        ``claim``: only if absent; the bytes already there are returned instead of True."""
        delay = 0.2
        while True:
            async with self.store_lock:
                if self.partitions.get(tp) is not state or self.stopping:
                    return False
                try:
                    if claim:
                        existing = await asyncio.to_thread(self.store.claim, name, data)
                        metrics.STORE_UP.set(1)
                        return True if existing is None else existing
                    await asyncio.to_thread(self.store.put, name, data)
                    metrics.STORE_UP.set(1)
                    return True
                except OSError as exc:
                    self._failed("write " + name, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _retry(self, what: str, call: Callable[[], T]) -> T:
        delay = 0.2
        while True:
            try:
                result = await asyncio.to_thread(call)
                metrics.STORE_UP.set(1)
                return result
            except OSError as exc:
                if cancellation.requested() or self.stopping:
                    raise
                self._failed(what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _failed(self, what: str, exc: OSError, delay: float) -> None:
        metrics.RETRIES.inc()
        metrics.STORE_UP.set(0)
        # the exception text is the client's own (pyarrow never puts credentials in it)
        log.warning("archive: cannot %s in %s (%s: %s); retrying in %.1fs", what,
                    self.store.description, type(exc).__name__, str(exc).splitlines()[0][:200],
                    delay)
