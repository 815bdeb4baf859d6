"""Cost of validating one record (pydantic-core JSON parsing and validation plus eventpulse's
checks) next to plain ``json.loads`` of the same bytes, in the same run.

    .venv/bin/python bench/validation_cost.py [--records 100000]

The worker's whole per-record budget is 1 / (events/s) from bench/throughput.py; the share
printed uses the figure passed with --pipeline-events-per-s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import make_events

from eventpulse.config import parse_config
from eventpulse.streams.decode import RecordDecoder
from eventpulse.streams.topics import RecordKind
from eventpulse.tables.spec import CompiledFeature, entity_key_reader


def keyed_decoder() -> RecordDecoder:
    """The decoder a job keying features on ``user_id`` and ``item_id`` gets: it also checks
    both entity ids (length, control characters) of every record."""
    job = parse_config({"topics": {"events": "behaviour"}, "features": [
        {"name": f"by_{key}", "topic": "events", "entity": key.removesuffix("_id"), "key": key,
         "aggregation": "count", "window": {"size": "1m"}} for key in ("user_id", "item_id")]})
    features = [CompiledFeature(spec, i) for i, spec in enumerate(job.features)]
    return RecordDecoder(RecordKind.BEHAVIOUR, job.limits.decode_limits(),
                         keys=entity_key_reader(features, "events"))


def per_record_us(call: object, records: list[bytes]) -> float:
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for raw in records:
            call(raw)  # type: ignore[operator]
        best = min(best, (time.perf_counter() - started) / len(records) * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--pipeline-events-per-s", type=float, default=15_000)
    args = parser.parse_args()
    records = make_events(args.records)
    decoder = RecordDecoder(RecordKind.BEHAVIOUR)
    now = int(time.time() * 1000)
    keyed = keyed_decoder()
    # rounds alternate between the three, so a neighbour's load on a shared machine hits all
    loads = validate = with_keys = float("inf")
    for _ in range(3):
        loads = min(loads, per_record_us(json.loads, records))
        validate = min(validate, per_record_us(lambda raw: decoder.decode(raw, now), records))
        with_keys = min(with_keys, per_record_us(lambda raw: keyed.decode(raw, now), records))
    budget = 1e6 / args.pipeline_events_per_s
    print(f"json.loads: {loads:.2f} us/record; eventpulse decode + validate: {validate:.2f} "
          f"us/record ({validate / loads:.1f}x json.loads)")
    print(f"validation_us_per_record={validate:.2f} share_of_pipeline_budget="
          f"{validate / budget:.2f} (at {args.pipeline_events_per_s:,.0f} events/s)")
    print(f"with the entity-key check of two keys: {with_keys:.2f} us/record "
          f"(+{with_keys - validate:.2f} us, {with_keys / validate:.2f}x)")


if __name__ == "__main__":
    main()
