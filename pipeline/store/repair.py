"""``esam3 store repair``: mend a damaged store so that the same cache command caches again exactly what was lost.

``store verify`` names the shards whose rows are lost (a data file gone) or damaged (a tensor that does not decode,
a row without a tensor its targets include), and rows that runs left of shards they did not commit. Repair, with no
run writing to the store:

1. drops the fragments whose data cannot be read at all (a Lance ``Delete`` of whole fragments: their files are
   never opened) and deletes the remaining rows of damaged shards and the leftover rows;
2. deletes those shards' failures, ledger rows, commit markers and pending notes, so that they are no longer
   committed: a rerun of the cache command that made them selects exactly them (the rest is skipped);
3. updates the key indexes and tags the result as a snapshot when it is complete.

Rows of intact shards are never touched.
"""

from __future__ import annotations

import logging
from typing import Any

from lance import LanceDataset, LanceOperation

from esam3.pipeline.store.check import TARGET_TABLES, VerifyReport, verify_store
from esam3.pipeline.store.claims import refuse_while_writing
from esam3.pipeline.store.commits import delete_rows, forget_commit
from esam3.pipeline.store.root import Store, quote_sql
from esam3.pipeline.store.snapshots import tag_if_complete
from esam3.schemas.store import dataset_of

log = logging.getLogger(__name__)


def repair_store(store: Store, dry_run: bool = False, report: VerifyReport | None = None) -> dict[str, Any]:
    """Repair the store (see the module docstring); returns what was (or, with ``dry_run``, would be) removed."""
    refuse_while_writing(store, "repair it when that run has finished")
    report = report or verify_store(store)
    out: dict[str, Any] = {"store": store.uri, "dry_run": dry_run, "tables": {}}
    for table in TARGET_TABLES:
        shards = sorted(report.damaged_shards.get(table, []))
        fragments = sorted(report.lost_fragments.get(table, []))
        leftovers = sorted(report.leftover_rows.get(table, []))
        out["tables"][table] = {
            "shards": shards,
            "fragments_dropped": fragments,
            "leftover_runs": [list(p) for p in leftovers],
            "rows_removed": 0,
        }
        if dry_run or not (shards or fragments or leftovers):
            continue
        removed = _drop_fragments(store, table, fragments)
        if shards:
            removed += delete_rows(store, table, f"shard IN ({quote_sql(shards)})")
        for shard, run in leftovers:
            removed += delete_rows(store, table, f"shard = {quote_sql([shard])} AND run_id = {quote_sql([run])}")
        dataset = dataset_of(table)
        for shard in shards:
            forget_commit(store, dataset, shard)
        out["tables"][table]["rows_removed"] = removed
        store.index_keys(table)
        tag_if_complete(store, table)
    out["shards"] = sum(len(t["shards"]) for t in out["tables"].values())
    return out


def _drop_fragments(store: Store, table: str, fragment_ids: list[int]) -> int:
    """Remove whole fragments from the table without reading them; returns the rows they held."""
    if not fragment_ids:
        return 0
    ds = store.dataset(table)
    rows = sum(f.count_rows() for f in ds.get_fragments() if f.fragment_id in fragment_ids)
    LanceDataset.commit(
        store.table_uri(table),
        LanceOperation.Delete([], fragment_ids, f"fragments {fragment_ids} lost (esam3 store repair)"),
        read_version=ds.version,
        storage_options=store.storage_options or None,
    )
    log.warning("%s: dropped fragment(s) %s whose data could not be read (%d rows)", table, fragment_ids, rows)
    return rows
