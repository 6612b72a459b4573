"""The ``--shards`` grammar: ``all``, ``7``, ``0-99``, ``0,3,7-9`` (inclusive ranges, any order, no duplicates kept)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass


class ShardSpecError(ValueError):
    """A ``--shards`` value that cannot be used; the message is one line meant for the user."""


_TERM = re.compile(r"^(\d+)(?:-(\d+))?$")


@dataclass(frozen=True)
class ShardSpec:
    """A parsed ``--shards`` value. ``ids`` is None for ``all``."""

    text: str
    ids: tuple[int, ...] | None

    @classmethod
    def parse(cls, text: str) -> ShardSpec:
        spec = text.strip()
        if spec.lower() == "all":
            return cls(text=spec, ids=None)
        if not spec:
            raise ShardSpecError("empty shard spec: use e.g. 0-99, 0,3,7-9 or all")
        ids: set[int] = set()
        for term in spec.split(","):
            term = term.strip()
            if term.startswith("-"):
                raise ShardSpecError(f"shard spec {text!r}: negative shard {term!r} (shard numbers start at 0)")
            match = _TERM.match(term)
            if match is None:
                raise ShardSpecError(
                    f"shard spec {text!r}: cannot read {term!r} (use N, A-B, comma lists, or all)"
                )
            lo = int(match.group(1))
            hi = int(match.group(2)) if match.group(2) is not None else lo
            if hi < lo:
                raise ShardSpecError(f"shard spec {text!r}: reversed range {lo}-{hi} (write {hi}-{lo})")
            ids.update(range(lo, hi + 1))
        return cls(text=spec, ids=tuple(sorted(ids)))

    def select(self, available: Iterable[int]) -> list[int]:
        """The selected shard ids among those that exist; every requested id must exist."""
        have = sorted(set(available))
        if self.ids is None:
            if not have:
                raise ShardSpecError("no shards found at the source")
            return have
        missing = sorted(set(self.ids) - set(have))
        if missing:
            where = f"available: {format_ids(have)}" if have else "the source has no shards"
            raise ShardSpecError(f"shards {format_ids(missing)} do not exist at the source ({where})")
        return list(self.ids)


def format_ids(ids: Iterable[int]) -> str:
    """Compact form of a set of ids: ``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    out: list[str] = []
    run: list[int] = []
    for i in sorted(set(ids)):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)
