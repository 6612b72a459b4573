"""Snapshots a trainer can pin: a Lance tag on each version of a target table where the store is complete.

A version is *complete* when every visible row belongs to a shard in the ledger and no key is stored twice. The
cache reaches such a version after each shard's commit (its Append, the removal of keys stored by an earlier
shard, then its ledger row, in that order); between the Append and the ledger row, and after a run is killed
mid-shard, the latest version is not complete. So the driver tags a version only after the ledger row, and only
if the table's row count at that version equals the rows the ledger holds for the dataset, read both before and
after the version is opened and unchanged in between: every shard in the ledger then had its rows appended before
the version was opened, so the ledgered rows are all in it, and equal counts leave room for no other row. (With one
ledger read only, a run's appended-but-unledgered rows could offset another's ledgered-but-later rows.) A commit
that finds another run mid-commit makes no tag; that run tags its own. Readers open the newest tag, never the head.

Tags keep their versions from ``store cleanup``; the cleanup drops the snapshots (but the newest) whose versions its
age rule would remove, so a trainer's pinned version stays as long as ``--older-than`` promises.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from dataclasses import dataclass
from typing import Any

from esam3.pipeline.store.commits import ledger_entries
from esam3.pipeline.store.root import Store
from esam3.schemas.store import StoreError, dataset_of

log = logging.getLogger(__name__)

PREFIX = "complete-v"
_TAG = re.compile(rf"^{PREFIX}(\d+)$")


@dataclass(frozen=True)
class Snapshot:
    tag: str
    version: int
    created_at: str

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def ledger_rows(store: Store, table: str) -> tuple[int, int]:
    """(ledger entries, rows they hold) of the table's dataset."""
    ledger = ledger_entries(store, f"dataset = '{dataset_of(table)}'", ["rows"])
    return len(ledger), sum(r["rows"] for r in ledger)


def tag_if_complete(store: Store, table: str) -> Snapshot | None:  # runs after every commit: no tag listing here
    """Tag the table's latest version if it is complete (see the module docstring); returns the snapshot."""
    before = ledger_rows(store, table)
    ds = store.dataset(table)
    after = ledger_rows(store, table)
    if before != after or ds.count_rows() != after[1]:
        log.info("%s version %d is not complete (a shard's rows without its ledger row): not tagged", table, ds.version)
        return None
    name = f"{PREFIX}{ds.version}"
    try:
        ds.tags.create(name, ds.version)
    except (OSError, ValueError) as exc:  # the same version tagged by another run at the same moment
        if "already exists" not in str(exc).lower():
            raise
    return Snapshot(name, ds.version, dt.datetime.now(dt.timezone.utc).isoformat())


def drop_old_snapshots(store: Store, table: str, removable: set[int], dry_run: bool = False) -> int:
    """Drop (or count) the snapshots whose version ``store cleanup`` may remove; the newest always stays."""
    doomed = [s for s in snapshots(store, table)[1:] if s.version in removable]
    if not dry_run:
        for old in doomed:
            store.dataset(table).tags.delete(old.tag)
    return len(doomed)


def snapshots(store: Store, table: str) -> list[Snapshot]:
    """The table's snapshots, newest first (one manifest read; see :func:`snapshot_rows` for their sizes)."""
    found = []
    for name, tag in store.dataset(table).tags.list().items():
        if _TAG.match(name):
            found.append(Snapshot(name, int(tag["version"]), str(tag.get("created_at"))))
    return sorted(found, key=lambda s: s.version, reverse=True)


def snapshot_rows(store: Store, table: str, snapshot: Snapshot) -> int:
    return store.dataset(table, snapshot.version).count_rows()


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
            raise StoreError(
                f"store {store.uri} has no snapshot {version!r} of {table}; snapshots: {', '.join(tags) or 'none'} (esam3 store info)"
            )
        return tags[version]
    number = int(version)
    if number not in tags.values():
        raise StoreError(
            f"version {number} of {table} in {store.uri} is not a complete snapshot (it may hold rows of an unfinished "
            f"shard); snapshots: {', '.join(f'{t} = {v}' for t, v in tags.items()) or 'none'} (esam3 store info)"
        )
    return number
