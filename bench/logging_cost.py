"""Cost on the application thread of one ``logger.info(..., extra=...)`` call: eventpulse's
KafkaHandler (JSON, queued for a background sender) side by side with a plain StreamHandler, in
the same run, against a local broker.

    .venv/bin/python bench/logging_cost.py [--calls 50000]
"""

from __future__ import annotations

import argparse
import io
import logging
import statistics
import time

from eventpulse.local.servers import TansuBroker
from eventpulse.logging import KafkaHandler

EXTRA = {"model": "ranker", "model_version": "3.1", "latency_ms": 12.5, "status": 200,
         "request_id": "r-123"}


def per_call_us(logger: logging.Logger, calls: int) -> tuple[float, float]:
    """(median, p99) of per-call microseconds, measured in blocks of 100 calls."""
    samples = []
    for _ in range(calls // 100):
        started = time.perf_counter()
        for _ in range(100):
            logger.info("inference", extra=EXTRA)
        samples.append((time.perf_counter() - started) / 100 * 1e6)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


def logger_with(handler: logging.Handler, name: str) -> logging.Logger:
    logger = logging.getLogger(name)
    logger.handlers = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=50_000)
    args = parser.parse_args()
    with TansuBroker() as broker:
        kafka = KafkaHandler(broker.bootstrap, topic="inference", queue_size=args.calls * 2)
        plain = logging.StreamHandler(io.StringIO())
        plain_logger = logger_with(plain, "bench.plain")
        kafka_logger = logger_with(kafka, "bench.kafka")
        per_call_us(plain_logger, 5_000)  # warm up both
        per_call_us(kafka_logger, 5_000)
        plain_med, plain_p99 = per_call_us(plain_logger, args.calls)
        kafka_med, kafka_p99 = per_call_us(kafka_logger, args.calls)
        started = time.perf_counter()
        kafka.flush()
        drained = time.perf_counter() - started
        kafka.close()
    print(f"StreamHandler (text, in-memory stream): median {plain_med:.2f} us/call, "
          f"p99 {plain_p99:.2f}")
    print(f"KafkaHandler (JSON, queued):           median {kafka_med:.2f} us/call, "
          f"p99 {kafka_p99:.2f}; sent {kafka.sender.sent}, dropped {kafka.dropped}, "
          f"drained the rest in {drained:.2f}s")
    print(f"kafka_handler_vs_stream_handler={kafka_med / plain_med:.2f}")


if __name__ == "__main__":
    main()
