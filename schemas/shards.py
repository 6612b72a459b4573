"""The ``--shards`` grammar: ``all``, ``7``, ``0-99``, ``0,3,7-9`` (inclusive ranges, any order, overlaps merged)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from esam3.schemas.errors import Esam3Error


class ShardSpecError(Esam3Error, ValueError):
    """A ``--shards`` value that cannot be used; the message is one line meant for the user."""


_TERM = re.compile(r"^([0-9]+)(?:-([0-9]+))?$")
#: SA-1B numbers shards with 6 digits, SA-V with 3; anything longer is a typo.
_MAX_DIGITS = 9


@dataclass(frozen=True)
class ShardSpec:
    """A parsed ``--shards`` value: inclusive ``(lo, hi)`` ranges, sorted and merged; None for ``all``.

    Ranges are kept as ranges, so ``0-999999999`` costs nothing until it meets the shards that exist.
    """

    text: str
    ranges: tuple[tuple[int, int], ...] | None

    @classmethod
    def parse(cls, text: str) -> ShardSpec:
        spec = text.strip()
        if spec.lower() == "all":
            return cls(text=spec, ranges=None)
        if not spec:
            raise ShardSpecError("empty shard spec: use e.g. 0-99, 0,3,7-9 or all")
        ranges: list[tuple[int, int]] = []
        for term in (t.strip() for t in spec.split(",")):
            if term.startswith("-"):
                raise ShardSpecError(f"shard spec {text!r}: negative shard {term!r} (shard numbers start at 0)")
            match = _TERM.match(term)
            if match is None:
                raise ShardSpecError(f"shard spec {text!r}: cannot read {term!r} (use N, A-B, comma lists, or all)")
            if any(group and len(group) > _MAX_DIGITS for group in match.groups()):
                raise ShardSpecError(f"shard spec {text!r}: {term!r} is not a shard number (at most {_MAX_DIGITS} digits)")
            lo = int(match.group(1))
            hi = int(match.group(2)) if match.group(2) is not None else lo
            if hi < lo:
                raise ShardSpecError(f"shard spec {text!r}: reversed range {lo}-{hi} (write {hi}-{lo})")
            ranges.append((lo, hi))
        return cls(text=spec, ranges=_merge(ranges))

    def __contains__(self, shard_id: int) -> bool:
        return self.ranges is None or any(lo <= shard_id <= hi for lo, hi in self.ranges)

    def select(self, available: Iterable[int]) -> list[int]:
        """The selected shard ids among those that exist; every requested id must exist."""
        have = sorted(set(available))
        if self.ranges is None:
            if not have:
                raise ShardSpecError("no shards found at the source")
            return have
        missing = _missing(self.ranges, have)
        if missing:
            where = f"available: {format_ids(have)}" if have else "the source has no shards"
            raise ShardSpecError(f"shards {_format_ranges(missing)} do not exist at the source ({where})")
        return [i for i in have if i in self]


def _merge(ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return tuple(merged)


def _missing(ranges: tuple[tuple[int, int], ...], have: list[int]) -> list[tuple[int, int]]:
    """Sub-ranges of ``ranges`` not covered by the sorted ids ``have`` (linear in the number of ids)."""
    gaps: list[tuple[int, int]] = []
    for lo, hi in ranges:
        cursor = lo
        for i in have:
            if i < cursor:
                continue
            if i > hi:
                break
            if i > cursor:
                gaps.append((cursor, i - 1))
            cursor = i + 1
        if cursor <= hi:
            gaps.append((cursor, hi))
    return gaps


def _format_ranges(ranges: Iterable[tuple[int, int]]) -> str:
    return ",".join(f"{lo}-{hi}" if hi > lo else str(lo) for lo, hi in ranges)


def format_ids(ids: Iterable[int]) -> str:
    """Compact form of a set of ids: ``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    runs: list[tuple[int, int]] = []
    for i in sorted(set(ids)):
        if runs and i == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return _format_ranges(runs)
