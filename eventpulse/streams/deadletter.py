"""Dead letters: refused records, kept whole with the reason and where they came from.

The envelope carries the original bytes (base64) so that a fixed record can be replayed exactly,
except where the privacy policy applies: then the record is parsed, scrubbed and stored scrubbed,
and a record that cannot be parsed at all is stored without its payload, since nobody can tell
what personal data it holds.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from eventpulse.streams.decode import DecodeError
from eventpulse.streams.privacy import Pseudonymiser


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: str
    detail: str
    topic: str
    partition: int
    offset: int
    refused_at_ms: int
    payload_b64: str | None
    payload_note: str = "original bytes"

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> DeadLetter:
        return cls(**json.loads(raw))

    def payload(self) -> bytes | None:
        return None if self.payload_b64 is None else base64.b64decode(self.payload_b64)


def make_dead_letter(
    error: DecodeError,
    raw: bytes | None,
    topic: str,
    partition: int,
    offset: int,
    pseudonymiser: Pseudonymiser | None = None,
) -> DeadLetter:
    payload: bytes | None = raw
    note = "original bytes"
    if pseudonymiser is not None and raw is not None:
        payload, note = _scrub(raw, pseudonymiser)
    return DeadLetter(
        reason=error.reason,
        detail=error.detail,
        topic=topic,
        partition=partition,
        offset=offset,
        refused_at_ms=int(time.time() * 1000),
        payload_b64=None if payload is None else base64.b64encode(payload).decode(),
        payload_note=note,
    )


def _scrub(raw: bytes, pseudonymiser: Pseudonymiser) -> tuple[bytes | None, str]:
    try:
        obj: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None, "withheld: not parseable, privacy policy applies"
    if not isinstance(obj, dict):
        return None, "withheld: not a JSON object, privacy policy applies"
    return json.dumps(pseudonymiser.apply_to_mapping(obj)).encode(), "scrubbed by privacy policy"
