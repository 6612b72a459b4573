"""Store upkeep. ``esam3 store cleanup``: old versions and unreferenced files go, the latest rows stay and verify;
files of a fragment nobody committed go only with --unverified; bad flags are usage errors. ``esam3 store
compact``: small fragments merge, rows and bytes unchanged."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import lance
import pyarrow as pa
import pytest
from lance.fragment import write_fragments
from typer.testing import CliRunner

from esam3.cli import app
from esam3.pipeline.plan import run_cache
from esam3.pipeline.store import Store
from esam3.pipeline.store.check import verify_store
from esam3.pipeline.store.rows import StoreRows
from esam3.pipeline.store.snapshots import snapshot_rows, snapshots
from esam3.train.reader import StoreDataset
from esam3.schemas.cache import CacheConfig
from esam3.schemas.cleanup import CleanupConfig, parse_duration
from esam3.schemas.store import IMAGES, LANCE_FILE_VERSION

runner = CliRunner()
WIDE = {"COLUMNS": "400"}


@pytest.fixture(scope="module")
def cached(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("cleanup") / "store"
    config = CacheConfig(dataset="sa-1b", source=str(demo_root / "sa-1b"), store=str(store), codec="int8")
    assert run_cache(config, executor="local").exit_code == 0
    return store


def _files(table: Path) -> set[Path]:
    return {p for p in (table / "data").rglob("*") if p.is_file()}


def test_cleanup_removes_old_versions_and_orphans_and_keeps_the_rows(cached: Path, tmp_path: Path) -> None:
    store_path = tmp_path / "store"
    shutil.copytree(cached, store_path)
    store = Store(str(store_path))
    images = store_path / "images.lance"
    keys_before = sorted(r["key"] for r in StoreRows(store, "images").where(columns=["key"]))
    victim = keys_before[0]
    store.dataset("images").delete(f"key = '{victim}'")  # a new version; the old one still references the row
    rows = StoreRows(store, "images").where(condition=f"key = '{keys_before[1]}'")
    orphan = write_fragments(
        pa.Table.from_pylist(rows, schema=IMAGES), str(images), schema=IMAGES, data_storage_version=LANCE_FILE_VERSION
    )  # written, never committed
    stem = orphan[0].files[0].path.removesuffix(".lance")  # its data file, and its blob files if any
    orphan_files = {p for p in _files(images) if stem in str(p)}
    assert orphan_files
    versions_before = len(store.dataset("images").versions())
    time.sleep(0.05)

    dry = runner.invoke(app, ["store", "cleanup", str(store_path), "--older-than", "0s", "--dry-run", "--json"], env=WIDE)
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.output)["total"]["old_versions"] > 0
    assert len(store.dataset("images").versions()) == versions_before  # nothing deleted

    kept = runner.invoke(app, ["store", "cleanup", str(store_path), "--older-than", "0s", "--json"], env=WIDE)
    assert kept.exit_code == 0, kept.output
    report = json.loads(kept.output)
    # every version but the latest (the delete) and the newest snapshot, which trainers read; older snapshots dropped
    newest = snapshots(store, "images")
    assert [snapshot_rows(store, "images", s) for s in newest] == [len(keys_before)] and report["tables"]["images"][
        "snapshots_removed"
    ] == 1
    assert report["tables"]["images"]["old_versions"] == versions_before - 2 and report["tables"]["images"]["versions_left"] == 2
    assert report["total"]["bytes_removed"] > 0
    assert all(p.exists() for p in orphan_files)  # younger than 7 days: could be a commit in flight

    gone = runner.invoke(app, ["store", "cleanup", str(store_path), "--older-than", "0s", "--unverified"], env=WIDE)
    assert gone.exit_code == 0, gone.output
    assert not any(p.exists() for p in orphan_files) and "removed" in gone.output
    assert sorted(r["key"] for r in StoreRows(store, "images").where(columns=["key"])) == keys_before[1:]
    assert all(r["trunk"]["data"] for r in StoreRows(store, "images").where())
    report = verify_store(store)
    assert report.rows_checked == len(keys_before) - 1
    assert report.problems == [f"images: shard {_shard_of(cached, victim)} has 2 readable rows, its ledger entry says 3 (rows lost)"]


def _shard_of(store: Path, key: str) -> str:
    return StoreRows(Store(str(store)), "images").where(f"key = '{key}'", columns=["shard"])[0]["shard"]


def test_keep_versions_keeps_the_newest(cached: Path, tmp_path: Path) -> None:
    store_path = tmp_path / "store"
    shutil.copytree(cached, store_path)
    store = Store(str(store_path))
    before = len(store.dataset("ledger").versions())
    assert before >= 3
    result = runner.invoke(app, ["store", "cleanup", str(store_path), "--older-than", "0s", "--keep-versions", "2", "--json"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["tables"]["ledger"]["versions_left"] == 2
    assert lance.dataset(str(store_path / "ledger.lance")).count_rows() == 2 and verify_store(store).ok


def test_bad_flags_and_not_a_store(tmp_path: Path) -> None:
    assert parse_duration("14d").days == 14 and parse_duration("90s").seconds == 90
    assert CleanupConfig(older_than="12h").older_than.seconds == 12 * 3600
    for flags, text in ((["--older-than", "2w"], "--older-than"), (["--keep-versions", "0"], "--keep-versions")):
        result = runner.invoke(app, ["store", "cleanup", str(tmp_path), *flags], env=WIDE)
        assert result.exit_code == 2 and text in result.output, result.output
    result = runner.invoke(app, ["store", "cleanup", str(tmp_path)], env=WIDE)
    assert result.exit_code == 2 and "not an esam3 store" in result.output


def test_a_table_that_cannot_be_opened_is_one_line(cached: Path, tmp_path: Path) -> None:
    store_path = tmp_path / "store"
    shutil.copytree(cached, store_path)
    shutil.rmtree(store_path / "frames.lance")
    result = runner.invoke(app, ["store", "cleanup", str(store_path)], env=WIDE)
    assert result.exit_code == 2 and "cannot clean up frames" in result.output, result.output
    assert "credentials" not in result.output  # the access hint is for 403s only


def test_removable_versions_count_age_from_the_successor() -> None:
    from datetime import datetime, timedelta

    from esam3.pipeline.store.cleanup import removable_versions

    t0 = datetime(2026, 1, 1)
    history = [{"version": v, "timestamp": t} for v, t in [(1, t0), (2, t0 + timedelta(days=1)), (3, t0 + timedelta(days=30))]]
    cutoff = t0 + timedelta(days=20)
    # 1 was replaced on day 1 (old); 2 was made on day 1 but stayed the latest until day 30: a reader may hold it
    assert removable_versions(history, cutoff, None) == [1]
    assert removable_versions(history, t0 + timedelta(days=40), None) == [1, 2]
    assert removable_versions(history, t0 + timedelta(days=40), 2) == [1]
    assert removable_versions(history[:1], t0 + timedelta(days=40), None) == []


def test_cleanup_keeps_the_version_a_reader_opened_even_if_it_was_made_long_ago(cached: Path, tmp_path: Path) -> None:
    """Lance's own older_than counts from creation: a store idle for weeks, then one commit, lost the reader's version."""
    store_path = tmp_path / "store"
    shutil.copytree(cached, store_path)
    store = Store(str(store_path))
    time.sleep(1.2)
    reader = StoreRows(store, "images")  # a trainer pins the latest version, made more than 1 s ago
    pinned = reader.version
    first_key = reader.take([0], ["key"])[0]["key"]
    store.dataset("images").delete(f"key = '{first_key}'")  # a rerun's commit replaces it now
    assert store.dataset("images").version == pinned + 1
    result = runner.invoke(app, ["store", "cleanup", str(store_path), "--older-than", "1s"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert pinned in [v["version"] for v in store.dataset("images").versions()]
    assert [r["key"] for r in reader.take([0], ["key", "trunk"])] == [first_key]  # its files are still there


def test_unverified_cleanup_is_refused_while_a_run_writes(cached: Path, tmp_path: Path) -> None:
    from esam3.pipeline.store.claims import ShardClaims

    store_path = tmp_path / "store"
    shutil.copytree(cached, store_path)
    with ShardClaims(Store(str(store_path)), "run-in-progress", "sa-1b", ["sa_000007.tar"]):
        result = runner.invoke(app, ["store", "cleanup", str(store_path), "--unverified"], env=WIDE)
    assert result.exit_code == 2 and "run run-in-progress" in result.output and "is writing to it" in result.output
    after = runner.invoke(app, ["store", "cleanup", str(store_path), "--unverified"], env=WIDE)
    assert after.exit_code == 0, after.output


def test_compact_merges_fragments_and_changes_no_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from esam3.pipeline.store.claims import ShardClaims
    from esam3.pipeline.demo_data import write_demo_data
    from tests.conftest import small_config

    write_demo_data(small_config(tmp_path / "data", sa1b_shards=6, images_per_shard=2, sav_shards=0))
    store_path = tmp_path / "store"
    config = CacheConfig(dataset="sa-1b", source=str(tmp_path / "data" / "sa-1b"), store=str(store_path), codec="int8")
    assert run_cache(config, executor="local").exit_code == 0
    store = Store(str(store_path))
    before = {r["key"]: bytes(r["trunk"]["data"]) for r in StoreRows(store, "images").where(columns=["key", "trunk"])}
    assert len(store.dataset("images").get_fragments()) == 6  # a fragment never spans shards

    monkeypatch.setattr("esam3.store_cli.COMPACT_HINT_FRAGMENTS", 4)  # the real threshold is 64 fragments
    hint = "many small fragments; `esam3 store compact"
    assert f"images, ledger: {hint}" in runner.invoke(app, ["store", "info", str(store_path)], env=WIDE).output
    dry = runner.invoke(app, ["store", "compact", str(store_path), "--dry-run", "--json"], env=WIDE)
    assert dry.exit_code == 0, dry.output
    planned = json.loads(dry.output.strip().splitlines()[-1])["tables"]["images"]
    assert planned["tasks"] >= 1 and len(store.dataset("images").get_fragments()) == 6
    with ShardClaims(store, "run-in-progress", "sa-1b", ["sa_000009.tar"]):
        busy = runner.invoke(app, ["store", "compact", str(store_path)], env=WIDE)
    assert busy.exit_code == 2 and "run run-in-progress" in busy.output
    done = runner.invoke(app, ["store", "compact", str(store_path), "--json"], env=WIDE)
    assert done.exit_code == 0, done.output
    images = json.loads(done.output.strip().splitlines()[-1])["tables"]["images"]
    assert (images["fragments_before"], images["fragments_after"]) == (6, 1)
    # the compacted version is indexed and becomes the snapshot trainers read
    assert snapshots(store, "images")[0].version == store.dataset("images").version
    assert [i.field_names for i in store.dataset("images").describe_indices()] == [["key"]]
    assert len(StoreDataset(store, fields=("trunk",), split="all")) == len(before)
    assert {r["key"]: bytes(r["trunk"]["data"]) for r in StoreRows(store, "images").where(columns=["key", "trunk"])} == before
    assert verify_store(store).ok and run_cache(config, executor="local").nothing_to_do
    assert hint not in runner.invoke(app, ["store", "info", str(store_path)], env=WIDE).output
    bad = runner.invoke(app, ["store", "compact", str(store_path), "--rows-per-fragment", "0"], env=WIDE)
    assert bad.exit_code == 2 and "--rows-per-fragment must be at least 1" in bad.output
