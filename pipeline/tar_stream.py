"""Stream a tar shard member by member, grouping members into samples, without touching the filesystem.

Shards are read once, front to back (``tarfile`` stream mode), so a shard on S3 is never downloaded whole
and nothing is extracted. Members of one sample (``sa_1.jpg`` + ``sa_1.json``) are buffered until the sample
is complete, which keeps memory at one sample when, as in the released shards, they are adjacent; limits on
member size and on buffered bytes keep a malformed shard from exhausting memory.

Corruption (a cut or garbled header, a member cut short, a missing end-of-archive marker) becomes one
:class:`Failure` for the rest of the shard. An ``OSError`` while reading is not corruption but an
infrastructure fault (network reset, a shard that vanished): it is raised as :class:`ShardReadError` so the
caller can retry the shard.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO

from esam3.schemas.samples import Failure
from esam3.schemas.errors import Esam3Error

#: Larger members are skipped (SA-1B JPEGs are a few MB, SA-V mp4s tens of MB).
MAX_MEMBER_BYTES = 2 << 30
#: Bytes of incomplete samples held while waiting for their other members.
MAX_PENDING_BYTES = 4 << 30


class ShardReadError(OSError, Esam3Error):
    """Reading a shard failed for a reason outside the data (I/O, network); retrying may succeed."""

    exit_code = 1
    advice = "rerun to retry"


class _CorruptTar(tarfile.TarError):
    pass


class _StrictInfo(tarfile.TarInfo):
    """Stream-mode ``tarfile`` silently stops at a truncated or invalid header; make that an error instead."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            raise  # the end-of-archive marker: a clean end
        except tarfile.EmptyHeaderError:
            raise _CorruptTar("the archive ends without an end-of-archive marker") from None
        except (tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as exc:
            raise _CorruptTar(f"bad header: {exc}") from None


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

    @property
    def nbytes(self) -> int:
        return sum(len(data) for _, data in self.parts.values())


def iter_member_groups(
    fileobj: IO[bytes],
    split: Callable[[str], tuple[str, str] | None],
    required: frozenset[str],
    dataset: str,
    shard: str,
) -> Iterator[MemberGroup | Failure]:
    """Yield each complete sample, and a :class:`Failure` for incomplete samples or a corrupt tar.

    ``split(basename)`` returns ``(stem, part)`` for members that belong to a sample, or None for members to
    ignore (directories, other files such as SA-V's ``_auto.json``). A sample is complete when it has every
    part in ``required``. Raises :class:`ShardReadError` on I/O errors.
    """
    pending: dict[str, MemberGroup] = {}
    pending_bytes = 0
    last = None
    try:
        with tarfile.open(fileobj=fileobj, mode="r|", tarinfo=_StrictInfo) as tar:
            for info in tar:
                last = info.name
                if not info.isfile():
                    continue
                parsed = split(info.name.rsplit("/", 1)[-1])
                if parsed is None:
                    continue
                if info.size > MAX_MEMBER_BYTES:
                    reason = f"member of {info.size} bytes is over the {MAX_MEMBER_BYTES}-byte limit"
                    yield Failure(dataset, shard, info.name, reason)
                    continue
                stem, part = parsed
                extracted = tar.extractfile(info)
                assert extracted is not None  # a regular file always has data
                data = extracted.read()
                group = pending.setdefault(stem, MemberGroup(stem))
                if part in group.parts:  # a repeated member replaces the earlier one
                    pending_bytes -= len(group.data(part))
                group.parts[part] = (info.name, data)
                pending_bytes += len(data)
                if required <= group.parts.keys():
                    pending_bytes -= group.nbytes
                    yield pending.pop(stem)
                while pending_bytes > MAX_PENDING_BYTES and pending:
                    oldest = pending.pop(next(iter(pending)))
                    pending_bytes -= oldest.nbytes
                    yield _incomplete(oldest, required, dataset, shard, "(its other members are too far away)")
    except (tarfile.TarError, EOFError) as exc:
        where = f"at or after member {last}" if last else "at the start"
        lost = f"; incomplete samples lost: {', '.join(pending)}" if pending else ""
        yield Failure(
            dataset,
            shard,
            last or "(tar header)",
            f"truncated or corrupt tar {where}: {exc}; the rest of the shard is lost{lost}",
        )
        return
    except OSError as exc:
        raise ShardReadError(f"reading {shard} failed after member {last}: {exc}") from exc
    for group in pending.values():
        yield _incomplete(group, required, dataset, shard)


def _incomplete(group: MemberGroup, required: frozenset[str], dataset: str, shard: str, why: str = "") -> Failure:
    missing = ", ".join(sorted(required - group.parts.keys()))
    return Failure(dataset, shard, group.first_member, f"sample {group.stem} has no {missing} member {why}".rstrip())
