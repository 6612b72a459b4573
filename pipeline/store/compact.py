"""``esam3 store compact``: merge the small fragments cache runs leave into large ones.

Each teacher block (8 images, or 8 video frames) becomes its own Lance fragment, so a full SA-1B store would
hold ~1.4M fragments: every commit rewrites a manifest listing all of them (~165 B each, ~230 MB) and every
reader opens it. Compaction rewrites small fragments into fragments of ``rows_per_fragment`` rows (one new
version; rows, keys and bytes unchanged; blobs copied) and materialises deleted rows. Readers pinned to an
older version keep reading it until ``esam3 store cleanup`` removes it.

It rewrites the data it merges (at full size ~6.5 MB per image), from this one process with Lance's threads:
run it between cache runs, not while one writes (refused while a run's claim is live: a compaction and a
rerun's deletes of the same fragments conflict).
"""

from __future__ import annotations

from typing import Any

from lance.optimize import Compaction

from esam3.pipeline.store.claims import refuse_while_writing
from esam3.pipeline.store import Store
from esam3.pipeline.store.snapshots import tag_if_complete
from esam3.schemas.store import KEY_COLUMNS, LANCE_FILE_VERSION, TABLES


def compact_store(store: Store, rows_per_fragment: int = 1024, dry_run: bool = False) -> dict[str, Any]:
    """Compact every table (or, with ``dry_run``, count the rewrite tasks Lance would run); fragments before/after."""
    store.require_card()
    if rows_per_fragment < 1:
        raise ValueError(f"rows_per_fragment must be at least 1, got {rows_per_fragment}")
    refuse_while_writing(store, "compact it when that run has finished")
    options = {"target_rows_per_fragment": rows_per_fragment, "materialize_deletions": True, "data_storage_version": LANCE_FILE_VERSION}
    tables: dict[str, dict[str, Any]] = {}
    for name in TABLES:
        try:
            ds = store.dataset(name)
            if name in KEY_COLUMNS:  # also in a dry run (rows untouched), so that its plan is the real one
                store.index_keys(name, merge=True)  # one index segment: Lance compacts no fragments that several cover
                ds = store.dataset(name)
            before = len(ds.get_fragments())
            if dry_run:
                entry = {"tasks": Compaction.plan(ds, options).num_tasks()}
            else:
                metrics = ds.optimize.compact_files(**options)
                entry = {"fragments_removed": metrics.fragments_removed, "fragments_added": metrics.fragments_added}
            after = before if dry_run else len(store.dataset(name).get_fragments())
            if not dry_run and name in KEY_COLUMNS and entry["fragments_added"]:
                store.index_keys(name)  # the rewritten fragments get new ids: index them, then pin the result
                tag_if_complete(store, name)
        except (OSError, ValueError) as exc:
            raise store.failure(f"compact {name}", exc) from None
        tables[name] = {"fragments_before": before, "fragments_after": after, **entry}
    return {"store": store.uri, "dry_run": dry_run, "rows_per_fragment": rows_per_fragment, "tables": tables}
