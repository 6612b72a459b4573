"""Fenced shard commits: a shard's rows become visible exactly once, however many runs cache it at once.

A shard's commit (only drivers commit; workers wrote its fragments, invisible until then):

1. note ``pending/<shard>/<run_id>`` (this run's rows of the shard may exist from now on), append the fragments
   (every row carries the run's ``run_id``), drop this run's rows whose key a committed shard already holds
   (recorded as failures), append the shard's failures;
2. create the shard's **commit marker** ``<shard>.json`` with :func:`~esam3.pipeline.store.once.create_once`:
   the commit point. Of all runs that got this far with the shard, exactly one creates it (local disks: ``link``;
   S3: ``If-None-Match``), whatever their clocks, claims or pauses;
3. the winner appends the shard's ledger row (the marker's content) and deletes the rows and failures of every
   other run noted pending on the shard; a loser deletes its own and says which run committed the shard. Only a
   run itself forgets its note, or any run once the noting run can no longer write (its claim file gone, or its
   process gone on this host) or a day later: a stalled Append may land after the winner's delete, and the next
   run's start deletes those rows again.

(All under ``commits/<dataset>/<fingerprint>/``.) Rows are deleted only by the run that wrote them or by the
shard's committer, and never the committer's. So a run that stalls past its claim's expiry (an S3 brown-out, a
paused VM) while a second run takes its shards over can neither lose rows the ledger points to nor add a second
copy: claims only keep runs from doing the same work twice. At its start a run finishes what stopped runs left
(:func:`recover`): rows of its shards that earlier runs wrote are noted pending (so their committer removes them);
a committer that died between its marker and its ledger row gets its ledger row and cleanup, once its claim is
dead (its process gone, or no heartbeat for a claim's expiry). Had that committer only been stalled, the ledger holds its row twice, identical, and
:func:`ledger_entries` (which every reader of the ledger uses) keeps one.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import pyarrow as pa
from lance import LanceDataset, LanceOperation
from lance.fragment import FragmentMetadata

from esam3.pipeline.store.claims import may_still_write
from esam3.pipeline.store.once import create_once
from esam3.pipeline.store.root import Store, quote_sql, retry_conflicts
from esam3.schemas.store import SCHEMAS

log = logging.getLogger(__name__)
COMMITS_DIR = "commits"
#: How long another run's pending note on a committed shard outlives that run's claim (see ``_clear_others``).
NOTE_EXPIRY = 24 * 3600.0


@dataclass(frozen=True)
class ShardCommit:
    """One shard as its writer finished it: what the driver commits."""

    table: str
    dataset: str
    shard: str
    source: str
    run_id: str
    fingerprint: str
    fragments: Sequence[dict[str, Any]] = ()
    failures: Sequence[dict[str, Any]] = ()
    keys: Sequence[str] = ()
    rows: int = 0
    bytes: int = 0
    samples: int = -1


@dataclass(frozen=True)
class Committed:
    """What a commit did: the table's version after it, rows stored, failed samples; ``won`` False when another run
    committed the shard first (this run's rows were removed again)."""

    version: int
    rows: int
    failures: int
    won: bool = True
    by: str = ""  # the run that committed the shard


def _folder(store: Store, dataset: str, fingerprint: str) -> str:
    return f"{store.path}/{COMMITS_DIR}/{dataset}/{fingerprint}"


def marker_path(store: Store, dataset: str, fingerprint: str, shard: str) -> str:
    return f"{_folder(store, dataset, fingerprint)}/{quote(shard, safe='')}.json"


def delete_rows(store: Store, table: str, where: str) -> int:
    """Delete the rows of ``table`` matching ``where``; returns how many there were."""

    def delete() -> int:
        ds = store.dataset(table)
        count = ds.count_rows(filter=where)
        if count:
            ds.delete(where)
        return count

    return retry_conflicts(delete, f"deleting from {table}")


def ledger_entries(store: Store, where: str | None = None, columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The ledger's rows, one per (dataset, shard, fingerprint): the first committed, should a recovery have
    added a committer's row twice (see the module docstring)."""
    table = store.dataset("ledger").to_table(filter=where)
    rows = sorted(table.to_pylist(), key=lambda r: r["committed_at"])
    entries: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in rows:
        entries.setdefault((row["dataset"], row["shard"], row["fingerprint"]), row)
    if columns is None:
        return list(entries.values())
    return [{c: row[c] for c in columns} for row in entries.values()]


def markers(store: Store, dataset: str, fingerprint: str) -> set[str]:
    """Shards whose commit marker exists: committed, with or without their ledger row yet."""
    folder = _folder(store, dataset, fingerprint)
    store.fs.invalidate_cache(folder)
    try:
        names = store.fs.ls(folder, detail=False)
    except FileNotFoundError:
        return set()
    return {unquote(name.rsplit("/", 1)[-1].removesuffix(".json")) for name in names if name.endswith(".json")}


def finished_shards(store: Store, dataset: str, fingerprint: str) -> set[str]:
    """Shards committed with this fingerprint: in the ledger, or past their commit point (marker)."""
    where = f"dataset = '{dataset}' AND fingerprint = '{fingerprint}'"
    return {r["shard"] for r in ledger_entries(store, where, ["shard"])} | markers(store, dataset, fingerprint)


def is_committed(store: Store, dataset: str, fingerprint: str, shard: str) -> bool:
    """Whether the shard is past its commit point (one request; the ledger may not have its row yet)."""
    path = marker_path(store, dataset, fingerprint, shard)
    store.fs.invalidate_cache(path)
    return store.fs.exists(path)


def existing_elsewhere(store: Store, commit: ShardCommit, committed: set[str]) -> dict[str, str]:
    """Keys of this shard that committed shards already hold, with the shard holding each (rows of unfinished
    shards do not count: their runs may never commit them)."""
    column = "key" if commit.table == "images" else "video_id"
    keys = sorted({k if commit.table == "images" else k.split("/")[1] for k in commit.keys})
    found: dict[str, str] = {}
    ds = store.dataset(commit.table)  # one open (a manifest read) for every chunk
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        rows = ds.to_table(columns=[column, "shard"], filter=f"{column} IN ({quote_sql(chunk)}) AND shard != {quote_sql([commit.shard])}")
        found.update((k, s) for k, s in zip(rows.column(column).to_pylist(), rows.column("shard").to_pylist()) if s in committed)
    return found


def _pending(store: Store, dataset: str, fingerprint: str, shard: str, run_id: str = "") -> str:
    return f"{_folder(store, dataset, fingerprint)}/pending/{quote(shard, safe='')}" + (f"/{quote(run_id, safe='')}" if run_id else "")


def note_pending(store: Store, dataset: str, fingerprint: str, shard: str, run_id: str) -> None:
    """Record that rows of ``shard`` by ``run_id`` may be in the tables (see ``_clear_others`` for who removes it)."""
    path = _pending(store, dataset, fingerprint, shard, run_id)
    store.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    store.fs.pipe_file(path, json.dumps({"run_id": run_id, "noted_at": time.time()}).encode())


def _noted_at(store: Store, entry: dict[str, Any], run_id: str) -> float:
    """When ``run_id`` noted the entry's shard (0: unknown, e.g. a note written by an older esam3)."""
    try:
        with store.fs.open(_pending(store, entry["dataset"], entry["fingerprint"], entry["shard"], run_id), "rb") as handle:
            return float(json.loads(handle.read()).get("noted_at", 0.0))
    except (OSError, ValueError, AttributeError):
        return 0.0


def _all_pending(store: Store, dataset: str, fingerprint: str) -> dict[str, set[str]]:
    """Every pending note of the dataset (one listing): shard -> runs."""
    folder = f"{_folder(store, dataset, fingerprint)}/pending"
    store.fs.invalidate_cache(folder)
    found: dict[str, set[str]] = {}
    for path in store.fs.find(folder):
        shard, run = path.rsplit("/", 2)[-2:]
        found.setdefault(unquote(shard), set()).add(unquote(run))
    return found


def _pending_runs(store: Store, dataset: str, fingerprint: str, shard: str) -> set[str]:
    folder = _pending(store, dataset, fingerprint, shard)
    store.fs.invalidate_cache(folder)
    try:
        return {unquote(p.rsplit("/", 1)[-1]) for p in store.fs.ls(folder, detail=False)}
    except FileNotFoundError:
        return set()


def _unnote(store: Store, entry: dict[str, Any], run_id: str) -> None:
    try:
        store.fs.rm(_pending(store, entry["dataset"], entry["fingerprint"], entry["shard"], run_id))
    except FileNotFoundError:  # another run cleared it meanwhile
        pass


def _clear_run(store: Store, commit: dict[str, Any], run_id: str, forget_note: bool) -> int:
    """Delete ``run_id``'s rows and failures of the commit's shard (and its note, if ``forget_note``); returns rows
    removed."""
    where = f"shard = {quote_sql([commit['shard']])} AND run_id = {quote_sql([run_id])}"
    removed = delete_rows(store, commit["table"], where) + delete_rows(store, "failures", where)
    if forget_note:
        _unnote(store, commit, run_id)
    return removed


def commit_shard(store: Store, commit: ShardCommit) -> Committed:
    """Make one shard visible exactly once (see the module docstring)."""
    table, shard, run = commit.table, commit.shard, commit.run_id
    taken = existing_elsewhere(store, commit, finished_shards(store, commit.dataset, commit.fingerprint)) if commit.keys else {}
    note_pending(store, commit.dataset, commit.fingerprint, shard, run)
    version = store.dataset(table).version
    if commit.fragments:
        metadata = [FragmentMetadata.from_json(json.dumps(f)) for f in commit.fragments]
        # Appends commute: Lance rebases this commit onto whatever other writers committed since read_version.
        version = LanceDataset.commit(
            store.table_uri(table),
            LanceOperation.Append(metadata),
            read_version=version,
            storage_options=store.storage_options or None,
        ).version
    rows, failures = commit.rows, list(commit.failures)
    if taken:
        column = "key" if table == "images" else "video_id"
        own = f"shard = {quote_sql([shard])} AND run_id = {quote_sql([run])}"
        rows -= delete_rows(store, table, f"{own} AND {column} IN ({quote_sql(sorted(taken))})")
        failures += [
            {
                "dataset": commit.dataset,
                "shard": shard,
                "member": key,
                "run_id": run,
                "reason": f"duplicate key {key}: already stored from {other}",
            }
            for key, other in taken.items()
        ]
    if failures:
        store.append(
            "failures", pa.Table.from_pylist([{k: f[k] for k in SCHEMAS["failures"].names} for f in failures], schema=SCHEMAS["failures"])
        )
    failed = len({f["member"] for f in failures})  # samples: a video with several failed frames counts once
    entry = {
        "dataset": commit.dataset,
        "shard": shard,
        "source": commit.source,
        "samples": commit.samples,
        "rows": rows,
        "failures": failed,
        "bytes": commit.bytes,
        "run_id": run,
        "fingerprint": commit.fingerprint,
        "committed_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "table": table,
    }
    if not create_once(store.fs, marker_path(store, commit.dataset, commit.fingerprint, shard), json.dumps(entry).encode()):
        winner = read_marker(store, commit.dataset, commit.fingerprint, shard)["run_id"]
        removed = _clear_run(store, entry, run, forget_note=True)  # its own note: nothing of it is left
        log.warning("%s was committed by run %s first; this run's copy is dropped (%d rows and failures removed)", shard, winner, removed)
        return Committed(store.dataset(table).version, 0, 0, won=False, by=winner)
    _after_commit_point(store, entry)
    return Committed(store.dataset(table).version, rows, failed, by=run)


def read_marker(store: Store, dataset: str, fingerprint: str, shard: str) -> dict[str, Any]:
    path = marker_path(store, dataset, fingerprint, shard)
    store.fs.invalidate_cache(path)
    with store.fs.open(path, "rb") as handle:
        return json.loads(handle.read())


def _after_commit_point(store: Store, entry: dict[str, Any]) -> None:
    """The committer's part after its marker: the ledger row, then the rows other runs left of the shard go."""
    row = {**entry, "committed_at": dt.datetime.fromisoformat(entry["committed_at"])}
    store.append("ledger", pa.Table.from_pylist([{k: row[k] for k in SCHEMAS["ledger"].names}], schema=SCHEMAS["ledger"]))
    _clear_others(store, entry)


def _clear_others(store: Store, entry: dict[str, Any]) -> None:
    """Delete the rows and failures of the committed shard that runs other than its committer noted pending.

    A note is forgotten only once its run can no longer write (``claims.may_still_write``: its claim file gone, or
    its process gone on this host) or after ``NOTE_EXPIRY``: a run stalled inside its Append may land its rows after
    this delete, and the next run's ``recover`` then deletes them again. The committer's own note goes: its Append
    landed before its marker."""
    runs = _pending_runs(store, entry["dataset"], entry["fingerprint"], entry["shard"])
    others = sorted(runs - {entry["run_id"]})
    active = may_still_write(store) if others else set()
    now, removed = time.time(), 0
    for run in others:
        over = run not in active or now - _noted_at(store, entry, run) > NOTE_EXPIRY
        removed += _clear_run(store, entry, run, forget_note=over)
    if removed:
        log.warning("%s: removed %d rows and failures that other runs left of it", entry["shard"], removed)
    if entry["run_id"] in runs:
        _unnote(store, entry, entry["run_id"])


def recover(store: Store, table: str, dataset: str, fingerprint: str, shards: Sequence[str], live_runs: set[str]) -> list[str]:
    """Finish what stopped runs left (see the module docstring) before a run caches ``shards``: the commits of
    committers that are not in ``live_runs`` (runs with a live claim); returns the shards whose commit this finished
    or whose leftover rows it removed."""
    committed = markers(store, dataset, fingerprint)
    ledgered = {r["shard"] for r in ledger_entries(store, f"dataset = '{dataset}' AND fingerprint = '{fingerprint}'", ["shard"])}
    todo = [s for s in shards if s not in committed and s not in ledgered]
    for name in (table, "failures"):  # rows of shards to cache that no commit will clear: noted for the committer
        if todo:
            found = store.dataset(name).to_table(columns=["shard", "run_id"], filter=f"shard IN ({quote_sql(todo)})")
            for shard, run in set(zip(found.column("shard").to_pylist(), found.column("run_id").to_pylist())):
                note_pending(store, dataset, fingerprint, shard, run)
    pending, finished = _all_pending(store, dataset, fingerprint), []
    for shard in sorted(committed):
        entry = read_marker(store, dataset, fingerprint, shard) if shard not in ledgered or shard in pending else None
        if entry is None or entry["run_id"] in live_runs:
            continue  # done, or its committer is finishing it now
        if shard not in ledgered:
            log.warning("%s: run %s committed it but stopped before its ledger row; finishing that commit", shard, entry["run_id"])
            _after_commit_point(store, entry)
        else:
            _clear_others(store, entry)
        finished.append(shard)
    return finished


def drop_own_leftovers(store: Store, table: str, shards: Sequence[str], run_id: str) -> int:
    """Delete the rows and failures tagged ``run_id`` in uncommitted ``shards``: an earlier process that ran under
    the same run id (given by the caller) and died after its Append left them, and the commit would otherwise take
    them for this run's own. Call it once this run holds its claim (no live run has the id) and before it appends
    anything; returns the rows removed."""
    if not shards:
        return 0
    where = f"shard IN ({quote_sql(list(shards))}) AND run_id = {quote_sql([run_id])}"
    removed = delete_rows(store, table, where) + delete_rows(store, "failures", where)
    if removed:
        log.warning("removed %d rows and failures an earlier run with the same run id %s left", removed, run_id)
    return removed


def forget_commit(store: Store, dataset: str, shard: str) -> None:
    """Make a committed shard uncommitted again (``store repair``, after its rows were removed): its failures, ledger
    rows, commit markers and pending notes go, so that the next cache run of the same settings caches it."""
    where = f"shard = {quote_sql([shard])}"
    folder = f"{store.path}/{COMMITS_DIR}/{dataset}"
    store.fs.invalidate_cache(folder)
    # The marker first: were this stopped midway, a ledger row without its marker is what verify and repair see
    # again, where a marker without its ledger row would make the next run's recover write the ledger row back.
    for path in store.fs.glob(f"{folder}/*/{quote(shard, safe='')}.json") + store.fs.glob(f"{folder}/*/pending/{quote(shard, safe='')}"):
        store.fs.rm(path, recursive=True)
    delete_rows(store, "ledger", f"dataset = {quote_sql([dataset])} AND {where}")
    delete_rows(store, "failures", f"dataset = {quote_sql([dataset])} AND {where}")
