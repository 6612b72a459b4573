"""``esam3 store info`` and ``esam3 store verify``: what a store holds, and whether it is consistent.

verify checks every invariant the cache promises: no duplicate keys; the ledger agrees with the rows (every
shard with rows has exactly one ledger entry, with the same row and failure counts); every tensor of every row
decodes with its codec and is finite; every row names the store's teacher.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from esam3.pipeline.object_store import storage_failed
from esam3.pipeline.store import Store
from esam3.pipeline.store.root import quote_sql
from esam3.pipeline.store.commits import ledger_entries
from esam3.pipeline.store.runs import read_runs
from esam3.pipeline.store.snapshots import ledger_rows, snapshot_rows, snapshots
from esam3.pipeline.store.rows import StoreRows
from esam3.schemas.cache import ErrorBudget
from esam3.schemas.codecs import CodecError
from esam3.schemas.errors import first_line
from esam3.schemas.store import TABLE_OF, StoreError, blob_columns, dataset_of, tensor_columns

TARGET_TABLES = tuple(TABLE_OF.values())
#: Columns where NaN is data ("no box"), not corruption: only Inf is a problem there.
NAN_MEANS_ABSENT = frozenset({"prompt_boxes"})
_PROBLEM_LIMIT = 50


def _unreadable(exc: Exception) -> bool:
    """A store file missing or unreadable (Arrow's errors), or the storage failing (OSError, Lance's IO errors)."""
    return isinstance(exc, pa.ArrowException) or storage_failed(exc)


def store_info(store: Store, sample_rows: int = 64) -> dict[str, Any]:
    """Rows, versions, bytes per row per column (from up to ``sample_rows`` rows), teacher, failures, ledger."""
    card = store.require_card()
    try:
        return _store_info(store, card, sample_rows)
    except (OSError, ValueError) as exc:  # a data file gone (ArrowInvalid), or the storage down
        if not _unreadable(exc):
            raise
        raise StoreError(f"store {store.uri}: cannot be read ({first_line(exc)}); `esam3 store verify` says which rows") from None


def _store_info(store: Store, card: dict[str, Any], sample_rows: int) -> dict[str, Any]:
    tables: dict[str, Any] = {}
    for name in ("images", "frames", "failures", "ledger"):
        ds = store.dataset(name)
        entry: dict[str, Any] = {"rows": ds.count_rows(), "version": ds.version, "fragments": len(ds.get_fragments())}
        if name in TARGET_TABLES and entry["rows"]:
            sample = ds.to_table(columns=tensor_columns(name), limit=sample_rows).to_pylist()  # blobs: descriptors
            per_column = {}
            for column in tensor_columns(name):
                data_size = (lambda d: d["size"]) if column in blob_columns(name) else len
                sizes = [data_size(r[column]["data"]) + len(r[column]["scale"]) for r in sample if r[column] is not None]
                if sizes:
                    per_column[column] = int(np.mean(sizes))
            entry["bytes_per_row"] = per_column
            entry["bytes_per_row_total"] = int(sum(per_column.values()))
        if name in TARGET_TABLES:
            found = snapshots(store, name)  # newest first: trainers read the newest
            entry["snapshots"] = [s.to_json() for s in found]
            if found:
                entry["snapshots"][0]["rows"] = snapshot_rows(store, name, found[0])
            entry["indexes"] = [index.field_names[0] for index in ds.describe_indices()]
            entry["unfinished_shards"] = unfinished_shards(store, name, entry["rows"])
        if name == "images" and entry["rows"]:
            entry["codec_task_error"] = codec_task_error(ds)
            choice = store.read_codec_choice("sa-1b")
            spec = card["targets"].get("sa-1b", {})
            if choice is not None and (spec.get("codec"), spec.get("rank")) == (choice["codec"], choice["rank"]):
                entry["codec_choice"] = {**choice, "budget_check": budget_check(ds, ErrorBudget(**choice["budget"]))}
        tables[name] = entry
    ledger = ledger_entries(store, columns=["dataset"])
    return {
        "store": store.uri,
        "teacher": card["teacher"],
        "targets": card["targets"],
        "tables": tables,
        "shards": dict(Counter(row["dataset"] for row in ledger)),
        "failures": tables["failures"]["rows"],
        "runs": [
            {k: r.get(k) for k in ("run_id", "status", "started_at", "ended_at", "host", "executor", "counts", "error")}
            | {"dataset": r.get("config", {}).get("dataset"), "versions": r.get("versions", {})}
            for r in read_runs(store)
        ],
    }


def codec_task_error(ds: Any) -> dict[str, Any]:
    """What the codecs cost the heads' masks, over every image row that measured it: the trunk codec's (decoded vs
    exact trunk through the heads) and the stored logits' (``logits_mask_iou``: codec and --mask-size)."""
    table = ds.to_table(columns=["codec_mask_iou", "codec_iou_error"], filter="codec_mask_iou IS NOT NULL")
    ious = np.asarray(table.column("codec_mask_iou").to_numpy(zero_copy_only=False), dtype=np.float64)
    errors = np.asarray(table.column("codec_iou_error").to_numpy(zero_copy_only=False), dtype=np.float64)
    logits = ds.to_table(columns=["logits_mask_iou"], filter="logits_mask_iou IS NOT NULL").column("logits_mask_iou")
    logit_ious = np.asarray(logits.to_numpy(zero_copy_only=False), dtype=np.float64)
    out: dict[str, Any] = {"rows": int(len(ious))}
    if len(ious):
        out.update(
            mask_iou_mean=round(float(ious.mean()), 5),
            mask_iou_p1=round(float(np.percentile(ious, 1)), 5),
            mask_iou_min=round(float(ious.min()), 5),
            iou_error_mean=round(float(errors.mean()), 5),
        )
    if len(logit_ious):
        out.update(
            logit_rows=int(len(logit_ious)),
            logits_mask_iou_mean=round(float(logit_ious.mean()), 5),
            logits_mask_iou_min=round(float(logit_ious.min()), 5),
        )
    return out


