"""Stream a tar shard member by member, grouping members into samples, without touching the filesystem.

Shards are read once, front to back (``tarfile`` stream mode), so a shard on S3 is never downloaded whole
and nothing is extracted. Members of one sample (``sa_1.jpg`` + ``sa_1.json``) are buffered until the sample
is complete, which keeps memory at one sample when, as in the released shards, they are adjacent.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO

from esam3.schemas.samples import Failure


@dataclass
class MemberGroup:
    """The members of one sample: part name (e.g. ``".jpg"``) -> (member name, bytes)."""

    stem: str
    parts: dict[str, tuple[str, bytes]] = field(default_factory=dict)

    def member(self, part: str) -> str:
        return self.parts[part][0]

    def data(self, part: str) -> bytes:
        return self.parts[part][1]

    @property
    def first_member(self) -> str:
        return next(iter(self.parts.values()))[0]


def iter_member_groups(
    fileobj: IO[bytes],
    split: Callable[[str], tuple[str, str] | None],
    required: frozenset[str],
    dataset: str,
    shard: str,
) -> Iterator[MemberGroup | Failure]:
    """Yield each complete sample, and a :class:`Failure` for incomplete samples or a truncated/corrupt tar.

    ``split(basename)`` returns ``(stem, part)`` for members that belong to a sample, or None for members to
    ignore (directories, other files such as SA-V's ``_auto.json``). A sample is complete when it has every
    part in ``required``.
    """
    pending: dict[str, MemberGroup] = {}
    current = "(tar header)"
    try:
        with tarfile.open(fileobj=fileobj, mode="r|") as tar:
            for info in tar:
                current = info.name
                if not info.isfile():
                    continue
                parsed = split(info.name.rsplit("/", 1)[-1])
                if parsed is None:
                    continue
                stem, part = parsed
                extracted = tar.extractfile(info)
                assert extracted is not None  # a regular file always has data
                data = extracted.read()
                group = pending.setdefault(stem, MemberGroup(stem))
                group.parts[part] = (info.name, data)
                if required <= group.parts.keys():
                    yield pending.pop(stem)
    except (tarfile.TarError, EOFError, OSError) as exc:
        yield Failure(dataset, shard, current, f"truncated or corrupt tar: {exc}; the rest of the shard is lost")
    for group in pending.values():
        missing = ", ".join(sorted(required - group.parts.keys()))
        yield Failure(dataset, shard, group.first_member, f"sample {group.stem} has no {missing} member")
