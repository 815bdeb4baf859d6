"""Training sets on several processes: the label rows split by entity, one
:func:`~eventpulse.offline.training.compute` per share, the columns joined in row order.

Why processes: the build is CPU-bound Python (the worker's fold, the client's read path, turning
parquet rows into records); threads would take turns on one interpreter lock.

Why it is exact: what a row reads depends on its entity's own records, on the watermarks of the
partitions they are in and on where the replay stops. Every share sees the whole archive (the
watermarks come from every record of a partition) and stops at the whole label set's moments
(``compute(all_cutoffs=...)``), and all rows of an entity are in one share (its records are
brought up to date in order). So each share computes, for its rows, what one process computes
for all of them: every value and status equal (tests/test_training_parallel.py holds it to it).

How: this process reads the parquet once, as columns, and forks one process per share. A share
shares those columns (pyarrow's buffers, never written to) and turns into records only the rows
its own entities need (:meth:`~eventpulse.offline.entityindex.Stream.need`), then sends its
feature columns back and ends without freeing what it held (freeing a million archived records
one by one takes about a second). Forked rather than spawned: a spawned process imports
everything again and reads the whole archive itself (about 2 s more per share for a million
events, docs/performance.md). This process never holds the records, only the columns.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import heapq
import multiprocessing
import os
import signal
import time
import traceback
import uuid
from collections.abc import Sequence
from typing import Any, cast

import pyarrow as pa
import pyarrow.compute as pc
import redis.asyncio as aioredis

from eventpulse.archive.store import ArchiveStore
from eventpulse.config import JobConfig
from eventpulse.offline import entityindex, training
from eventpulse.tables.client import READ_PROTOCOL
from eventpulse.tables.spec import CompiledFeature, FeatureSpec

#: prctl(2)'s option: the signal a process gets when its parent dies
PR_SET_PDEATHSIG = 1
#: the most processes a training set starts by default: beyond it, memory (a copy of the
#: archive's records each) grows faster than the build gets shorter on most machines
MAX_DEFAULT_JOBS = 8


def default_jobs() -> int:
    """The CPUs this process may run on, at most :data:`MAX_DEFAULT_JOBS`."""
    return max(1, min(MAX_DEFAULT_JOBS, len(os.sched_getaffinity(0))))


#: what a label row costs a share besides its entity's records, in records replayed: its read
#: (commands, replies, statuses) and its entity's write, about 30 us of the share's CPU against
#: about 3.5 us per record indexed and folded (docs/performance.md, 2026-12-03)
ROW_WEIGHT = 10


def shares(labels: training.Labels, jobs: int, records: pa.Table | None = None,
           ) -> list[list[int]]:
    """The label rows per share: an entity's rows all in one share, the entities spread so
    that the shares' work is about even. An entity weighs its archived records (``records``:
    :func:`record_counts`' table) and :data:`ROW_WEIGHT` per row; the heaviest goes first,
    each to the share with the least weight so far. Why not a hash: a build lasts as long as
    its slowest share, and on skewed traffic a few entities hold a tenth of the events each (a
    hash split of the bench's zipf archive gave one share 57% of the records to replay).
    Shares without rows left out; the same split for the same input in every run (ties go by
    entity type and id, then by share). Column-wise but for the last loop, over the entities:
    a loop over the rows cost a quarter of a second per 100k, before any share could start."""
    n = len(labels.ids)
    if n == 0:
        return []
    entities = pa.array(labels.entities, pa.string())
    ids = pa.array(labels.ids, pa.string())
    # each row's entity as a number (its place among the entities, first seen first; a key
    # two entities share, where a type holds the separator, only puts both in one share)
    codes = pc.dictionary_encode(pc.binary_join_element_wise(entities, ids, "\x1f")).indices
    per_entity = pa.table({"code": codes, "row": pa.array(range(n), pa.int64())}).group_by(
        "code", use_threads=False).aggregate([("row", "min"), ("row", "count")])
    firsts = per_entity.column("row_min")
    weighed = pa.table({"entity": pc.take(entities, firsts), "entity_id": pc.take(ids, firsts),
                        "code": per_entity.column("code"),
                        "rows": per_entity.column("row_count")})
    archived: Any = 0
    if records is not None and records.num_rows:
        weighed = weighed.join(records, ["entity", "entity_id"], join_type="left outer",
                               use_threads=False)
        archived = pc.fill_null(weighed.column("records"), 0)
    weight = pc.add(pc.multiply(weighed.column("rows"), ROW_WEIGHT), archived)
    weighed = weighed.append_column("weight", weight).sort_by(
        [("weight", "descending"), ("entity", "ascending"), ("entity_id", "ascending")])
    share_of_entity = [0] * weighed.num_rows
    loads = [(0, k) for k in range(max(1, jobs))]  # a heap: the lightest share first
    for code, weighs in zip(weighed.column("code").to_pylist(),
                            weighed.column("weight").to_pylist(), strict=True):
        load, k = heapq.heappop(loads)
        share_of_entity[code] = k
        heapq.heappush(loads, (load + weighs, k))
    share_of_row = pc.take(pa.array(share_of_entity, pa.int32()), codes)
    parts = [pc.indices_nonzero(pc.equal(share_of_row, k)).to_pylist()
             for k in range(len(loads))]
    return [part for part in parts if part]


def record_counts(job: JobConfig, specs: list[FeatureSpec], archive: training.ArchiveTables,
                  ) -> pa.Table:
    """Per (entity type, entity id), the archived records of ``archive`` a build replays for
    it (:func:`training.replayed`'s features), counted column-wise
    (:func:`entityindex.record_counts`)."""
    compiled = [CompiledFeature(spec, i) for i, spec in enumerate(training.replayed(job, specs))]
    families = entityindex.families_of(compiled)
    return entityindex.record_counts([(topic, rows.table) for topic, _, rows, _ in archive],
                                     families)


def share_of(labels: training.Labels, rows: Sequence[int]) -> training.Labels:
    """The labels of ``rows`` (without the label table: a share returns feature columns only)."""
    cutoffs = labels.cutoffs
    return training.Labels(
        pa.table({}), [labels.entities[r] for r in rows], [labels.ids[r] for r in rows],
        [labels.times[r] for r in rows],
        None if cutoffs is None else [cutoffs[r] for r in rows])


async def build(job: JobConfig, store: ArchiveStore, labels: training.Labels,
                specs: list[FeatureSpec], redis_url: str, jobs: int, settle_ms: int = 0,
                drop: bool = False) -> tuple[pa.Table, training.TrainingStats]:
    """:func:`training.build` on up to ``jobs`` processes, each computing in its own namespace
    of the Redis at ``redis_url`` (``drop``: and removing it after)."""
    started = time.perf_counter()
    cutoffs = labels.cutoffs if labels.cutoffs is not None else labels.times
    # the parquet read once, here, on pyarrow's threads: its columns are shared with every
    # forked share, which turns the rows it needs into records of its own
    archive = training.read_archive(job, store, specs, max(cutoffs, default=0))
    read_s = time.perf_counter() - started
    parts = shares(labels, jobs, record_counts(job, specs, archive) if jobs > 1 else None)
    # forked, even for one share: the share's records are never freed one by one (it ends
    # with os._exit), and it starts at once, with everything imported and read. Safe here:
    # the child runs only its own event loop (asyncio knows a loop of another process is not
    # its own) and pyarrow's thread pools and allocator re-initialise after a fork
    context = multiprocessing.get_context("fork")
    children: list[tuple[Any, Any]] = []
    # named here: a share killed, or the command stopped, leaves its keys for this process to
    # remove (the shares remove their own when they finish)
    namespaces = [f"offline-{uuid.uuid4().hex[:8]}" for _ in parts]
    finished = False
    try:
        # what the shares inherit, out of their collectors' sight (the documented recipe): a
        # collection in a share would write to every inherited object, copying every page
        gc.freeze()
        try:
            for rows, namespace in zip(parts, namespaces, strict=True):
                mine, theirs = context.Pipe()
                share = (job, store, share_of(labels, rows), specs, redis_url, settle_ms,
                         cutoffs, drop, archive, namespace)
                process = context.Process(target=_share, args=(theirs, share), daemon=True,
                                          name="eventpulse-training-share")
                process.start()
                theirs.close()  # the child's end: a child that dies leaves EOF on ours
                children.append((process, mine))
        finally:
            gc.unfreeze()
        del archive  # the shares hold it now; this process needs it no more
        loop = asyncio.get_running_loop()
        # every share's result or error is retrieved (the first error raised after): a build
        # stopped meanwhile (SIGTERM) leaves no future holding an exception nobody retrieves
        outcomes = await asyncio.gather(*(loop.run_in_executor(None, _receive, pipe, len(parts))
                                          for _, pipe in children), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        results = cast(list[tuple[training.Columns, training.TrainingStats]], outcomes)
        finished = True
    finally:
        for process, pipe in children:
            pipe.close()
            if process.is_alive():  # an error elsewhere, or this build was cancelled
                process.terminate()
            process.join()
        if drop and not finished:
            await _drop_namespaces(redis_url, namespaces)
    columns = _join(specs, len(labels.ids), parts, [c for c, _ in results])
    stats = _merge([s for _, s in results], len(labels.ids), time.perf_counter() - started,
                   read_s)
    return training.table_of(labels, specs, columns), stats


async def _drop_namespaces(redis_url: str, namespaces: list[str]) -> None:
    """Remove the shares' keys after a build that did not finish (the user's Redis keeps
    nothing of it; a Redis that fails is named by :func:`training.drop_namespace`)."""
    client = aioredis.Redis.from_url(redis_url, socket_timeout=10, socket_connect_timeout=10)
    try:
        for namespace in namespaces:
            if not await training.drop_namespace(client, namespace):
                break  # the Redis failed: once is enough to say so
    finally:
        await client.aclose()


class RemoteTraceback(Exception):
    """Where a share's process raised what the command raises (its traceback, as text)."""

    def __str__(self) -> str:
        return str(self.args[0])


def _receive(pipe: Any, jobs: int) -> tuple[training.Columns, training.TrainingStats]:
    """A share's result, or what stopped it, raised here (its traceback in the share's process
    as the cause: what EVENTPULSE_TRACEBACK=1 shows)."""
    try:
        outcome, value, where = pipe.recv()
    except EOFError:
        raise training.TrainingSetError(
            f"a training-set process stopped unexpectedly (killed, or out of memory: each of "
            f"the {jobs} holds the records of the archive its rows need); run with fewer "
            "--jobs") from None
    if outcome == "error":
        if where:
            value.__cause__ = RemoteTraceback(where)
        raise value
    return value  # type: ignore[no-any-return]


def _share(pipe: Any, share: tuple[Any, ...]) -> None:
    """One share, in a forked process: its result goes back through ``pipe``, then the process
    ends at once, without freeing the archive's millions of records one by one."""
    parent = os.getppid()
    _end_with_parent()
    if os.getppid() != parent:  # it died before the kernel was told to end us with it
        os._exit(1)
    # the parent's handler (the command's: SIGTERM raises) is not this process's: a share
    # terminated by its parent just ends
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    held: list[Any] = []
    try:
        result: tuple[str, Any, str] = ("ok", asyncio.run(_compute(*share, hold=held)), "")
    except MemoryError:
        result = ("error", training.TrainingSetError(
            "a training-set process ran out of memory (each holds the records of the archive "
            "its rows need); run with fewer --jobs"), traceback.format_exc())
    except BaseException as exc:  # every failure goes back to the parent, which raises it
        result = ("error", exc, traceback.format_exc())
    try:
        pipe.send(result)
    except OSError:  # the parent is gone: nobody to tell
        os._exit(1)
    except Exception as exc:  # e.g. an error that does not pickle
        what = (f"{type(result[1]).__name__}: {result[1]}" if result[0] == "error"
                else "its result")
        with contextlib.suppress(OSError):
            pipe.send(("error", training.TrainingSetError(
                f"a training-set process could not send back {what} "
                f"({type(exc).__name__}: {exc})"), result[2]))
    pipe.close()
    os._exit(0)


def _end_with_parent() -> None:
    """Have the kernel kill this process when its parent dies (Linux ``prctl``): a command
    killed outright (SIGKILL) must not leave its shares computing for nobody."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


async def _compute(job: JobConfig, store: ArchiveStore, labels: training.Labels,
                   specs: list[FeatureSpec], redis_url: str, settle_ms: int,
                   cutoffs: Sequence[int], drop: bool, archive: training.ArchiveTables,
                   namespace: str, *, hold: list[Any] | None = None,
                   ) -> tuple[training.Columns, training.TrainingStats]:
    client = aioredis.Redis.from_url(redis_url, protocol=READ_PROTOCOL)
    try:
        out, stats = await training.compute(job, store, labels, specs, client, namespace,
                                            settle_ms=settle_ms, all_cutoffs=cutoffs, hold=hold,
                                            drop=drop, archive=archive)
    finally:
        await client.aclose()
    return training.typed_columns(training.columns_of(specs, out)), stats


def _join(specs: list[FeatureSpec], n: int, parts: list[list[int]],
          columns: list[training.Columns]) -> training.Columns:
    """The shares' columns (:func:`training.typed_columns`) as one, in label row order: taken
    in C where every share's values have one type (or none at all), else joined as Python
    values, to be typed together (:func:`training.value_array`)."""
    rows = [row for part in parts for row in part]
    if len(rows) != n:
        raise AssertionError(f"the shares hold {len(rows)} label rows of {n}")
    # the shares' rows one after another, back in label row order
    order = pc.sort_indices(pa.array(rows, pa.int64()))
    joined: training.Columns = {}
    for spec in specs:
        shares_values = [share[spec.name][0] for share in columns]
        statuses = pa.concat_arrays([share[spec.name][1] for share in columns]).take(order)
        values = _concat(shares_values)
        if values is None:  # Python values, typed once joined
            flat = [value for part in shares_values
                    for value in (part.to_pylist() if isinstance(part, pa.Array) else part)]
            joined[spec.name] = ([flat[i] for i in order.to_pylist()], statuses)
        else:
            joined[spec.name] = (values.take(order), statuses)
    return joined


def _concat(parts: list[Any]) -> pa.Array | None:
    """Arrays of one type (or of nulls alone) as one; None where they differ, or a share could
    not type its values: ints in one and floats in another are typed together, as one list of
    them would be."""
    if not all(isinstance(part, pa.Array) for part in parts):
        return None
    types = {part.type for part in parts if part.type != pa.null()}
    if len(types) > 1:
        return None
    kind = types.pop() if types else pa.null()
    return pa.concat_arrays([part if part.type == kind else pa.nulls(len(part), kind)
                             for part in parts])


def _merge(stats: list[training.TrainingStats], rows: int, seconds: float, read_s: float,
           ) -> training.TrainingStats:
    """One account of the shares: counts added up; events and phases those of the share that
    replayed the most (every share reads the same archive up to the same moment)."""
    slowest = max(stats, key=lambda s: s.seconds)
    late: dict[str, int] = {}
    for share in stats:
        for name, count in share.late.items():
            late[name] = late.get(name, 0) + count
    phases = {"read parquet": read_s, **slowest.phases}
    phases["processes (start, join)"] = max(0.0, seconds - read_s - slowest.seconds)
    return training.TrainingStats(
        events=max(s.events for s in stats), rows=rows, seconds=seconds, late=late,
        lag_sensitive=sum(s.lag_sensitive for s in stats),
        order_dependent=sum(s.order_dependent for s in stats),
        incomplete=sum(s.incomplete for s in stats),
        applied=sum(s.applied for s in stats), phases=phases, processes=len(stats))
