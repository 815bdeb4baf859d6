from typing import Any

from eventpulse.tables.ringread import RingRead

class EntityEntries:
    raws: tuple[bytes | None, ...]
    keys: tuple[bytes, ...]
    def __init__(self, raws: list[bytes | None], keys: list[bytes]) -> None: ...
    def entry(self, i: int, k: int) -> bytes | None: ...

def read_column(value_type: type[tuple[Any, ...]], f: RingRead, entries: EntityEntries, k: int,
                rows: list[dict[str, Any]], at: int, fresh: str) -> None: ...

def constants() -> dict[str, int | float]: ...
