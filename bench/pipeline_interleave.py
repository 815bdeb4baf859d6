"""Does Redis serve another client between the scripts of one pipeline?

    .venv/bin/python bench/pipeline_interleave.py

One client sends 20 scripts of 3 ms each (busy-waiting on Redis' clock) in one pipeline, with an
argument of 100 B, 8 KB or 40 KB; another PINGs every millisecond meanwhile. Prints how long the
pipeline took and the longest PING: close to the pipeline's time means Redis ran the scripts
back to back (docs/performance.md, "Where the time went").
"""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis

from eventpulse.local.servers import LocalRedis

SPIN = """local t = redis.call('TIME'); local s = t[1] * 1e6 + t[2]
repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] - s >= tonumber(ARGV[1])
return #ARGV[2]"""


async def measure(url: str, arg_bytes: int, scripts: int = 20, spin_us: int = 3000) -> None:
    writer, pinger = aioredis.Redis.from_url(url), aioredis.Redis.from_url(url)
    await pinger.ping()
    sha = await writer.script_load(SPIN)
    pings: list[float] = []
    stop = asyncio.Event()

    async def ping_loop() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            await pinger.ping()
            pings.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0.001)

    task = asyncio.create_task(ping_loop())
    await asyncio.sleep(0.05)
    started = time.perf_counter()
    async with writer.pipeline(transaction=False) as pipe:
        for _ in range(scripts):
            pipe.evalsha(sha, 0, spin_us, b"x" * arg_bytes)
        await pipe.execute()
    total = (time.perf_counter() - started) * 1000
    stop.set()
    await task
    print(f"argument {arg_bytes} B, {scripts} scripts of {spin_us / 1000} ms: pipeline "
          f"{total:.0f} ms; longest PING {max(pings):.1f} ms of {len(pings)}")
    await writer.aclose()
    await pinger.aclose()


def main() -> None:
    with LocalRedis() as server:
        for arg_bytes in (100, 8000, 40000):
            asyncio.run(measure(server.url, arg_bytes))


if __name__ == "__main__":
    main()
