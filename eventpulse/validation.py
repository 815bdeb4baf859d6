"""pydantic's validation errors, reworded for the person who edits the file or the variable.

pydantic says "Value error, window.size must be ...", "Field required", "Extra inputs are not
permitted" and "Input tag 'ration' found using 'kind' does not match any of the expected tags";
the settings and the job YAML both report through here, so that both speak the same way: our
own sentences without pydantic's prefix, a missing field named as missing, and a misspelt one
with the name it probably meant.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

from pydantic_core import ErrorDetails

Loc = tuple[int | str, ...]


def message(error: ErrorDetails, siblings: Sequence[str] = ()) -> str:
    """One error's sentence, without its location. ``siblings``: names of required fields
    reported missing next to it, candidates for what an unknown field meant."""
    kind = error["type"]
    ctx: dict[str, Any] = dict(error.get("ctx") or {})
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    if kind == "missing":
        return "required, but missing"
    if kind == "extra_forbidden":
        field = str(error["loc"][-1]) if error["loc"] else ""
        close = difflib.get_close_matches(field, siblings, n=1, cutoff=0.6)
        return "unknown field" + (f"; did you mean {close[0]!r}?" if close else "")
    if kind == "union_tag_invalid":
        return (f"{ctx.get('discriminator', 'kind')} {ctx.get('tag')!r} is not one of "
                f"{ctx.get('expected_tags')}")
    if kind == "union_tag_not_found":
        return f"{ctx.get('discriminator', 'kind')} is required"
    return str(error["msg"])


def missing_by_parent(errors: Sequence[ErrorDetails]) -> dict[Loc, list[str]]:
    """Parent location -> names of the fields reported missing there."""
    out: dict[Loc, list[str]] = {}
    for error in errors:
        loc = tuple(error["loc"])
        if error["type"] == "missing" and loc:
            out.setdefault(loc[:-1], []).append(str(loc[-1]))
    return out


def messages(errors: Sequence[ErrorDetails]) -> list[tuple[Loc, str]]:
    """(location, sentence) per error, an unknown field matched against missing siblings."""
    missing = missing_by_parent(errors)
    return [(tuple(e["loc"]), message(e, missing.get(tuple(e["loc"])[:-1], ()))) for e in errors]


def report(title: str, lines: Sequence[str]) -> str:
    """One problem on one line (``title: line``); several under the title, one per line."""
    if len(lines) == 1:
        return f"{title}: {lines[0]}"
    return f"{title} ({len(lines)} problems):\n  " + "\n  ".join(lines)
