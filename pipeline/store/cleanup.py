"""``esam3 store cleanup``: remove old table versions and the files that only they, or no version, reference.

Every commit of the cache is a Lance version, so a long run leaves thousands of them, and with them the data files
of rows deleted since (unfinished shards that were run again, duplicate keys). Files of fragments a killed worker
wrote but nobody committed are referenced by no version at all. Lance's cleanup removes versions older than a
cut-off (keeping the newest N if asked, never the latest) and every file that no remaining version references;
files no version references *yet* are only removed once they are 7 days old, since they may belong to a commit in
flight, unless ``unverified`` says that no run is writing to the store (refused while a run's claim is live).

A version's age is counted from when a newer one replaced it, not from when it was made: Lance's own
``older_than`` counts from creation, which would delete the version a trainer opened an hour ago if the store was
last written weeks before and a rerun committed since. So a reader that opened the latest version within
``older_than`` keeps it: pick ``older_than`` longer than a training run.

Snapshot tags (``snapshots.py``) would keep their versions forever: the cleanup first drops every snapshot but the
newest whose version it may remove by the same age rule (a dry run counts them without dropping; Lance's own
dry-run figures then leave those versions out).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from esam3.pipeline.store.claims import refuse_while_writing
from esam3.pipeline.store import Store
from esam3.pipeline.store.snapshots import drop_old_snapshots
from esam3.schemas.cleanup import CleanupConfig
from esam3.schemas.store import TABLE_OF, TABLES

_STATS = ("old_versions", "data_files_removed", "deletion_files_removed", "transaction_files_removed", "bytes_removed")


def cleanup_store(store: Store, config: CleanupConfig) -> dict[str, Any]:
    """Clean every table of the store (or only report, with ``dry_run``); returns the counts per table and in all."""
    store.require_card()
    if config.unverified:
        refuse_while_writing(
            store, "--unverified would delete fragments it has written but not yet committed: run the cleanup when it has finished"
        )
    options = {
        "delete_unverified": config.unverified,
        "error_if_tagged_old_versions": False,  # a version someone tagged stays, without failing the rest
    }
    now = dt.datetime.now()  # Lance's version timestamps are naive local time
    tables: dict[str, dict[str, int]] = {}
    for name in TABLES:
        try:
            ds = store.dataset(name)
            history = ds.versions()
            # The latest version is never removed; listing it keeps the list non-empty (Lance refuses an empty one)
            # and still lets the unreferenced-file pass run.
            removable = removable_versions(history, now - config.older_than, config.keep_versions)
            dropped = drop_old_snapshots(store, name, set(removable), config.dry_run) if name in TABLE_OF.values() else 0
            chosen = [*removable, ds.version]
            options["versions"] = chosen
            stats = ds.explain_cleanup_old_versions(**options).stats if config.dry_run else ds.cleanup_old_versions(**options)
            versions = len(store.dataset(name).versions())
        except (OSError, ValueError) as exc:  # e.g. read-only credentials: a 403 on the first delete; server down
            raise store.failure(f"clean up {name}", exc) from None
        tables[name] = {field: int(getattr(stats, field)) for field in _STATS}
        tables[name]["snapshots_removed"] = dropped
        tables[name]["versions_left"] = versions - tables[name]["old_versions"] if config.dry_run else versions
    total = {field: sum(t[field] for t in tables.values()) for field in _STATS}
    return {"store": store.uri, "dry_run": config.dry_run, "tables": tables, "total": total}


def removable_versions(history: Sequence[dict[str, Any]], cutoff: dt.datetime, keep: int | None) -> list[int]:
    """Versions replaced by a newer one before ``cutoff``, except the newest ``keep`` (and never the latest)."""
    ordered = sorted(history, key=lambda v: v["version"])
    protected = len(ordered) - (keep or 1)
    return [
        version["version"]
        for index, (version, successor) in enumerate(zip(ordered, ordered[1:]))
        if index < protected and successor["timestamp"] < cutoff
    ]
