"""The one rule for turning a record's key field value into entity-id text.

An entity id ends up inside a Redis key name and is what readers pass to ``features get``, so
every value must have one canonical text, the same in the decoder (which checks it) and in the
combiner (which keys on it). A string is itself; an integer is its decimal digits; a boolean is
``true`` / ``false`` (its JSON text). Anything else (a float, whose text is not canonical:
``1``, ``1.0`` and ``1e0`` are one number; a list; an object) is not an id: the record is refused
with reason ``bad_key``.
"""

from __future__ import annotations

from typing import Any


class BadKey(ValueError):
    """A key field holds a value that is not an id (a float, a list, an object)."""


def key_text(value: Any) -> str:
    """The canonical text of a key value (not None); raises :class:`BadKey` for non-ids."""
    kind = value.__class__
    if kind is str:
        return value  # type: ignore[no-any-return]
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return str(value)
    raise BadKey(f"an entity key must be a string, integer or boolean, not {_json_type(value)}")


def _json_type(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, float):
        return "a number with a fraction or exponent"
    return type(value).__name__
