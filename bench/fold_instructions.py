"""Instructions per event of the combiner's compiled fold, counted by valgrind: a figure the
machine's drifting speed does not move, for before/after comparisons of ``tables/fold.py``.

    .venv/bin/python bench/fold_instructions.py TREE [TREE ...] [--events 20000] [--step ingest]

Each ``TREE`` is a source tree of eventpulse with its own compiled fold (this checkout, or an
older commit: ``git archive <ref> | tar -x -C /tmp/base`` and build it there, or copy the
``.so`` files when the fold did not change). Per tree, a child process decodes
``bench/throughput.py``'s zipf events and folds them through ``BatchCombiner.add`` against its
10 features under ``valgrind --tool=callgrind``, counting only the instructions run inside
``fold.add`` (``--toggle-collect``): the fold and everything it calls, the collector included.
Prints instructions per event per tree and, for every tree after the first, the ratio to the
first. Needs Debian's ``valgrind``; about half a minute per tree for 20k events.

``--step ingest`` counts the worker's whole ingest step instead (``agents.ingest.Ingest``:
decoding, the key and clock checks, the fold and the write plan, over batches of 20,000 raw
records as the worker hands them over), as the difference between a run that does it and one
that only prepares it (the Python-level step has no C function to toggle on).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

#: the child: fold the events once, under the tree's own eventpulse
CHILD = """
import sys, time
tree, n = sys.argv[1], int(sys.argv[2])
sys.path[:0] = [tree, tree + "/bench"]
from common import features
from throughput import make_events
from eventpulse import gctune
from eventpulse.streams.decode import RecordDecoder
from eventpulse.streams.topics import RecordKind
from eventpulse.tables.batch import COMPILED_FOLD, BatchCombiner, PartitionPosition
from eventpulse.tables.spec import CompiledFeature, FeatureSpec, entity_key_reader
if not COMPILED_FOLD:
    raise SystemExit(f"{tree}: the fold is not compiled (build it first)")
compiled = [CompiledFeature(FeatureSpec.model_validate(f), i)
            for i, f in enumerate(features("events"))]
decoder = RecordDecoder(RecordKind.BEHAVIOUR, keys=entity_key_reader(compiled, "events"))
now = int(time.time() * 1000)
records = [decoder.decode(raw, now) for raw in make_events(n)]
gctune.tune_for_good()  # as the worker does
combiner = BatchCombiner("bench", compiled, {"events:0": PartitionPosition()})
for offset, record in enumerate(records):
    combiner.add("events:0", "events", offset, record)
"""


#: the child of ``--step ingest``: the worker's ingest step over the events (``run``) or only
#: what it needs made (``setup``)
INGEST_CHILD = """
import asyncio, sys
tree, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sys.path[:0] = [tree, tree + "/bench"]
from common import features
from throughput import make_events
from eventpulse import gctune
from eventpulse.agents.ingest import Ingest, RawRecord
from eventpulse.config import parse_config
from eventpulse.tables.batch import COMPILED_FOLD
if not COMPILED_FOLD:
    raise SystemExit(f"{tree}: the fold is not compiled (build it first)")
job = parse_config({"topics": {"events": "behaviour"}, "features": features("events")})
ingest = Ingest(job, "bench")
raws = [RawRecord("events", 0, offset, raw) for offset, raw in enumerate(make_events(n))]
gctune.tune_for_good()  # as the worker does

async def run():
    for start in range(0, n, 20000):
        batch = await ingest(raws[start:start + 20000], {"events:0": None})
        assert not batch.dead, batch.dead[:1]

if mode == "run":
    asyncio.run(run())
else:
    asyncio.run(asyncio.sleep(0))
"""


def _collected(args: list[str], tree: Path) -> int:
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "callgrind.out"
        run = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *args],
            env={**os.environ, "PYTHONHASHSEED": "0", "PYTHONSAFEPATH": "1"},
            capture_output=True, text=True, check=False)
        found = re.search(r"Collected : (\d+)", run.stderr)
        if run.returncode != 0 or found is None:
            raise SystemExit(f"{tree}: valgrind failed:\n{run.stderr[-2000:]}")
        return int(found.group(1))


def instructions(tree: Path, events: int, step: str = "fold") -> int:
    """Instructions run inside ``fold.add`` while folding ``events`` events of ``tree``; with
    ``step="ingest"``, those of the whole ingest step."""
    if step == "fold":
        return _collected(["--toggle-collect=*4fold_1add*", sys.executable, "-c", CHILD,
                           str(tree), str(events)], tree)
    ran, prepared = (_collected([sys.executable, "-c", INGEST_CHILD, str(tree), str(events), mode],
                                tree) for mode in ("run", "setup"))
    return ran - prepared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+", type=Path)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--step", choices=["fold", "ingest"], default="fold")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("needs valgrind (apt-get install valgrind)")
    first: float | None = None
    for tree in args.trees:
        per_event = instructions(tree.resolve(), args.events, args.step) / args.events
        ratio = "" if first is None else f" ratio_vs_first={per_event / first:.3f}"
        first = per_event if first is None else first
        print(f"{tree}: {args.step}_instructions_per_event={per_event:,.0f}{ratio}", flush=True)


if __name__ == "__main__":
    main()
