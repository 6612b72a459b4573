"""Reading a store back: big tensors live in Lance blob fields, StoreRows returns them with their bytes, in the
asked order, for any subset of columns, after deletions, and for rows without prompts (null tensors)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest

from esam3.pipeline.plan import run_cache
from esam3.pipeline.store import Store
from esam3.pipeline.store.rows import StoreRows
from esam3.schemas.cache import CacheConfig
from esam3.schemas.store import IMAGES, STORE_CARD, StoreError, blob_columns, tensor_columns


@pytest.fixture(scope="module")
def stores(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rows")
    out = {}
    for dataset, table in (("sa-1b", "images"), ("sa-v", "frames")):
        out[table] = root / table
        config = CacheConfig(dataset=dataset, source=str(demo_root / dataset), store=str(out[table]), codec="int8")
        assert run_cache(config, executor="local").exit_code == 0
    return out


def test_big_tensors_are_blobs_on_disk_and_small_ones_inline(stores: dict[str, Path]) -> None:
    for table, path in stores.items():
        raw = lance.dataset(str(path / f"{table}.lance")).take([0]).to_pylist()[0]
        for column in tensor_columns(table):
            if raw[column] is None:  # --mask-outputs chosen (the default) leaves the all-outputs columns empty
                assert (table, column) in (("images", "multi_logits"), ("images", "single_logits")), column
                continue
            data = raw[column]["data"]
            if column in blob_columns(table):
                assert isinstance(data, dict) and data["size"] > 0, (table, column)  # a descriptor, not the bytes
            elif data is not None:
                assert isinstance(data, bytes), (table, column)
    assert set(blob_columns("images")) == {"input", "trunk", "chosen_logits", "multi_logits", "single_logits"}
    assert set(blob_columns("frames")) == {"input", "trunk", "mask_logits", "maskmem_features", "pix_feat_with_mem"}


@pytest.mark.parametrize("table", ["images", "frames"])
def test_take_in_shuffled_order_equals_a_scan(stores: dict[str, Path], table: str) -> None:
    rows = StoreRows(Store(str(stores[table])), table)
    scanned = rows.where()
    assert len(rows) == len(scanned) > 4
    order = np.random.default_rng(0).permutation(len(scanned))[:5].tolist()
    taken = rows.take(order)
    assert [r["key"] for r in taken] == [scanned[i]["key"] for i in order]
    for got, i in zip(taken, order):
        for column in blob_columns(table):
            if scanned[i][column] is None:  # the layout --mask-outputs did not choose
                assert got[column] is None and column in ("multi_logits", "single_logits")
                continue
            assert got[column]["data"] == scanned[i][column]["data"] and len(got[column]["data"]) > 0
            assert rows.decode(got, column).shape == tuple(got[column]["shape"])
    streamed = [row["key"] for batch in rows.batches(batch_size=4) for row in batch]
    assert streamed == [r["key"] for r in scanned]


def test_take_a_subset_of_columns(stores: dict[str, Path]) -> None:
    with StoreRows(Store(str(stores["images"])), "images", threads=1) as rows:
        taken = rows.take([2, 0], columns=["key", "trunk"])
        assert [set(r) for r in taken] == [{"key", "trunk"}] * 2
        trunk = rows.decode(taken[0], "trunk")
        assert trunk.shape == (64, 8, 8) and trunk.dtype == np.float32 and np.isfinite(trunk).all()
        assert [set(r) for r in rows.take([1], columns=["key"])] == [{"key"}]  # no blob column asked: no blob read
    assert rows.take([2], columns=["trunk"])[0]["trunk"]["data"] == taken[0]["trunk"]["data"]  # reopens after close
    with pytest.raises(IndexError, match=r"rows \[-1, 99\] are not in images .*: 6 rows"):
        rows.take([0, -1, 99])
    with pytest.raises(ValueError, match="threads must be at least 1"):
        StoreRows(Store(str(stores["images"])), "images", threads=0)


def test_rows_without_prompts_have_null_tensors_and_positions_survive_deletes(stores: dict[str, Path], tmp_path: Path) -> None:
    store_path = tmp_path / "store"
    shutil.copytree(stores["images"], store_path)  # a copy we may delete rows from
    store = Store(str(store_path))
    before = StoreRows(store, "images").where()
    victim = before[1]["key"]
    store.dataset("images").delete(f"key = '{victim}'")
    rows = StoreRows(store, "images")
    after = rows.take(list(range(len(rows)))[::-1])
    assert [r["key"] for r in after] == [r["key"] for r in before if r["key"] != victim][::-1]
    by_key = {r["key"]: r for r in before}
    assert all(r["trunk"]["data"] == by_key[r["key"]]["trunk"]["data"] for r in after)
    no_prompts = {**before[0], "key": "sa1b/999", **{c: None for c in tensor_columns("images") if c != "trunk"}}
    lance.write_dataset(pa.Table.from_pylist([no_prompts], schema=IMAGES), str(store_path / "images.lance"), mode="append")
    rows = StoreRows(store, "images")
    last = rows.take([len(rows) - 1, 0])
    assert last[0]["key"] == "sa1b/999" and last[0]["chosen_logits"] is None and last[1]["chosen_logits"] is not None
    assert last[0]["trunk"]["data"] == before[0]["trunk"]["data"]
    with pytest.raises(ValueError, match="sa1b/999 has no chosen_logits"):
        rows.decode(last[0], "chosen_logits")


def test_only_target_tables_and_current_format(stores: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a target table"):
        StoreRows(Store(str(stores["images"])), "ledger")
    old = tmp_path / "old"
    old.mkdir()
    card = json.loads((stores["images"] / STORE_CARD).read_text())
    (old / STORE_CARD).write_text(json.dumps({**card, "format": 1}))
    with pytest.raises(StoreError, match="format 1.*cache into a new --store"):
        Store(str(old)).read_card()


@pytest.mark.parametrize("table", ["images", "frames"])
def test_reused_buffers_give_the_same_bytes_and_decoded_arrays_own_their_memory(stores: dict[str, Path], table: str) -> None:
    store = Store(str(stores[table]))
    plain = StoreRows(store, table)
    reused = StoreRows(store, table, threads=2, reuse_buffers=True)
    order = np.random.default_rng(1).permutation(len(plain)).tolist()
    first = reused.take(order[:3])
    decoded = {c: reused.decode(first[0], c) for c in blob_columns(table) if first[0][c] is not None}
    kept = {c: a.copy() for c, a in decoded.items()}
    expected = plain.take(order[:3])
    for got, want in zip(first, expected):
        for column in blob_columns(table):
            if want[column] is not None:
                assert isinstance(got[column]["data"], memoryview) and bytes(got[column]["data"]) == want[column]["data"]
    view = first[0]["trunk"]["data"]
    second = reused.take(order[3:6])  # same slots: the first batch's views now show the second batch's bytes
    assert bytes(view) == bytes(second[0]["trunk"]["data"]) != expected[0]["trunk"]["data"]
    assert all(np.array_equal(decoded[c], kept[c]) for c in decoded)  # decoded arrays were copies


def _take_in_child(rows: StoreRows, queue) -> None:
    queue.put([(r["key"], bytes(r["trunk"]["data"])) for r in rows.take([2, 0], columns=["key", "trunk"])])


def test_a_forked_loader_worker_reads_with_its_own_threads_and_dataset(stores: dict[str, Path]) -> None:
    """DataLoader workers fork: the parent's read threads and its Lance dataset do not survive that."""
    import multiprocessing

    rows = StoreRows(Store(str(stores["images"])), "images", reuse_buffers=True)
    expected = [(r["key"], bytes(r["trunk"]["data"])) for r in rows.take([2, 0], columns=["key", "trunk"])]  # threads started
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_take_in_child, args=(rows, queue))
    child.start()
    try:
        assert queue.get(timeout=60) == expected
    finally:
        child.join(5)
        if child.is_alive():
            child.kill()


