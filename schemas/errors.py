"""esam3's errors: one base class with the exit code on it, and one-line messages (pydantic's errors included)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import ClassVar

from pydantic import ValidationError


class Esam3Error(Exception):
    """An error esam3 reports as one line that says what to do. ``exit_code`` 2: the input or set-up is the user's to
    fix (flags, config, source, store, teacher); 1: a run to repeat as it is (an outage, a shard to read again).
    ``advice`` is added to the message where the error is reported."""

    exit_code: ClassVar[int] = 2
    advice: ClassVar[str] = ""


class ConfigError(Esam3Error, ValueError):
    """Settings that cannot work together, found below the command line (e.g. the memory a setting implies)."""


def describe(exc: ValidationError, name: Callable[[str], str] = str, limit: int = 3) -> str:
    """``"field.sub: message; other: message (+2 more)"``; ``name`` maps a top-level field to its user-facing name."""
    parts = []
    for err in exc.errors()[:limit]:
        loc = [str(p) for p in err["loc"]]
        where = ".".join([name(loc[0]), *loc[1:]]) if loc else "(input)"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}")
    extra = len(exc.errors()) - limit
    return "; ".join(parts) + (f" (+{extra} more)" if extra > 0 else "")


#: The source location Lance's Rust code appends to its errors: a path on Lance's build machine, not the user's.
_RUST_LOCATION = re.compile(r",? /\S+\.rs:\d+:\d+")


def first_line(exc: BaseException) -> str:
    """The informative first line of an exception's message (skipping a bare "...:" header, and without a Rust
    source location), or its type name."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return _RUST_LOCATION.sub("", lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0])
