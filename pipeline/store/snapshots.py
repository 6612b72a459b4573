"""Snapshots a trainer can pin: a Lance tag on each version of a target table where the store is complete.

A version is *complete* when every visible row belongs to a shard in the ledger and no key is stored twice. The
cache reaches such a version after each shard's commit (its Append, the removal of keys stored by an earlier
shard, then its ledger row, in that order); between the Append and the ledger row, and after a run is killed
mid-shard, the latest version is not complete. So the driver tags a version only after the ledger row, and only
if the table's row count at that version equals the rows the ledger holds for the dataset: the ledger is read
after the version is opened, so a shard another run appended but has not yet entered in the ledger makes the
count larger, and one it entered after that version makes the ledger larger — either way no tag, and that run
tags its own commit. Readers open the newest tag (``latest``), never the moving head.

Each tag keeps its version (and the files only it references) from ``store cleanup``, so only the newest
``KEEP_SNAPSHOTS`` tags are kept; a trainer resolves a tag to its version number once, when it starts.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from esam3.pipeline.store.root import Store
from esam3.schemas.store import TABLE_OF, StoreError

log = logging.getLogger(__name__)

PREFIX = "complete-v"
KEEP_SNAPSHOTS = 4
_TAG = re.compile(rf"^{PREFIX}(\d+)$")


@dataclass(frozen=True)
class Snapshot:
    tag: str
    version: int
    rows: int
    created_at: str

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def dataset_of(table: str) -> str:
    return next(name for name, t in TABLE_OF.items() if t == table)


def tag_if_complete(store: Store, table: str) -> Snapshot | None:
    """Tag the table's latest version if it is complete (see the module docstring); returns the snapshot."""
    ds = store.dataset(table)
    rows = ds.count_rows()
    ledger = store.dataset("ledger").to_table(columns=["rows"], filter=f"dataset = '{dataset_of(table)}'")
    if rows != sum(ledger.column("rows").to_pylist()):
        log.info("%s version %d is not complete (another run's shard is being committed): not tagged", table, ds.version)
        return None
    name = f"{PREFIX}{ds.version}"
    try:
        ds.tags.create(name, ds.version)
    except (OSError, ValueError) as exc:  # a tag of the same version made by another run at the same moment
        if "exist" not in str(exc).lower():
            raise
    _prune(store, table)
    return next((s for s in snapshots(store, table) if s.tag == name), None)


def _prune(store: Store, table: str) -> None:
    for old in snapshots(store, table)[KEEP_SNAPSHOTS:]:
        try:
            store.dataset(table).tags.delete(old.tag)
        except (OSError, ValueError) as exc:  # another run pruned it first
            log.debug("tag %s already gone: %s", old.tag, exc)


def snapshots(store: Store, table: str) -> list[Snapshot]:
    """The table's snapshots, newest first."""
    ds = store.dataset(table)
    found = []
    for name, tag in ds.tags.list().items():
        if _TAG.match(name):
            created = tag.get("created_at") if isinstance(tag, dict) else getattr(tag, "created_at", None)
            version = tag["version"] if isinstance(tag, dict) else tag.version
            found.append(Snapshot(name, int(version), store.dataset(table, int(version)).count_rows(), str(created)))
    return sorted(found, key=lambda s: s.version, reverse=True)


def resolve(store: Store, table: str, version: int | str | None = None) -> int:
    """The version a trainer reads: the newest snapshot (None), a snapshot's tag, or a version number that is one."""
    if version is None:
        found = snapshots(store, table)
        if not found:
            raise StoreError(
                f"store {store.uri} has no complete snapshot of {table} yet (no shard has been committed): "
                "run esam3 cache until at least one shard is done"
            )
        return found[0].version
    tags = {s.tag: s.version for s in snapshots(store, table)}
    if isinstance(version, str) and not version.isdigit():
        if version not in tags:
            raise StoreError(f"store {store.uri} has no snapshot {version!r} of {table}; snapshots: {', '.join(tags) or 'none'} (esam3 store info)")
        return tags[version]
    number = int(version)
    if number not in tags.values():
        raise StoreError(
            f"version {number} of {table} in {store.uri} is not a complete snapshot (it may hold rows of an unfinished "
            f"shard); snapshots: {', '.join(f'{t} = {v}' for t, v in tags.items()) or 'none'} (esam3 store info)"
        )
    return number
