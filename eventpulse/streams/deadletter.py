"""Dead letters: refused records, with the reason and where they came from, bounded in size.

The envelope carries the original bytes (base64) so that a fixed record can be replayed exactly,
except where the privacy policy applies: then the record is parsed, scrubbed and stored scrubbed,
and a record that cannot be parsed at all is stored without its payload, since nobody can tell
what personal data it holds.

A dead letter must never be larger than the broker accepts: a refused 2 MB record whose letter
cannot be produced would stop its partition for good. :meth:`DeadLetter.bounded` cuts the payload
to fit, and the letter then says so (``payload_truncated``) with the full payload's size and
SHA-256, so the record can still be found and matched at its source.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from eventpulse.streams.decode import DecodeError
from eventpulse.streams.privacy import Pseudonymiser

#: Kafka's default ``max.message.bytes`` of a topic (1 MiB + 12 bytes of log overhead).
DEFAULT_MAX_MESSAGE_BYTES = 1_048_588
#: What a dead letter needs besides its payload (reason, detail, origin, hash...) plus the Kafka
#: record and batch framing around it; limits below this are refused at start-up.
MIN_DEAD_LETTER_BYTES = 4096
#: Room kept for the record batch header, the record's key and its framing.
KAFKA_FRAMING_BYTES = 512
#: Longest ``detail`` kept: a decoder message may quote a long part of the input.
MAX_DETAIL_CHARS = 1000


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
    #: size in bytes of the refused record as read from Kafka (None: a tombstone)
    original_bytes: int | None = None
    #: size and SHA-256 (hex) of the whole payload before any truncation
    payload_bytes: int | None = None
    payload_sha256: str | None = None
    #: True when ``payload_b64`` holds only the first part of the payload
    payload_truncated: bool = False

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> DeadLetter:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in json.loads(raw).items() if k in fields})

    def payload(self) -> bytes | None:
        return None if self.payload_b64 is None else base64.b64decode(self.payload_b64)

    def bounded(self, max_bytes: int) -> DeadLetter:
        """This letter, or a copy whose payload is cut so that the Kafka record (envelope plus
        framing) stays within ``max_bytes``; the hash and size still describe the whole payload."""
        budget = max_bytes - KAFKA_FRAMING_BYTES
        encoded = self.to_json()
        if len(encoded) <= budget:
            return self
        empty = dataclasses.replace(self, payload_b64="", payload_truncated=True,
                                    payload_note=f"{self.payload_note}; truncated to fit "
                                                 f"{max_bytes} bytes")
        room = budget - len(empty.to_json())
        keep = max(0, room // 4 * 3)  # base64: 4 characters per 3 bytes, no padding inside
        payload = self.payload() or b""
        return dataclasses.replace(empty, payload_b64=base64.b64encode(payload[:keep]).decode())


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
    detail = error.detail
    if len(detail) > MAX_DETAIL_CHARS:
        detail = detail[:MAX_DETAIL_CHARS] + "..."
    return DeadLetter(
        reason=error.reason,
        detail=detail,
        topic=topic,
        partition=partition,
        offset=offset,
        refused_at_ms=int(time.time() * 1000),
        payload_b64=None if payload is None else base64.b64encode(payload).decode(),
        payload_note=note,
        original_bytes=None if raw is None else len(raw),
        payload_bytes=None if payload is None else len(payload),
        payload_sha256=None if payload is None else hashlib.sha256(payload).hexdigest(),
    )


def _scrub(raw: bytes, pseudonymiser: Pseudonymiser) -> tuple[bytes | None, str]:
    """The refused payload with the privacy policy applied, or withheld. This runs on records
    the decoder refused, so anything may be in them: whatever parsing or scrubbing raises
    (nesting past Python's recursion limit, a lone surrogate a hash cannot encode...) withholds
    the payload instead of escaping the dead-letter path, which would stop the partition."""
    try:
        obj: Any = json.loads(raw)
        if not isinstance(obj, dict):
            return None, "withheld: not a JSON object, privacy policy applies"
        return (json.dumps(pseudonymiser.apply_to_mapping(obj)).encode(),
                "scrubbed by privacy policy")
    except (ValueError, UnicodeError, RecursionError, MemoryError):
        return None, "withheld: not parseable, privacy policy applies"
    except Exception as exc:  # the payload's own content; the reason stays the decoder's
        return None, f"withheld: the privacy policy could not be applied ({type(exc).__name__})"