def test_a_pickled_reader_reopens_the_same_version(stores: dict[str, Path], tmp_path: Path) -> None:
    """Spawned DataLoader workers get the reader pickled: it must travel without its lock, threads or dataset."""
    import pickle

    store_path = tmp_path / "store"
    shutil.copytree(stores["images"], store_path)
    rows = StoreRows(Store(str(store_path)), "images", threads=2, reuse_buffers=True)
    expected = [(r["key"], bytes(r["trunk"]["data"])) for r in rows.take([1, 0], columns=["key", "trunk"])]
    Store(str(store_path)).dataset("images").delete("key = 'sa1b/1'")  # a newer version; the copy keeps the old one
    copy = pickle.loads(pickle.dumps(rows))
    assert (copy.version, len(copy), copy.threads, copy.reuse_buffers) == (rows.version, len(rows), 2, True)
    assert [(r["key"], bytes(r["trunk"]["data"])) for r in copy.take([1, 0], columns=["key", "trunk"])] == expected


def test_verify_and_show_report_a_missing_data_file(stores: dict[str, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from esam3.cli import app
    from esam3.pipeline.store.check import verify_store

    store_path = tmp_path / "store"
    shutil.copytree(stores["images"], store_path)
    holding = next(
        f
        for f in lance.dataset(str(store_path / "images.lance")).get_fragments()
        if f.to_table(columns=["key"], filter="key = 'sa1b/1'").num_rows
    )  # the first fragment: shard 0's rows
    (store_path / "images.lance" / "data" / holding.data_files()[0].path).unlink()
    report = verify_store(Store(str(store_path)))
    assert not report.ok and any(
        p.startswith(f"images: fragment {holding.fragment_id} (3 rows) cannot be read") and "Not found" in p for p in report.problems
    ), report.problems
    assert report.damaged_shards == {"images": ["sa_000000.tar"]} and report.lost_fragments == {"images": [holding.fragment_id]}
    shown = CliRunner().invoke(app, ["store", "show", str(store_path), "sa1b/1", "--out", str(tmp_path / "row.png")])
    assert shown.exit_code == 2 and "cannot read images" in shown.output and shown.exception.__class__ is SystemExit
    info = CliRunner().invoke(app, ["store", "info", str(store_path)])
    assert info.exit_code == 2 and "cannot be read" in info.output and "store verify" in info.output
    assert "Traceback" not in info.output and info.exception.__class__ is SystemExit
    cleaned = CliRunner().invoke(app, ["store", "cleanup", str(store_path), "--older-than", "0s"])
    assert cleaned.exit_code == 0, cleaned.output  # cleanup reads manifests only: a lost data file is verify's business