def budget_check(images: Any, budget: ErrorBudget, run_id: str | None = None) -> dict[str, Any]:
    """What ``--codec auto``'s budget says of the image rows (of one run, or all) that measured it: the means it
    bounds (1 - ``codec_mask_iou``, the trunk's relative RMS), whether they are within, and how many single rows are
    above (the budget bounds means, so some rows are above by design)."""
    where = "codec_mask_iou IS NOT NULL" + ("" if run_id is None else f" AND run_id = {quote_sql([run_id])}")
    table = images.to_table(columns=["codec_mask_iou", "trunk.error"], filter=where)
    if not table.num_rows:
        return {"rows": 0}
    loss = 1 - np.asarray(table.column(0).to_numpy(zero_copy_only=False), dtype=np.float64)
    rms = np.asarray(table.column(1).to_numpy(zero_copy_only=False), dtype=np.float64)
    means = {"mask_iou_loss": float(loss.mean()), "rel_rms": float(rms.mean())}
    return {
        "rows": int(table.num_rows),
        "means": {k: round(v, 6) for k, v in means.items()},
        "within": means["mask_iou_loss"] <= budget.mask_iou_loss and means["rel_rms"] <= budget.rel_rms,
        "rows_above": int(((loss > budget.mask_iou_loss) | (rms > budget.rel_rms)).sum()),
    }


#: Columns holding mask logits (logit8 / logit8d), whose bytes depend on their content.
LOGIT_COLUMNS = ("chosen_logits", "multi_logits", "single_logits", "mask_logits")


def logit_rate(ds: Any, sample_rows: int = 256) -> float | None:
    """Stored bytes per mask-logit value (codes after zstd, scales not counted) over up to ``sample_rows`` rows of a
    target table: what ``esam3 plan --measured-in`` counts the logits at; None without logits."""
    columns = [c for c in LOGIT_COLUMNS if c in ds.schema.names]
    nbytes = values = 0
    for row in ds.to_table(columns=columns, limit=sample_rows).to_pylist() if columns else []:  # blobs: descriptors
        for value in (row[c] for c in columns):
            if value is not None:
                nbytes += value["data"]["size"]
                values += int(np.prod(value["shape"]))
    return nbytes / values if values else None


