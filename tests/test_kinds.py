"""The aggregation kinds have one source, eventpulse/tables/kinds.py: these tests fail when the
Lua or the Cython copies of its constants, or the Python tables built from it, disagree with it."""

from __future__ import annotations

import re
import typing
from importlib import resources
from pathlib import Path

import redis.asyncio as aioredis

from eventpulse.tables import batch, kinds, ring, ringread, spec, store

PYX = Path(kinds.__file__).with_name("_ringread.pyx")
LUA = (resources.files("eventpulse.tables") / "lua" / "apply.lua").read_text()


def test_every_declarable_aggregation_has_exactly_one_kind() -> None:
    assert set(typing.get_args(spec.Aggregation)) == set(kinds.KINDS)
    assert [k.code for k in kinds.BY_CODE] == list(range(len(kinds.BY_CODE)))
    assert len({k.entry for k in kinds.BY_CODE}) == len(kinds.BY_CODE)  # one byte per kind
    for name, kind in kinds.KINDS.items():
        assert len(kind.entry.encode()) == 1, name
        # apply.lua reads an op's bucket as bucket, then stride numbers (a sketch: one list)
        assert len(kind.partials) == max(kind.stride, 1), name
        assert kind.rule in kinds.LUA_RULES, name
        assert (kind.stride == 0) == (kind.rule in {"hll", "bins"}) == (kind.read is None), name


def test_python_tables_are_the_kinds_table() -> None:
    for name, kind in kinds.KINDS.items():
        assert spec.AGG_CODES[name] == kind.code
        assert ring.KINDS[name] == kind.entry
        assert ring.STRIDES[kind.entry] == kind.stride
        assert batch._EMPTY_PARTIALS[kind.code] == kind.partials
        assert ringread.CODES.get(kind.entry) == kind.read
    assert ring.HEADER.size == kinds.HEADER_SIZE == ringread.RING_AT
    assert ring.WHEN_AT == kinds.WHEN_AT


def test_compiled_read_loop_was_built_with_the_kinds_constants() -> None:
    # the project's install builds it (scripts/bootstrap.sh, the Dockerfile); a missing build
    # is a failure here, as in test_fold, not a skip that would pass for a check
    assert ringread.ACCELERATED, "the compiled read loop is not built: run ./scripts/bootstrap.sh"
    from eventpulse.tables import _ringread

    assert _ringread.constants() == {
        "READ_COUNT": kinds.READ_COUNT, "READ_SUM": kinds.READ_SUM,
        "READ_AVERAGE": kinds.READ_AVERAGE, "READ_EXTREME": kinds.READ_EXTREME,
        "READ_LAST": kinds.READ_LAST, "HEADER_SIZE": kinds.HEADER_SIZE,
        "WHEN_AT": kinds.WHEN_AT, "TIME_LIMIT": ringread.TIME_LIMIT,
        "COUNT_LIMIT": ringread.COUNT_LIMIT, "LAST_ESCAPE": ring.LAST_ESCAPE}


def test_cython_source_states_the_kinds_constants() -> None:
    """The .pyx itself, so a stale build cannot hide an edit that was never compiled."""
    source = PYX.read_text()
    stated = {name: int(value) for name, value
              in re.findall(r"^    (COUNT|SUM|AVERAGE|EXTREME|LAST|RING_AT|WHEN_AT) = (\d+)",
                            source, re.M)}
    assert stated == {"COUNT": kinds.READ_COUNT, "SUM": kinds.READ_SUM,
                      "AVERAGE": kinds.READ_AVERAGE, "EXTREME": kinds.READ_EXTREME,
                      "LAST": kinds.READ_LAST, "RING_AT": kinds.HEADER_SIZE,
                      "WHEN_AT": kinds.WHEN_AT}


def test_apply_lua_names_no_kind_byte_and_knows_every_rule() -> None:
    code = re.sub(r"--[^\n]*", "", LUA)  # comments aside
    assert not re.findall(r"kind\s*[=~]=\s*['\"]", code)  # no kind byte compared directly
    for kind in set(kinds.BY_ENTRY) - {"<"}:  # '<' also starts every struct format
        assert f"'{kind}'" not in code and f'"{kind}"' not in code, kind
    assert "HEADER, HEADER_LEN =" not in code  # the header layout comes from kinds.py too
    handled = set(re.findall(r"rule [=~]= '(\w+)'", code))
    assert handled == kinds.LUA_RULES


async def test_lua_prologue_is_the_table_inside_redis(aredis: aioredis.Redis) -> None:
    """Redis' own Lua reads the generated lines back as the table says (and a rule that the
    script does not know fails loudly rather than folding nothing)."""
    dump = kinds.lua_prologue() + """
local out = {HEADER, HEADER_LEN}
for entry, rule in pairs(RULE) do out[#out + 1] = entry .. '=' .. rule end
return out
"""
    header, size, *rules = await aredis.eval(dump, 0)  # type: ignore[misc]
    assert header.decode() == kinds.LUA_HEADER_FORMAT and size == kinds.HEADER_SIZE
    assert {r.decode() for r in rules} == {f"{e}={k.rule}" for e, k in kinds.BY_ENTRY.items()}
    # Lua's struct reads a header ring.HEADER packed, field for field
    packed = ring.HEADER.pack(60_000, b"M", 123, 180_000, 3_600_000)
    fields = await aredis.eval(kinds.lua_prologue() + """
local step, kind, newest, head, ttl = struct.unpack(HEADER, ARGV[1])
return {step, kind, newest, head, ttl}
""", 0, packed)  # type: ignore[misc]
    assert fields == [60_000, b"M", 123, 180_000, 3_600_000]
    assert store.APPLY_LUA.startswith(kinds.lua_prologue())
