"""Instructions per event of the combiner's compiled fold, counted by valgrind: a figure the
machine's drifting speed does not move, for before/after comparisons of ``tables/fold.py``.

    .venv/bin/python bench/fold_instructions.py TREE [TREE ...] [--events 20000]

Each ``TREE`` is a source tree of eventpulse with its own compiled fold (this checkout, or an
older commit: ``git archive <ref> | tar -x -C /tmp/base`` and build it there, or copy the
``.so`` files when the fold did not change). Per tree, a child process decodes
``bench/throughput.py``'s zipf events and folds them through ``BatchCombiner.add`` against its
10 features under ``valgrind --tool=callgrind``, counting only the instructions run inside
``fold.add`` (``--toggle-collect``): the fold and everything it calls, the collector included.
Prints instructions per event per tree and, for every tree after the first, the ratio to the
first. Needs Debian's ``valgrind``; about half a minute per tree for 20k events.
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


def instructions(tree: Path, events: int) -> int:
    """Instructions run inside ``fold.add`` while folding ``events`` events of ``tree``."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "callgrind.out"
        run = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
             "--toggle-collect=*4fold_1add*", sys.executable, "-c", CHILD, str(tree),
             str(events)],
            env={**os.environ, "PYTHONHASHSEED": "0", "PYTHONSAFEPATH": "1"},
            capture_output=True, text=True, check=False)
        found = re.search(r"Collected : (\d+)", run.stderr)
        if run.returncode != 0 or found is None:
            raise SystemExit(f"{tree}: valgrind failed:\n{run.stderr[-2000:]}")
        return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+", type=Path)
    parser.add_argument("--events", type=int, default=20_000)
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("needs valgrind (apt-get install valgrind)")
    first: float | None = None
    for tree in args.trees:
        per_event = instructions(tree.resolve(), args.events) / args.events
        ratio = "" if first is None else f" ratio_vs_first={per_event / first:.3f}"
        first = per_event if first is None else first
        print(f"{tree}: fold_instructions_per_event={per_event:,.0f}{ratio}", flush=True)


if __name__ == "__main__":
    main()