def unfinished_shards(store: Store, table: str, head_rows: int) -> list[str]:
    """Shards with rows at the table's head but no ledger row (a run stopped mid-shard, or one committing now).
    Scans the shard column only when the head's row count differs from the ledger's."""
    if head_rows == ledger_rows(store, table)[1]:
        return []
    done = {r["shard"] for r in ledger_entries(store, f"dataset = '{dataset_of(table)}'", ["shard"])}
    present = set(store.dataset(table).to_table(columns=["shard"]).column("shard").to_pylist())
    return sorted(present - done)


@dataclass
class VerifyReport:
    store: str
    rows_checked: int = 0
    tensors_checked: int = 0
    problems: list[str] = field(default_factory=list)
    more_problems: int = 0
    #: table -> shards whose rows are lost or damaged (``store repair`` removes them so that a cache rerun redoes them)
    damaged_shards: dict[str, list[str]] = field(default_factory=dict)
    #: table -> fragments whose data cannot be read at all
    lost_fragments: dict[str, list[int]] = field(default_factory=dict)
    #: table -> (shard, run) of rows a run left that did not commit the shard (``store repair`` removes them)
    leftover_rows: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def damaged(self, table: str, shard: str) -> None:
        if shard not in self.damaged_shards.setdefault(table, []):
            self.damaged_shards[table].append(shard)

    def problem(self, text: str) -> None:
        if len(self.problems) < _PROBLEM_LIMIT:
            self.problems.append(text)
        else:
            self.more_problems += 1

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "ok": self.ok}


def verify_store(store: Store, on_rows: Callable[[int], None] | None = None) -> VerifyReport:
    """Check the store's invariants (see the module docstring); problems are listed, not raised."""
    report = VerifyReport(store.uri)
    card = store.require_card()
    teacher = card["teacher"]["checksum"]
    entries: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in store.dataset("ledger").to_table().to_pylist():  # all of it: a row twice is fine, two runs' rows are not
        entries.setdefault((row["dataset"], row["shard"]), []).append(row)
    for (dataset, shard), rows in entries.items():
        if len({(r["run_id"], r["fingerprint"]) for r in rows}) > 1:
            report.problem(f"ledger: {dataset} shard {shard} has {len(rows)} entries of runs {sorted({r['run_id'] for r in rows})}")
    failed = store.dataset("failures").to_table(columns=["shard", "member"]).to_pylist()
    failures = Counter(shard for shard, _ in {(f["shard"], f["member"]) for f in failed})  # failed samples per shard
    ledger_by_shard = {shard: rows[0] for (_, shard), rows in entries.items()}
    for shard, entry in ledger_by_shard.items():
        if entry["failures"] and shard not in failures:
            report.problem(f"failures: shard {shard} has none, its ledger entry says {entry['failures']}")
    for shard, count in failures.items():
        if shard not in ledger_by_shard:
            report.problem(f"failures: {count} failed samples of shard {shard}, which has no ledger entry")
        elif ledger_by_shard[shard]["failures"] != count:
            report.problem(
                f"failures: shard {shard} has {count} failed samples, its ledger entry says {ledger_by_shard[shard]['failures']}"
            )
    for table in TARGET_TABLES:
        before = report.rows_checked
        try:
            _verify_table(store, table, teacher, ledger_by_shard, card, report, on_rows)
        except (OSError, ValueError) as exc:  # a file gone or unreadable, or the storage down: the scan stops
            if not _unreadable(exc):
                raise
            report.problem(f"{table}: cannot be read after {report.rows_checked - before} of its rows ({first_line(exc)})")
    return report


