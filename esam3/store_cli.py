"""``esam3 store info|verify|show|cleanup|compact``: look into a feature store, check it, keep it tidy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from rich.text import Text

from esam3.cache_cli import S3_HELP, budget_said, s3_settings
from esam3.console import UsageError, build_config, console, human_bytes, print_json, progress, user_errors
from esam3.schemas.cache import ErrorBudget
from esam3.schemas.store import TABLE_OF, dataset_of

store_app = typer.Typer(help="Inspect and check a feature store.", no_args_is_help=True)


def open_store(uri: str, s3_endpoint: str | None) -> Any:
    from esam3.pipeline.store import Store

    return Store(uri, s3_settings(s3_endpoint))


#: ``store info`` suggests ``store compact`` for a table of at least this many fragments averaging fewer rows.
COMPACT_HINT_FRAGMENTS, COMPACT_HINT_ROWS = 64, 256


@store_app.command("info")
def info_command(
    uri: str = typer.Argument(..., help="Store root (folder or s3://...)."),
    s3_endpoint: str = typer.Option(None, "--s3-endpoint", help=S3_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON line."),
) -> None:
    """Rows per table, bytes per row per column, teacher, versions, shards and failures of a store."""
    from esam3.pipeline.store.check import store_info

    with user_errors():
        info = store_info(open_store(uri, s3_endpoint))
    if as_json:
        print_json(info)
        return
    teacher = info["teacher"]
    console.print(Text(f"store {uri}: teacher {teacher['source']} ({teacher['checksum']})"))
    table = Table(show_header=True)
    for column in ("table", "shards done", "rows", "fragments", "version", "bytes/row"):
        table.add_column(column, justify="right" if column != "table" else "left")
    for name, entry in info["tables"].items():
        per_row = entry.get("bytes_per_row_total")
        done = info["shards"].get(dataset_of(name), 0) if name in TABLE_OF.values() else None
        table.add_row(
            name,
            "-" if done is None else str(done),
            str(entry["rows"]),
            str(entry["fragments"]),
            str(entry["version"]),
            human_bytes(per_row) if per_row else "-",
        )
    console.print(table)
    for name, entry in info["tables"].items():
        if entry.get("snapshots"):
            newest = entry["snapshots"][0]
            older = ", ".join(s["tag"] for s in entry["snapshots"][1:])
            console.print(
                Text(f"{name}: trainers read snapshot {newest['tag']} ({newest['rows']} rows)" + (f"; older: {older}" if older else ""))
            )
        elif entry.get("rows"):
            console.print(Text(f"{name}: no complete snapshot yet"))
        if entry.get("unfinished_shards"):
            shards = entry["unfinished_shards"]
            console.print(
                Text(
                    f"{name}: {len(shards)} shard(s) have rows but no ledger row ({', '.join(shards[:5])}): trainers do not "
                    "see them; if no run is caching them now, rerun the same esam3 cache command to finish them"
                )
            )
    cost = info["tables"]["images"].get("codec_task_error", {})
    if cost.get("rows"):
        console.print(
            Text(
                f"images: the trunk codec costs the heads' masks a mean IoU of {cost['mask_iou_mean']:.4f} (1st percentile "
                f"{cost['mask_iou_p1']:.4f}, worst {cost['mask_iou_min']:.4f}) and {cost['iou_error_mean']:.4f} of predicted IoU, "
                f"over {cost['rows']} rows"
            )
        )
    choice = info["tables"]["images"].get("codec_choice")
    if choice:
        chosen = choice["codec"] + (f" r={choice['rank']}" if choice["rank"] else "")
        check = choice["budget_check"]
        console.print(
            Text(
                f"images: codec {chosen} chosen by --codec auto on {choice['rows']} pilot rows of {len(choice['shards'])} "
                f"shard(s) under --max-error {ErrorBudget(**choice['budget'])}"
                + (f"; the rows since: {budget_said(check)}" if check["rows"] else "")
            )
        )
    if cost.get("logit_rows"):
        console.print(
            Text(
                f"images: the stored mask logits (codec and size) keep the teacher's masks at a mean IoU of "
                f"{cost['logits_mask_iou_mean']:.4f} (worst {cost['logits_mask_iou_min']:.4f}) over {cost['logit_rows']} rows"
            )
        )
    if info["runs"]:
        runs = Table(title=Text("runs (runs/<run_id>.json: config, versions)"), title_justify="left")
        for column in ("run", "dataset", "status", "started", "ended", "host", "shards", "rows", "esam3", "transformers"):
            runs.add_column(column, justify="right" if column in ("shards", "rows") else "left")
        for run in info["runs"]:
            counts, versions = run["counts"] or {}, run["versions"]
            runs.add_row(
                run["run_id"],
                run["dataset"] or "-",
                run["status"] + (f" ({run['error']})" if run["error"] else ""),
                run["started_at"] or "-",
                run["ended_at"] or "-",
                run["host"] or "-",
                str(counts.get("shards_committed", "-")),
                str(counts.get("rows", "-")),
                versions.get("esam3", "-"),
                versions.get("transformers", "-"),
            )
        console.print(runs)
    small = [
        name
        for name, entry in info["tables"].items()
        if entry["fragments"] >= COMPACT_HINT_FRAGMENTS and entry["rows"] < COMPACT_HINT_ROWS * entry["fragments"]
    ]
    if small:
        console.print(Text(f"{', '.join(small)}: many small fragments; `esam3 store compact {uri}` between runs merges them"))
    for name, entry in info["tables"].items():
        if entry.get("bytes_per_row"):
            columns = Table(title=Text(f"{name}: bytes per row per column"), title_justify="left")
            columns.add_column("column")
            columns.add_column("bytes/row", justify="right")
            for column, size in entry["bytes_per_row"].items():
                columns.add_row(column, human_bytes(size))
            console.print(columns)


@store_app.command("cleanup")
def cleanup_command(
    uri: str = typer.Argument(..., help="Store root (folder or s3://...)."),
    older_than: str = typer.Option(
        "14d", "--older-than", help="Remove table versions replaced by a newer one more than this long ago: 90s, 30m, 12h, 14d."
    ),
    keep_versions: int = typer.Option(None, "--keep-versions", help="Keep at least the newest N versions of every table."),
    unverified: bool = typer.Option(
        False,
        "--unverified",
        help="Also delete files no version references that are younger than 7 days (a killed worker's); refused while a cache run writes to the store.",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Report what would be removed; delete nothing."),
    s3_endpoint: str = typer.Option(None, "--s3-endpoint", help=S3_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON line with what was removed per table."),
) -> None:
    """Remove old table versions and the data files only they (or no version) reference; the latest rows stay."""
    from esam3.pipeline.store.cleanup import cleanup_store
    from esam3.schemas.cleanup import CleanupConfig

    with user_errors():
        config = build_config(CleanupConfig, older_than=older_than, keep_versions=keep_versions, unverified=unverified, dry_run=dry_run)
        report = cleanup_store(open_store(uri, s3_endpoint), config)
    if as_json:
        print_json(report)
        return
    table = Table(show_header=True, title=Text("would be removed (dry run)" if dry_run else "removed"), title_justify="left")
    for column in ("table", "old versions", "data files", "bytes", "versions left"):
        table.add_column(column, justify="right" if column != "table" else "left")
    for name, entry in report["tables"].items():
        table.add_row(
            name,
            str(entry["old_versions"]),
            str(entry["data_files_removed"]),
            human_bytes(entry["bytes_removed"]),
            str(entry["versions_left"]),
        )
    console.print(table)


@store_app.command("compact")
def compact_command(
    uri: str = typer.Argument(..., help="Store root (folder or s3://...)."),
    rows_per_fragment: int = typer.Option(1024, "--rows-per-fragment", help="Rows per fragment after compaction (at least 1)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Count the rewrite tasks per table; change nothing."),
    s3_endpoint: str = typer.Option(None, "--s3-endpoint", help=S3_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON line with the fragments per table."),
) -> None:
    """Merge the small fragments of cache runs into large ones (run it between runs; rows and keys are unchanged)."""
    from esam3.pipeline.store.compact import compact_store

    with user_errors():
        if rows_per_fragment < 1:
            raise UsageError(f"--rows-per-fragment must be at least 1, got {rows_per_fragment}")
        store = open_store(uri, s3_endpoint)
        with progress() as bar:
            bar.add_task("compact", total=None, status="rewriting small fragments" if not dry_run else "planning")
            report = compact_store(store, rows_per_fragment, dry_run)
    if as_json:
        print_json(report)
        return
    table = Table(show_header=True, title=Text("compaction plan (dry run)" if dry_run else "compacted"), title_justify="left")
    for column in ("table", "fragments before", "rewrite tasks" if dry_run else "fragments after"):
        table.add_column(column, justify="right" if column != "table" else "left")
    for name, entry in report["tables"].items():
        table.add_row(name, str(entry["fragments_before"]), str(entry["tasks"] if dry_run else entry["fragments_after"]))
    console.print(table)


def _verified(store: Any) -> Any:
    """``verify_store`` with a progress bar of the rows checked."""
    from esam3.pipeline.store.check import verify_store

    with progress() as bar:
        task = bar.add_task("verify", total=None, status="")
        return verify_store(store, on_rows=lambda n: bar.update(task, advance=n))


@store_app.command("verify")
def verify_command(
    uri: str = typer.Argument(..., help="Store root (folder or s3://...)."),
    s3_endpoint: str = typer.Option(None, "--s3-endpoint", help=S3_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON line with the problems found."),
) -> None:
    """Check a store: no duplicate keys, ledger agrees with rows, every tensor decodes and is finite. Exit 1 if not."""
    with user_errors():
        report = _verified(open_store(uri, s3_endpoint))
    if as_json:
        print_json(report.to_json())
    elif report.ok:
        console.print(Text(f"ok: {report.rows_checked} rows, {report.tensors_checked} tensors checked"))
    else:
        for problem in report.problems:
            console.print(Text(f"problem: {problem}"))
        if report.more_problems:
            console.print(Text(f"... and {report.more_problems} more"))
        for table, shards in report.damaged_shards.items():
            console.print(
                Text(
                    f"{table}: {len(shards)} shard(s) lost or damaged rows: {', '.join(sorted(shards)[:10])}"
                    f"{' ...' if len(shards) > 10 else ''}"
                )
            )
        if report.damaged_shards or report.leftover_rows:
            console.print(
                Text(
                    f"to mend it: esam3 store repair {uri}, then rerun the esam3 cache command that made it "
                    "(it caches exactly the removed shards)"
                )
            )
    raise typer.Exit(0 if report.ok else 1)


@store_app.command("repair")
def repair_command(
    uri: str = typer.Argument(..., help="Store root (folder or s3://...)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Verify and list what would be removed; change nothing."),
    s3_endpoint: str = typer.Option(None, "--s3-endpoint", help=S3_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON line with what was removed per table."),
) -> None:
    """Remove the shards verify finds lost or damaged (and rows runs left), so that a cache rerun redoes exactly them."""
    from esam3.pipeline.store.repair import repair_store

    with user_errors():
        store = open_store(uri, s3_endpoint)
        report = _verified(store)
        repaired = repair_store(store, dry_run, report)
    if as_json:
        print_json(repaired)
        return
    did = "would remove" if dry_run else "removed"
    for table, entry in repaired["tables"].items():
        if entry["shards"] or entry["fragments_dropped"] or entry["leftover_runs"]:
            console.print(
                Text(
                    f"{table}: {did} {len(entry['shards'])} shard(s) ({', '.join(entry['shards'])}), "
                    f"{len(entry['fragments_dropped'])} unreadable fragment(s), rows left by "
                    f"{len(entry['leftover_runs'])} run(s) that did not commit their shard"
                )
            )
    if not repaired["shards"] and not any(e["leftover_runs"] or e["fragments_dropped"] for e in repaired["tables"].values()):
        console.print(Text("nothing to repair" + ("" if report.ok else ": the problems verify found are not lost or damaged rows")))
    elif repaired["shards"] and not dry_run:
        console.print(Text("rerun the esam3 cache command that made the store: it caches exactly the removed shards"))


@store_app.command("show")
def show_command(
    uri: str = typer.Argument(..., help="Store root (folder or s3://...)."),
    key: str = typer.Argument(..., help="Row key: sa1b/<image_id> or sav/<video_id>/<frame:05d>."),
    out: Path = typer.Option(..., "--out", help="PNG file to write."),
    source: str = typer.Option(None, "--source", help="Where the shards are now (default: where the ledger says they were read)."),
    s3_endpoint: str = typer.Option(None, "--s3-endpoint", help=S3_HELP),
) -> None:
    """Draw a row: the image (or frame) with the prompts and the teacher's masks."""
    from esam3.pipeline.store.show import show

    with user_errors():
        if out.suffix.lower() != ".png":
            raise UsageError(f"--out: expected a .png file, got {out}")
        drawn = show(open_store(uri, s3_endpoint), key, out, source)
    console.print(Text(f"wrote {drawn['out']}: {', '.join(f'{k} {v}' for k, v in drawn.items() if k not in ('key', 'out'))}"))
