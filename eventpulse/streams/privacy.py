"""Drop or pseudonymise configured fields at ingestion, before anything else sees the record.

A keyed hash (HMAC-SHA256) rather than a plain hash: user ids are guessable, so an unkeyed hash is
reversible by enumeration. The same id always maps to the same pseudonym, so per-user features keep
working; the key never leaves the process.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel

from eventpulse.streams.entitykey import BadKey, key_text

PSEUDONYM_PREFIX = "h_"


class Pseudonymiser:
    """Applies the privacy policy of one topic to decoded records (and raw JSON objects)."""

    def __init__(self, secret: bytes, drop: Iterable[str] = (), hash_fields: Iterable[str] = ()):
        self._secret = secret
        self.drop = frozenset(drop)
        self.hash_fields = frozenset(hash_fields)

    def __repr__(self) -> str:  # never show the key
        return f"Pseudonymiser(drop={sorted(self.drop)}, hash={sorted(self.hash_fields)})"

    def pseudonym(self, value: Any) -> str:
        """HMAC of the value's canonical text: a key value's (``true``, ``7``: entitykey) so
        that a reader hashing the documented text finds it, else its JSON text."""
        try:
            text = key_text(value)
        except BadKey:
            text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
        # surrogatepass: a lone surrogate (only in refused records' dead letters) still hashes
        digest = hmac.new(self._secret, text.encode("utf-8", "surrogatepass"),
                          hashlib.sha256).hexdigest()
        return PSEUDONYM_PREFIX + digest[:32]

    def apply(self, record: BaseModel) -> None:
        extra = record.model_extra if record.model_extra is not None else {}
        for name in self.drop:
            if name in extra:
                del extra[name]
            elif name in type(record).model_fields:
                setattr(record, name, None)
        for name in self.hash_fields:
            if name in extra and extra[name] is not None:
                extra[name] = self.pseudonym(extra[name])
            elif name in type(record).model_fields:
                value = getattr(record, name)
                if value is not None:
                    setattr(record, name, self.pseudonym(value))

    def apply_to_mapping(self, obj: dict[str, Any]) -> dict[str, Any]:
        """The same policy on a raw JSON object (used for dead letters of invalid records)."""
        cleaned = {k: v for k, v in obj.items() if k not in self.drop}
        for name in self.hash_fields & cleaned.keys():
            if cleaned[name] is not None:
                cleaned[name] = self.pseudonym(cleaned[name])
        return cleaned