def _verify_table(
    store: Store,
    table: str,
    teacher: str,
    ledger_by_shard: dict[str, dict[str, Any]],
    card: dict[str, Any],
    report: VerifyReport,
    on_rows: Callable[[int], None] | None,
) -> None:
    dataset_name = dataset_of(table)
    ds = store.dataset(table)
    readable, keys, per_run = [], Counter(), Counter()
    for fragment in ds.get_fragments():  # one by one: a lost data file costs its own rows only, and is named
        try:
            small = fragment.to_table(columns=["key", "shard", "run_id"])
        except (OSError, ValueError) as exc:
            if not _unreadable(exc):
                raise
            report.lost_fragments.setdefault(table, []).append(fragment.fragment_id)
            report.problem(f"{table}: fragment {fragment.fragment_id} ({fragment.count_rows()} rows) cannot be read ({first_line(exc)})")
            continue
        readable.append(fragment)
        keys.update(small.column("key").to_pylist())
        per_run.update(zip(small.column("shard").to_pylist(), small.column("run_id").to_pylist()))
    for key, count in keys.items():
        if count > 1:
            report.problem(f"{table}: key {key} appears {count} times")
    spec = card["targets"].get(dataset_name, {})
    required = frozenset({"trunk"} & set(spec.get("targets", [])))  # prompt and object columns may be empty
    if spec.get("inputs", "store") == "store":
        required |= {"input"}
    for shard in _check_rows(StoreRows(store, table, ds.version), readable, table, teacher, required, report, on_rows):
        report.damaged(table, shard)
    per_shard: Counter[str] = Counter()
    for (shard, run), count in per_run.items():
        entry = ledger_by_shard.get(shard)
        if entry is None:
            report.problem(f"{table}: {count} rows of shard {shard}, which has no ledger entry (an unfinished run?)")
        elif entry["run_id"] != run:
            report.problem(f"{table}: {count} rows of shard {shard} from run {run}, which did not commit it (run {entry['run_id']} did)")
            report.leftover_rows.setdefault(table, []).append((shard, run))
        else:
            per_shard[shard] += count
    for shard, entry in ledger_by_shard.items():
        if entry["dataset"] != dataset_name or per_shard[shard] == entry["rows"]:
            continue
        lost = "rows lost" if per_shard[shard] < entry["rows"] else "rows too many"
        report.problem(f"{table}: shard {shard} has {per_shard[shard]} readable rows, its ledger entry says {entry['rows']} ({lost})")
        report.damaged(table, shard)
    expected = card["targets"].get(dataset_name, {}).get("fingerprint")
    for shard, entry in ledger_by_shard.items():
        if entry["dataset"] == dataset_name and expected and entry["fingerprint"] != expected:
            report.problem(f"ledger: shard {shard} has fingerprint {entry['fingerprint']}, the store's {dataset_name} targets {expected}")


def _check_rows(
    rows: StoreRows,
    fragments: list[Any],
    table: str,
    teacher: str,
    required: frozenset[str],
    report: VerifyReport,
    on_rows: Callable[[int], None] | None,
) -> set[str]:
    """Every row of these fragments: its teacher, its required tensors present, every tensor decodes and is finite;
    returns the shards of rows that fail (a blob file lost or damaged shows here)."""
    bad: set[str] = set()

    def problem(row: dict[str, Any], text: str) -> None:
        report.problem(f"{table}: {row['key']} {text}")
        bad.add(row["shard"])

    for batch in rows.batches(batch_size=16, fragments=fragments):
        for row in batch:
            report.rows_checked += 1
            if row["teacher"] != teacher:
                problem(row, f"was made by teacher {row['teacher']}, the store's is {teacher}")
            objects = len(row["object_ids"]) if table == "frames" else (row["prompt_kinds"] or {"shape": [0]})["shape"][0]
            if len(row["gt_masks"] or []) != objects and (table == "frames" or row["prompt_kinds"] is not None):
                problem(
                    row,
                    f"has {len(row['gt_masks'] or [])} ground-truth masks for {objects} {'objects' if table == 'frames' else 'prompts'}",
                )
            for column in tensor_columns(table):
                value = row[column]
                if value is None:
                    if column in required:
                        problem(row, f"has no {column}, which the store's targets include")
                    continue
                report.tensors_checked += 1
                try:
                    array = rows.decode(row, column)
                except (CodecError, ValueError, TypeError) as exc:  # TypeError: a struct with null fields
                    problem(row, f"{column} does not decode ({first_line(exc)})")
                    continue
                if array.dtype.kind == "f":
                    bad_values = np.isinf(array) if column in NAN_MEANS_ABSENT else ~np.isfinite(array)
                    if bad_values.any():
                        problem(row, f"{column} holds NaN or Inf")
        if on_rows:
            on_rows(len(batch))
    return bad
