"""A damaged store is mended as a user would: verify names the shards whose rows are lost, `store repair` removes
them (and rows runs left of shards they did not commit), and the same cache command caches exactly those again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lance
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from esam3.cli import app
from esam3.pipeline.plan import run_cache
from esam3.pipeline.store import Store
from esam3.pipeline.store.check import verify_store
from esam3.pipeline.store.commits import finished_shards
from esam3.schemas.store import IMAGES
from tests.test_cache import config, keys

WIDE = {"COLUMNS": "400"}


@pytest.fixture(scope="module")
def cached(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("repair") / "store"
    run_cache(config(demo_root / "sa-1b", store), executor="local")
    return store


def _fragment_of(store: Path, shard: str) -> lance.LanceFragment:
    ds = lance.dataset(str(store / "images.lance"))
    return next(f for f in ds.get_fragments() if shard in f.to_table(columns=["shard"]).column("shard").to_pylist())


def test_a_lost_data_file_is_named_repaired_and_cached_again(demo_root: Path, cached: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(cached, store)
    intact = _fragment_of(store, "sa_000001.tar")
    for data_file in _fragment_of(store, "sa_000000.tar").data_files():
        (store / "images.lance" / "data" / data_file.path).unlink()
    runner = CliRunner()
    verify = runner.invoke(app, ["store", "verify", str(store)], env=WIDE)
    assert verify.exit_code == 1
    assert "images: 1 shard(s) lost or damaged rows: sa_000000.tar" in verify.output
    assert f"to mend it: esam3 store repair {store}" in verify.output
    assert "/home/runner" not in verify.output, "no path of Lance's build machine"
    shown = runner.invoke(app, ["store", "show", str(store), "sa1b/5", "--out", str(tmp_path / "row.png")], env=WIDE)
    assert shown.exit_code == 0 and (tmp_path / "row.png").exists(), shown.output  # an intact row still shows

    dry = runner.invoke(app, ["store", "repair", str(store), "--dry-run", "--json"], env=WIDE)
    assert dry.exit_code == 0 and json.loads(dry.stdout)["tables"]["images"]["shards"] == ["sa_000000.tar"]
    assert not verify_store(Store(str(store))).ok, "a dry run changes nothing"
    repaired = runner.invoke(app, ["store", "repair", str(store)], env=WIDE)
    assert repaired.exit_code == 0, repaired.output
    assert "images: removed 1 shard(s) (sa_000000.tar), 1 unreadable fragment(s)" in repaired.output
    assert "rerun the esam3 cache command" in repaired.output
    assert verify_store(Store(str(store))).ok and keys(store) == ["sa1b/4", "sa1b/5", "sa1b/6"]
    assert _fragment_of(store, "sa_000001.tar").fragment_id == intact.fragment_id, "the intact shard is untouched"

    report = run_cache(config(demo_root / "sa-1b", store), executor="local")
    assert (report.shards_skipped, report.shards_committed) == (1, 1), "exactly the removed shard is cached again"
    assert keys(store) == keys(cached) and verify_store(Store(str(store))).ok
    assert finished_shards(Store(str(store)), "sa-1b", report_fingerprint(store)) == {"sa_000000.tar", "sa_000001.tar"}


def report_fingerprint(store: Path) -> str:
    return json.loads((store / "targets-sa-1b.json").read_text())["fingerprint"]


def test_rows_a_run_left_of_a_committed_shard_are_removed_without_recaching(cached: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(cached, store)
    rows = lance.dataset(str(store / "images.lance")).to_table(filter="shard = 'sa_000001.tar'", blob_handling="all_binary")
    left = rows.set_column(rows.schema.get_field_index("run_id"), "run_id", pa.array(["stalled-run"] * rows.num_rows))
    Store(str(store)).append("images", pa.Table.from_pylist(left.to_pylist(), schema=IMAGES))  # what a stalled run's Append adds
    report = verify_store(Store(str(store)))
    assert report.leftover_rows == {"images": [("sa_000001.tar", "stalled-run")]} and not report.damaged_shards
    result = CliRunner().invoke(app, ["store", "repair", str(store), "--json"], env=WIDE)
    assert result.exit_code == 0, result.output
    entry = json.loads(result.stdout)["tables"]["images"]
    assert entry["shards"] == [] and entry["leftover_runs"] == [["sa_000001.tar", "stalled-run"]] and entry["rows_removed"] == 3
    assert verify_store(Store(str(store))).ok and keys(store) == keys(cached)
