"""``esam3 store cleanup``: remove old table versions and the files that only they, or no version, reference.

Every commit of the cache is a Lance version, so a long run leaves thousands of them, and with them the data files
of rows deleted since (unfinished shards that were run again, duplicate keys). Files of fragments a killed worker
wrote but nobody committed are referenced by no version at all. Lance's cleanup removes versions older than a
cut-off (keeping the newest N if asked, never the latest) and every file that no remaining version references;
files no version references *yet* are only removed once they are 7 days old, since they may belong to a commit in
flight, unless ``unverified`` says that no run is writing to the store. A trainer reading a pinned version must
not have it cleaned away: pick ``older_than`` longer than a training run.
"""

from __future__ import annotations

from typing import Any

from esam3.pipeline.object_store import ACCESS_HINT, access_refused
from esam3.pipeline.store import Store
from esam3.schemas.cleanup import CleanupConfig
from esam3.schemas.errors import first_line
from esam3.schemas.store import TABLES, StoreError

_STATS = ("old_versions", "data_files_removed", "deletion_files_removed", "transaction_files_removed", "bytes_removed")


def cleanup_store(store: Store, config: CleanupConfig) -> dict[str, Any]:
    """Clean every table of the store (or only report, with ``dry_run``); returns the counts per table and in all."""
    if store.read_card() is None:
        raise StoreError(f"{store.uri} is not an esam3 store (no store.json)")
    options = {
        "older_than": config.older_than,
        "retain_versions": config.keep_versions,
        "delete_unverified": config.unverified,
        "error_if_tagged_old_versions": False,  # a version someone tagged stays, without failing the rest
    }
    tables: dict[str, dict[str, int]] = {}
    for name in TABLES:
        try:
            ds = store.dataset(name)
            stats = ds.explain_cleanup_old_versions(**options).stats if config.dry_run else ds.cleanup_old_versions(**options)
            versions = len(store.dataset(name).versions())
        except (OSError, ValueError) as exc:  # e.g. read-only credentials: a 403 on the first delete; server down
            hint = f"; {ACCESS_HINT}" if access_refused(exc) else ""
            raise StoreError(f"store {store.uri}: cannot clean up {name} ({first_line(exc)}){hint}") from None
        tables[name] = {field: int(getattr(stats, field)) for field in _STATS}
        tables[name]["versions_left"] = versions - tables[name]["old_versions"] if config.dry_run else versions
    total = {field: sum(t[field] for t in tables.values()) for field in _STATS}
    return {"store": store.uri, "dry_run": config.dry_run, "tables": tables, "total": total}
