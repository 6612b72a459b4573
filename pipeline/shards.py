"""Where a dataset's tar shards are and which of them a ``--shards`` spec selects (local folders or fsspec URLs)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from esam3.pipeline.object_store import ACCESS_HINT
from esam3.schemas.shards import ShardSpec, ShardSpecError
from esam3.schemas.errors import Esam3Error


class DatasetName(str, Enum):
    """Datasets esam3 reads, with their shard naming as released."""

    SA1B = "sa-1b"
    SAV = "sa-v"

    @property
    def shard_pattern(self) -> re.Pattern[str]:
        return re.compile(r"^sa_(\d{6})\.tar$" if self is DatasetName.SA1B else r"^sav_(\d{3})\.tar$")

    def shard_name(self, shard_id: int) -> str:
        return f"sa_{shard_id:06d}.tar" if self is DatasetName.SA1B else f"sav_{shard_id:03d}.tar"


@dataclass(frozen=True)
class ShardRef:
    """One shard: its number in the dataset and a URL (or local path) fsspec can open."""

    dataset: DatasetName
    shard_id: int
    url: str

    @property
    def name(self) -> str:
        return self.dataset.shard_name(self.shard_id)


class SourceError(Esam3Error, ValueError):
    """The source cannot be listed (unknown protocol, missing folder, refused access); one line for the user.

    Messages name the source URL only, never the storage options, so credentials do not leak.
    """


def list_shards(source: str, dataset: DatasetName, storage_options: dict[str, Any] | None = None) -> list[ShardRef]:
    """Every shard of ``dataset`` directly inside ``source``, by shard number."""
    try:
        fs, root = fsspec.core.url_to_fs(source, **(storage_options or {}))
        exists = fs.isdir(root)
        paths = fs.ls(root, detail=False) if exists else []
    except (ValueError, ImportError) as exc:
        raise SourceError(f"cannot use source {source!r}: {exc}") from None
    except PermissionError as exc:
        raise SourceError(f"access to source {source!r} refused ({exc}); {ACCESS_HINT}") from None
    except OSError as exc:
        raise SourceError(f"cannot list source {source!r}: {type(exc).__name__}: {exc}") from None
    if not exists:
        raise SourceError(f"source {source!r} is not a folder or prefix that exists")
    local = isinstance(fs, LocalFileSystem)
    found: list[ShardRef] = []
    for path in paths:
        match = dataset.shard_pattern.match(path.rstrip("/").rsplit("/", 1)[-1])
        if match:
            url = path if local else fs.unstrip_protocol(path)
            found.append(ShardRef(dataset=dataset, shard_id=int(match.group(1)), url=url))
    if not found:
        other = DatasetName.SAV if dataset is DatasetName.SA1B else DatasetName.SA1B
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in paths]
        theirs = [n for n in names if other.shard_pattern.match(n)]
        if theirs:
            raise SourceError(
                f"source {source!r} holds {other.value} shards ({theirs[0]}, ...), not {dataset.value} ones: pass --dataset {other.value}"
            )
    return sorted(found, key=lambda ref: ref.shard_id)


def select_shards(
    source: str, dataset: DatasetName, spec: ShardSpec | str, storage_options: dict[str, Any] | None = None
) -> list[ShardRef]:
    """The shards a spec names, checked against what exists at the source."""
    spec = ShardSpec.parse(spec) if isinstance(spec, str) else spec
    by_id = {ref.shard_id: ref for ref in list_shards(source, dataset, storage_options)}
    try:
        chosen = spec.select(by_id)
    except ShardSpecError as exc:
        raise ShardSpecError(f"{exc} [{dataset.value} shards under {source}]") from None
    return [by_id[i] for i in chosen]
