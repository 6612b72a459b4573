"""The cache job's invariants with the in-process executor (same steps as the Ray plan, no Ray): rows, codecs,
resume, crashes between commits, corrupt samples, runs over different shards, and the CLI."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest
import simplejpeg
import torch
from typer.testing import CliRunner

from esam3.cli import app
from esam3.pipeline.demo_data import write_tar
from esam3.pipeline.costs import LOGIT_MAP_BYTES, logit_bytes
from esam3.pipeline.plan import run_cache
from esam3.pipeline.sources import SA1BSource
from esam3.pipeline.store import Store, commits
from esam3.pipeline.store.commits import ledger_entries
from esam3.pipeline.store.runs import read_runs
from esam3.pipeline.store.check import verify_store
from esam3.pipeline.store.rows import StoreRows
from esam3.schemas.cache import CacheConfig, MaxFailures
from esam3.schemas.store import IMAGES, StoreError, decode_tensor
from esam3.workers.mask_targets import picked_logits
from esam3.workers.prompts import PromptSet
from esam3.workers.teacher import Sam3Teacher
from tests.test_sources import SA1B_BAD, _good_sa1b

runner = CliRunner()
WIDE = {"COLUMNS": "400"}


def config(source: Path, store: Path, **overrides) -> CacheConfig:
    values = {"dataset": "sa-1b", "source": str(source), "store": str(store), "codec": "int8"}
    values.update(overrides)
    return CacheConfig(**values)


def keys(store: Path, table: str = "images") -> list[str]:
    return sorted(lance.dataset(str(store / f"{table}.lance")).to_table(columns=["key"]).column("key").to_pylist())


def rows_of(store: Path, table: str, condition: str | None = None, limit: int | None = None) -> list[dict]:
    """Rows of a local store's table, every tensor with its bytes."""
    return StoreRows(Store(str(store)), table).where(condition, limit=limit)


def run_concurrently(configs: list[CacheConfig]) -> None:
    """Run these cache jobs at the same time (in-process loop, one thread each); any error fails the test."""
    errors: list[BaseException] = []

    def run(run_config: CacheConfig) -> None:
        try:
            run_cache(run_config, executor="local")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in configs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


def test_images_end_to_end_rows_decode_to_the_teachers_targets(tiny_teacher: Sam3Teacher, demo_root: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    report = run_cache(config(demo_root / "sa-1b", store), executor="local")
    assert (report.shards_committed, report.rows, report.failures, report.exit_code) == (2, 6, 0, 0)
    assert keys(store) == [f"sa1b/{i}" for i in range(1, 7)]
    assert verify_store(Store(str(store))).ok
    row = rows_of(store, "images", "key = 'sa1b/2'")[0]
    assert row["teacher"] == tiny_teacher.card.checksum and row["codec"] == "int8" and row["prompt_seed"] == 0
    assert row["precision"] == "fp32"
    transform = json.loads(row["preprocess"])
    assert (transform["original_height"], transform["original_width"]) == (row["height"], row["width"])
    sample = next(s for s in SA1BSource(str(demo_root / "sa-1b")).iter_samples("all") if s.key == "sa1b/2")
    image = simplejpeg.decode_jpeg(sample.jpeg, colorspace="RGB")  # SAM3's own preprocessing of the full image
    expected = tiny_teacher.image_targets([np.asarray(image)]).trunk[0].numpy()
    trunk = decode_tensor(row["trunk"])
    error = np.linalg.norm(trunk - expected) / np.linalg.norm(expected)
    assert error < 0.01 and row["trunk"]["error"] == pytest.approx(error, rel=1e-3)
    k = row["prompt_kinds"]["shape"][0]
    assert k > 0 and decode_tensor(row["object_pointer"]).shape == (k, 128)
    # --mask-outputs chosen (the default): per prompt the output the tracker uses (multimask's best for one click,
    # else single: the rule applied here to the stored IoU scores) and its logits, as the teacher gives them
    labels, boxes, iou = decode_tensor(row["prompt_labels"]), decode_tensor(row["prompt_boxes"]), decode_tensor(row["iou"])
    clicks = ((labels >= 0).sum(1) == 1) & np.isnan(boxes).any(1)
    assert decode_tensor(row["chosen_output"]).tolist() == np.where(clicks, 1 + iou[:, 1:].argmax(1), 0).tolist()
    points = decode_tensor(row["prompt_points"])
    prompts = PromptSet(
        decode_tensor(row["prompt_mask_index"]),
        decode_tensor(row["prompt_kinds"]),
        points,
        labels,
        boxes,
        points,
        boxes,
        (row["height"], row["width"]),
        112,
    )
    out = tiny_teacher.prompt_targets(torch.from_numpy(expected), prompts)
    teacher_logits = picked_logits(out.single, out.multi, torch.from_numpy(decode_tensor(row["chosen_output"]).astype(np.int64))).numpy()
    chosen = decode_tensor(row["chosen_logits"])
    assert chosen.shape == (k, 32, 32) and row["chosen_logits"]["error"] < 0.01 and row["multi_logits"] is None
    assert np.abs(chosen - teacher_logits).max() < 0.05 * max(1.0, np.abs(teacher_logits).max())
    agree = ((chosen > 0) == (teacher_logits > 0)).mean()
    assert 0.9 < row["logits_mask_iou"] <= 1 and agree > 0.95  # random weights: logits near 0, a few pixels flip
    heads = store / "heads"
    assert (heads / "heads.safetensors").is_file() and json.loads((heads / "heads.json").read_text())["teacher"][
        "checksum"
    ] == tiny_teacher.card.checksum


def test_rerun_is_a_no_op_and_other_settings_are_refused(demo_root: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    run_cache(config(demo_root / "sa-1b", store), executor="local")
    versions = {t: lance.dataset(str(store / f"{t}.lance")).version for t in ("images", "ledger")}
    again = run_cache(config(demo_root / "sa-1b", store), executor="local")
    assert again.nothing_to_do and again.rows == 0 and again.shards_skipped == 2
    assert versions == {t: lance.dataset(str(store / f"{t}.lance")).version for t in ("images", "ledger")}
    with pytest.raises(StoreError, match="codec"):
        run_cache(config(demo_root / "sa-1b", store, codec="fp16"), executor="local")
    with pytest.raises(StoreError, match="holds targets of teacher"):
        run_cache(config(demo_root / "sa-1b", store, teacher={"source": "tiny-random", "seed": 3}), executor="local")


@pytest.mark.parametrize("crash", ["before-commit-point", "before-ledger", "after-first-shard"])
def test_crash_then_rerun_finishes_only_what_is_missing(
    demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash: str
) -> None:
    """A driver dying after the first commit, after a shard's rows but before its commit point (marker), or after
    the commit point but before its ledger row loses nothing; the rerun caches again only what was not committed."""
    reference = tmp_path / "reference"
    run_cache(config(demo_root / "sa-1b", reference), executor="local")
    store = tmp_path / "store"
    calls = {"ledger": 0, "marker": 0}
    original_append, original_create = Store.append, commits.create_once

    def dying_append(self, name, table):
        if name == "ledger":
            calls["ledger"] += 1
            if crash == "before-ledger" and calls["ledger"] == 2:
                raise KeyboardInterrupt("driver killed between the commit point and the ledger row of shard 2")
        original_append(self, name, table)
        if name == "ledger" and crash == "after-first-shard" and calls["ledger"] == 1:
            raise KeyboardInterrupt("driver killed after the first commit")

    def dying_create(fs, path, data):
        calls["marker"] += 1
        if crash == "before-commit-point" and calls["marker"] == 2:
            raise KeyboardInterrupt("driver killed between the rows and the commit marker of shard 2")
        return original_create(fs, path, data)

    monkeypatch.setattr(Store, "append", dying_append)
    monkeypatch.setattr(commits, "create_once", dying_create)
    with pytest.raises(KeyboardInterrupt):
        run_cache(config(demo_root / "sa-1b", store), executor="local")
    monkeypatch.setattr(Store, "append", original_append)
    monkeypatch.setattr(commits, "create_once", original_create)
    if crash != "after-first-shard":
        assert len(keys(store)) == 6 and not verify_store(Store(str(store))).ok  # rows of a shard without a ledger row
    report = run_cache(config(demo_root / "sa-1b", store), executor="local")
    committed_by_the_rerun = 0 if crash == "before-ledger" else 1  # past its commit point: the rerun only finishes it
    assert (report.shards_skipped, report.shards_committed) == (2 - committed_by_the_rerun, committed_by_the_rerun)
    assert keys(store) == keys(reference)
    assert verify_store(Store(str(store))).ok
    assert len(ledger_entries(Store(str(store)))) == lance.dataset(str(store / "ledger.lance")).count_rows() == 2
    assert not list((store / "commits").rglob("pending/*/*")), "every pending note was cleared"
    records = read_runs(Store(str(store)))
    assert [r["status"] for r in records] == ["interrupted"] + ["finished"] * committed_by_the_rerun
    assert records[0]["error"].startswith("driver killed") and records[0]["ended_at"]


def _bad_shard(source: Path, shard: int, case: str) -> None:
    make = SA1B_BAD[case][0]
    members = []
    for image_id in (1, 2, 3):
        jpeg, record = _good_sa1b(image_id)
        members += (
            make(jpeg, record) if image_id == 2 else [(f"sa_{image_id}.jpg", jpeg), (f"sa_{image_id}.json", json.dumps(record).encode())]
        )
    renamed = [(name.replace("sa_", f"sa_{shard}0"), data) for name, data in members]
    fixed = []
    for name, data in renamed:  # keep file_name and image_id consistent with the renamed members
        if name.endswith(".json") and data.startswith(b"{") and b'"image"' in data:
            try:
                record = json.loads(data)
                record["image"]["file_name"] = record["image"]["file_name"].replace("sa_", f"sa_{shard}0")
                record["image"]["image_id"] = int(f"{shard}0{record['image']['image_id']}")
                data = json.dumps(record).encode()
            except (ValueError, KeyError, TypeError):
                pass
        fixed.append((name, data))
    write_tar(source / f"sa_{shard:06d}.tar", fixed)


def test_corrupt_samples_become_failures_and_max_failures_sets_the_exit_code(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    cases = ["corrupt JPEG", "truncated JPEG", "RLE does not decode", "invalid JSON", "missing JPEG"]
    for shard, case in enumerate(cases):
        _bad_shard(source, shard, case)
    store = tmp_path / "store"
    report = run_cache(config(source, store, max_failures=MaxFailures.parse("10")), executor="local")
    assert (report.rows, report.failures, report.exit_code) == (10, 5, 0)
    failures = lance.dataset(str(store / "failures.lance")).to_table().to_pylist()
    by_shard = {f["shard"]: f for f in failures}
    assert by_shard["sa_000000.tar"]["member"] == "sa_002.jpg" and "not a readable JPEG" in by_shard["sa_000000.tar"]["reason"]
    # the header is fine, the data is cut: found by the cache's own decode (the source skips the pixel check)
    assert by_shard["sa_000001.tar"]["member"] == "sa_102.jpg" and "JPEG does not decode" in by_shard["sa_000001.tar"]["reason"]
    assert "RLE" in by_shard["sa_000002.tar"]["reason"] and by_shard["sa_000003.tar"]["member"] == "sa_302.json"
    assert len(keys(store)) == 10 and verify_store(Store(str(store))).ok
    strict = run_cache(config(source, tmp_path / "strict", max_failures=MaxFailures.parse("20%")), executor="local")
    assert strict.exit_code == 1  # 5 of 15 samples = 33%


def test_runs_over_different_shards_give_the_union(demo_root: Path, tmp_path: Path) -> None:
    one_after_other = tmp_path / "sequential"
    run_cache(config(demo_root / "sa-1b", one_after_other, shards="0"), executor="local")
    run_cache(config(demo_root / "sa-1b", one_after_other, shards="1"), executor="local")
    assert keys(one_after_other) == [f"sa1b/{i}" for i in range(1, 7)]
    together = tmp_path / "concurrent"  # nothing created until a run opens it: both runs race to create it
    run_concurrently([config(demo_root / "sa-1b", together, shards=shards) for shards in ("0", "1")])
    assert keys(together) == keys(one_after_other) and verify_store(Store(str(together))).ok


def test_video_flags_reach_the_rows(demo_root: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    result = runner.invoke(
        app,
        [
            "cache",
            "--dataset",
            "sa-v",
            "--source",
            str(demo_root / "sa-v"),
            "--store",
            str(store),
            "--executor",
            "local",
            "--video-prompt",
            "box",
            "--max-objects",
            "2",
            "--max-frames",
            "4",
            "--codec",
            "int8",
        ],
        env=WIDE,
    )
    assert result.exit_code == 0, result.output
    frames = rows_of(store, "frames")
    assert len(frames) == 8 and {f["prompt_kind"] for f in frames} == {"box"}
    assert max(len(f["object_ids"]) for f in frames) == 2 and max(f["frame"] for f in frames) == 3


def test_videos_end_to_end(tiny_teacher: Sam3Teacher, demo_root: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    report = run_cache(config(demo_root / "sa-v", store, dataset="sa-v", codec="bf16"), executor="local")
    frames = rows_of(store, "frames")
    assert report.rows == len(frames) == 18 and report.exit_code == 0  # 2 videos x 9 annotated frames
    first = next(f for f in frames if f["key"].endswith("/00003"))
    assert first["frame_index"] == 12 and first["prompt_kind"] == "mask"
    n = len(first["object_ids"])
    assert decode_tensor(first["maskmem_features"]).shape == (n, 64, 8, 8)
    assert decode_tensor(first["pix_feat_with_mem"]).shape == (n, 128, 8, 8) and first["pix_feat_with_mem"]["error"] < 5e-3
    assert (
        verify_store(Store(str(store))).ok
        and run_cache(config(demo_root / "sa-v", store, dataset="sa-v", codec="bf16"), executor="local").nothing_to_do
    )


def test_verify_finds_duplicates_and_bad_tensors(demo_root: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    run_cache(config(demo_root / "sa-1b", store, shards="0"), executor="local")
    first = rows_of(store, "images", limit=1)
    broken = [{**first[0], "trunk": {**first[0]["trunk"], "data": first[0]["trunk"]["data"][:-1]}}]
    missing = [{**first[0], "key": "sa1b/missing-trunk", "trunk": None}]
    null_fields = [{**first[0], "key": "sa1b/null-fields", "trunk": {**first[0]["trunk"], "shape": None}}]
    no_input = [{**first[0], "key": "sa1b/no-input", "input": None, "gt_masks": first[0]["gt_masks"][:-1]}]
    for rows in (first, broken, missing, null_fields, no_input):
        lance.write_dataset(pa.Table.from_pylist(rows, schema=IMAGES), str(store / "images.lance"), mode="append")
    report = verify_store(Store(str(store)))
    assert not report.ok
    text = "\n".join(report.problems)
    assert "appears 3 times" in text and "does not decode" in text and "its ledger entry says 3" in text
    assert "sa1b/missing-trunk has no trunk, which the store's targets include" in text
    assert "sa1b/null-fields trunk does not decode" in text
    assert "sa1b/no-input has no input, which the store's targets include" in text
    k = first[0]["prompt_kinds"]["shape"][0]
    assert f"sa1b/no-input has {k - 1} ground-truth masks for {k} prompts" in text
    result = runner.invoke(app, ["store", "verify", str(store)], env=WIDE)
    assert result.exit_code == 1 and "appears 3 times" in result.output


def test_cache_command(demo_root: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    base = ["cache", "--dataset", "sa-1b", "--source", str(demo_root / "sa-1b"), "--store", str(store), "--executor", "local"]
    result = runner.invoke(app, [*base, "--codec", "int8", "--json"], env=WIDE)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output.strip().splitlines()[-1])
    assert payload["rows"] == 6 and payload["shards_committed"] == 2 and payload["rows_per_s"] > 0
    result = runner.invoke(app, [*base, "--codec", "int8"], env=WIDE)
    assert result.exit_code == 0 and "nothing to do: all 2 selected shard(s)" in result.output
    result = runner.invoke(app, ["store", "info", str(store), "--json"], env=WIDE)
    info = json.loads(result.output)
    assert info["tables"]["images"]["rows"] == 6 and info["shards"] == {"sa-1b": 2}
    assert info["tables"]["images"]["fragments"] == 2  # one per shard in the in-process loop
    assert info["tables"]["images"]["bytes_per_row"]["trunk"] == 64 * 8 * 8 + 4 * 64
    [run] = info["runs"]  # the no-op rerun leaves no record
    assert run["run_id"] == payload["run_id"] and run["status"] == "finished" and run["dataset"] == "sa-1b"
    assert run["counts"]["shards_committed"] == 2 and run["counts"]["rows"] == 6 and run["started_at"] <= run["ended_at"]
    assert run["versions"]["esam3"] and run["versions"]["transformers"].startswith("5.") and run["host"]
    record = json.loads((store / "runs" / f"{payload['run_id']}.json").read_text())
    assert record["config"]["codec"] == "int8" and record["config"]["teacher"]["source"] == "tiny-random"
    assert record["config"]["fingerprint"] == info["targets"]["sa-1b"]["fingerprint"] and record["error"] is None
    result = runner.invoke(app, ["store", "info", str(store)], env=WIDE)
    assert result.exit_code == 0 and "bytes per row per column" in result.output
    assert "shards done" in result.output and "{" not in result.output  # a table column, not a Python dict
    images = next(line for line in result.output.splitlines() if line.startswith("│ images"))
    assert [cell.strip() for cell in images.strip("│ ").split("│")][:3] == ["images", "2", "6"]
    assert "runs (runs/<run_id>.json: config, versions)" in result.output and payload["run_id"] in result.output
    result = runner.invoke(app, ["store", "verify", str(store)], env=WIDE)
    assert result.exit_code == 0 and "ok: 6 rows" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--targets", "trunk,memory"], "do not apply to sa-1b"),
        (["--targets", "feathers"], "--targets"),
        (["--codec", "lowrank", "--rank", "0"], "--rank"),
        (["--max-failures", "5x"], "--max-failures"),
        (["--executor", "spark"], "--executor"),
        (["--address", "ray://localhost:10001"], "Ray Client (ray://) cannot run Ray Data"),
        (["--address", "somewhere"], "--address"),
        (["--prompts", "0"], "--prompts"),
        (["--batch-size", "0"], "--batch-size"),
        (["--shards", "3-1"], "reversed"),
        (["--teacher", "/no/such/dir"], "no such directory"),
        (["--max-objects", "0"], "--max-objects"),
        (["--max-frames", "0"], "--max-frames"),
        (["--video-prompt", "scribble"], "--video-prompt"),
        (["--mask-outputs", "best"], "--mask-outputs"),
        (["--mask-size", "2000"], "--mask-size: Input should be less than or equal to 1024"),
        (["--mask-size", "64"], "--mask-size 64: this teacher's decoder gives 32x32 mask logits; use at most 32"),
    ],
)
def test_cache_usage_errors(demo_root: Path, tmp_path: Path, args: list[str], message: str) -> None:
    base = ["cache", "--dataset", "sa-1b", "--source", str(demo_root / "sa-1b"), "--store", str(tmp_path / "s"), "--executor", "local"]
    result = runner.invoke(app, [*base, *args], env=WIDE)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("command", ["cache", "plan"])
def test_mask_flags_are_refused_without_prompt_targets(demo_root: Path, tmp_path: Path, command: str) -> None:
    where = ["--source", str(demo_root / "sa-v"), "--store", str(tmp_path / "s")] if command == "cache" else ["--shards", "0"]
    result = runner.invoke(app, [command, "--dataset", "sa-v", *where, "--mask-outputs", "all", "--mask-size", "16"], env=WIDE)
    assert result.exit_code == 2 and "--mask-outputs and --mask-size: apply to sa-1b prompt targets only" in result.output
    assert not (tmp_path / "s").exists()
    where = ["--source", str(demo_root / "sa-1b"), "--store", str(tmp_path / "s")] if command == "cache" else ["--shards", "0"]
    result = runner.invoke(app, [command, "--dataset", "sa-1b", *where, "--targets", "trunk", "--mask-size", "16"], env=WIDE)
    assert result.exit_code == 2 and "--mask-size: apply to the prompt targets, which --targets leaves out" in result.output


def test_each_shard_is_streamed_into_one_fragment(tmp_path: Path) -> None:
    """Read blocks are 8 rows and the teacher's 4; each shard's writer streams all of them into one fragment."""
    from esam3.pipeline.demo_data import write_demo_data
    from tests.conftest import small_config

    write_demo_data(small_config(tmp_path / "data", sa1b_shards=3, images_per_shard=10, sav_shards=0, image_short_side=120))
    store = tmp_path / "store"
    cached = config(tmp_path / "data" / "sa-1b", store, targets=("trunk",), teacher={"source": "tiny-random", "batch_size": 4})
    assert run_cache(cached, executor="local").rows == 30
    fragments = lance.dataset(str(store / "images.lance")).get_fragments()
    assert sorted(f.count_rows() for f in fragments) == [10, 10, 10]
    assert {len(set(f.to_table(columns=["shard"]).column("shard").to_pylist())) for f in fragments} == {1}
    assert len(set(keys(store))) == 30 and verify_store(Store(str(store))).ok


def test_store_commands_on_a_folder_that_is_not_a_store(tmp_path: Path) -> None:
    for command in ("info", "verify"):
        result = runner.invoke(app, ["store", command, str(tmp_path)], env=WIDE)
        assert result.exit_code == 2 and "is not an esam3 store" in result.output


def test_store_copy_is_self_contained(demo_root: Path, tmp_path: Path) -> None:
    """A trainer needs nothing else: the store folder moved elsewhere still verifies and has its heads."""
    store = tmp_path / "store"
    run_cache(config(demo_root / "sa-1b", store, shards="0"), executor="local")
    moved = tmp_path / "moved"
    shutil.move(str(store), moved)
    assert verify_store(Store(str(moved))).ok and (moved / "heads" / "heads.json").is_file()


def test_plan_command(demo_root: Path) -> None:
    result = runner.invoke(
        app, ["plan", "--dataset", "sa-1b", "--shards", "0-9", "--codec", "int8", "--rows-per-sec", "60", "--json"], env=WIDE
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["rows"] == 111_860 and plan["bytes_per_row"]["trunk"] == 1024 * 72 * 72 + 4 * 1024  # SAM3's sizes
    assert plan["gpu_hours"] == pytest.approx(111_860 / 60 / 3600)
    assert plan["total_bytes"] == plan["rows"] * plan["row_bytes"]
    choices = plan["codec_choices"]  # the same run under every codec, to choose from
    assert list(choices) == ["fp16", "bf16", "int8", "lowrank"] and choices["int8"]["row_bytes"] == plan["row_bytes"]
    assert (
        choices["fp16"]["bytes_per_row"]["trunk"] == 2 * 1024 * 72 * 72
        and choices["lowrank"]["bytes_per_row"]["trunk"] == 256 * 72 * 72 + 4 * 256
    )
    assert all(c["total_bytes"] == plan["rows"] * c["row_bytes"] for c in choices.values())
    # mask logits: the output each prompt uses (the default), at the bytes per value logit8d takes on SAM-like logits
    assert plan["bytes_per_row"]["chosen_logits"] == logit_bytes(16, 288) == 16 * LOGIT_MAP_BYTES and plan["logit_bytes_per_value"] is None
    assert not {"multi_logits", "single_logits"} & set(plan["bytes_per_row"])
    every = runner.invoke(
        app, ["plan", "--dataset", "sa-1b", "--shards", "0", "--mask-outputs", "all", "--mask-size", "144", "--json"], env=WIDE
    )
    columns = json.loads(every.output)["bytes_per_row"]
    assert (columns["multi_logits"], columns["single_logits"]) == (
        logit_bytes(48, 144),
        logit_bytes(16, 144),
    ) and "chosen_logits" not in columns
    assert logit_bytes(16, 144) < logit_bytes(16, 288) / 2  # a smaller side: fewer bytes, not 4x fewer (boundaries cost)
    result = runner.invoke(
        app,
        [
            "plan",
            "--dataset",
            "sa-1b",
            "--shards",
            "all",
            "--source",
            str(demo_root / "sa-1b"),
            "--teacher",
            "tiny-random",
            "--targets",
            "trunk",
            "--rows-per-shard",
            "3",
            "--inputs",
            "none",
            "--json",
        ],
        env=WIDE,
    )
    plan = json.loads(result.output)
    assert plan["shards"] == 2 and plan["rows"] == 6 and plan["bytes_per_row"] == {"trunk": 2 * 64 * 8 * 8}
    result = runner.invoke(
        app, ["plan", "--dataset", "sa-v", "--shards", "0", "--max-frames", "10", "--max-objects", "2", "--json"], env=WIDE
    )
    plan = json.loads(result.output)
    assert plan["rows"] == 9030 and plan["bytes_per_row"]["maskmem_features"] == 2 * 2 * 64 * 72 * 72
    assert plan["bytes_per_row"]["input"] == int(0.46 * 3 * 1008 * 1008) and plan["bytes_per_row"]["gt_masks"] == 2 * 2000
    result = runner.invoke(app, ["plan", "--dataset", "sa-1b", "--shards", "0"], env=WIDE)
    assert result.exit_code == 0 and "pass --rows-per-sec" in result.output and "public recipe" in result.output
    assert "every codec" in result.output and "lowrank" in result.output and "vs public recipe" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shards", "all"], "pass --source"),
        (["--shards", "0", "--rows-per-sec", "0"], "--rows-per-sec"),
        (["--shards", "0", "--rows-per-shard", "0"], "--rows-per-shard"),
        (["--shards", "0", "--teacher", "/nope"], "no such directory"),
        (["--shards", "0", "--max-frames", "0"], "--max-frames"),
        (["--shards", "0", "--targets", "memory"], "do not apply"),
        (["--shards", "0", "--inputs", "jpeg"], "--inputs"),
        (["--shards", "0", "--mask-size", "4"], "--mask-size: Input should be greater than or equal to 8"),
        (["--shards", "0", "--mask-size", "400"], "--mask-size 400: this teacher's decoder gives 288x288 mask logits; use at most 288"),
        (["--shards", "0", "--mask-outputs", "some"], "--mask-outputs"),
    ],
)
def test_plan_usage_errors(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["plan", "--dataset", "sa-1b", *args], env=WIDE)
    assert result.exit_code == 2 and message in result.output, result.output


def test_store_show_draws_rows_from_the_stored_inputs_without_the_source(demo_root: Path, tmp_path: Path) -> None:

    source = tmp_path / "source"
    shutil.copytree(demo_root, source)
    store = tmp_path / "store"
    run_cache(config(source / "sa-1b", store, shards="0"), executor="local")
    run_cache(config(source / "sa-v", store, dataset="sa-v"), executor="local")
    shutil.rmtree(source)  # nothing after caching needs the source
    sample = next(s for s in SA1BSource(str(demo_root / "sa-1b")).iter_samples("0") if s.key == "sa1b/2")
    for key, size in (("sa1b/2", simplejpeg.decode_jpeg(sample.jpeg).shape[1::-1]), (None, (160, 128))):
        key = key or lance.dataset(str(store / "frames.lance")).to_table(columns=["key"], limit=1).column("key")[0].as_py()
        result = runner.invoke(app, ["store", "show", str(store), key, "--out", str(tmp_path / "x.png")], env=WIDE)
        assert result.exit_code == 0, result.output
        _picture_and_legend(tmp_path / "x.png", tuple(size))


def _picture_and_legend(png: Path, size: tuple[int, int]) -> np.ndarray:
    """The drawn image (scaled up to 480 px wide if narrower) above a legend panel; returns the image part at ``size``."""
    from PIL import Image

    drawn = Image.open(png)
    width = max(size[0], 480)
    height = round(size[1] * width / size[0])
    assert drawn.width == width and drawn.height > height + 2 * 14, "a legend below the picture"
    return np.asarray(drawn.crop((0, 0, width, height)).resize(size, Image.NEAREST))


def test_store_show_of_a_targets_only_store_reads_the_source(demo_root: Path, tmp_path: Path) -> None:

    store = tmp_path / "store"
    run_cache(config(demo_root / "sa-1b", store, shards="0", inputs="none"), executor="local")
    run_cache(config(demo_root / "sa-v", store, dataset="sa-v", inputs="none"), executor="local")
    png = tmp_path / "image.png"
    result = runner.invoke(app, ["store", "show", str(store), "sa1b/2", "--out", str(png)], env=WIDE)
    assert result.exit_code == 0, result.output
    sample = next(s for s in SA1BSource(str(demo_root / "sa-1b")).iter_samples("0") if s.key == "sa1b/2")
    original = simplejpeg.decode_jpeg(sample.jpeg, colorspace="RGB")
    picture = _picture_and_legend(png, original.shape[1::-1])
    assert picture.shape == original.shape and not np.array_equal(picture, original), "masks and prompts drawn"
    key = lance.dataset(str(store / "frames.lance")).to_table(columns=["key"], limit=1).column("key")[0].as_py()
    result = runner.invoke(app, ["store", "show", str(store), key, "--out", str(tmp_path / "frame.png")], env=WIDE)
    assert result.exit_code == 0, result.output
    _picture_and_legend(tmp_path / "frame.png", (160, 128))
    moved = tmp_path / "moved"
    shutil.copytree(demo_root / "sa-1b", moved)
    result = runner.invoke(app, ["store", "show", str(store), "sa1b/1", "--out", str(tmp_path / "m.png"), "--source", str(moved)], env=WIDE)
    assert result.exit_code == 0, result.output
    only_second = tmp_path / "only-second"
    only_second.mkdir()
    shutil.copy(demo_root / "sa-1b" / "sa_000001.tar", only_second)
    for args, message in (
        (["sa1b/999"], "no row with key"),
        (["cat/1"], "expected sa1b/"),
        (["sa1b/1", "--source", str(tmp_path / "nowhere")], "is not a folder or prefix that exists"),
        (["sa1b/1", "--source", str(tmp_path)], "no shards found at the source"),
        (["sa1b/1", "--source", str(only_second)], "sa_000000.tar is not at"),
    ):
        result = runner.invoke(app, ["store", "show", str(store), *args, "--out", str(tmp_path / "x.png")], env=WIDE)
        assert result.exit_code == 2 and message in result.output, result.output
    result = runner.invoke(app, ["store", "show", str(store), "sa1b/1", "--out", str(tmp_path / "x.jpg")], env=WIDE)
    assert result.exit_code == 2 and "--out" in result.output


def _ledger_rows(ledger: Path) -> int:
    """Rows of a ledger another process is creating: 0 until its first version exists (the folder comes first)."""
    try:
        return lance.dataset(str(ledger)).count_rows()
    except ValueError as exc:  # the folder exists, its first version not yet; anything else is a real error
        if "was not found" not in str(exc):
            raise
        return 0


def test_driver_sigkilled_after_first_commit_then_rerun(tmp_path: Path) -> None:
    """The real thing: `esam3 cache` killed with SIGKILL once a shard is committed; the same command rerun
    finishes only the rest, and the key set equals an uninterrupted run's with no duplicates."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from esam3.pipeline.demo_data import write_demo_data
    from tests.conftest import small_config

    write_demo_data(small_config(tmp_path / "data", sa1b_shards=4, images_per_shard=3, sav_shards=0))
    source, store = tmp_path / "data" / "sa-1b", tmp_path / "store"
    command = [
        sys.executable,
        "-m",
        "esam3.cli",
        "cache",
        "--dataset",
        "sa-1b",
        "--source",
        str(source),
        "--store",
        str(store),
        "--executor",
        "local",
        "--teacher",
        "small-random",
        "--batch-size",
        "1",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    ledger = store / "ledger.lance"
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if _ledger_rows(ledger) >= 1:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert process.wait(timeout=60) == -signal.SIGKILL, "the run finished before it could be killed"
    committed = lance.dataset(str(ledger)).count_rows()
    assert 1 <= committed < 4
    rerun = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert report["shards_skipped"] == committed and report["shards_committed"] == 4 - committed
    assert keys(store) == sorted(f"sa1b/{i}" for i in range(1, 13))
    assert verify_store(Store(str(store))).ok


def test_the_same_key_twice_is_stored_once(tmp_path: Path) -> None:
    """An image in two shards (or twice in one) is a failure the second time, never a second row."""
    source = tmp_path / "source"
    source.mkdir()
    members = {}
    for image_id in (1, 2, 3):
        jpeg, record = _good_sa1b(image_id)
        members[image_id] = [(f"sa_{image_id}.jpg", jpeg), (f"sa_{image_id}.json", json.dumps(record).encode())]
    write_tar(source / "sa_000000.tar", members[1] + members[2])
    write_tar(source / "sa_000001.tar", members[2] + members[3] + members[3])
    store = tmp_path / "store"
    report = run_cache(config(source, store, max_failures=MaxFailures.parse("5")), executor="local")
    assert keys(store) == ["sa1b/1", "sa1b/2", "sa1b/3"]
    reasons = sorted(f["reason"] for f in lance.dataset(str(store / "failures.lance")).to_table().to_pylist())
    assert len(reasons) == 2 and any("already stored from sa_000000.tar" in r for r in reasons)
    assert any("duplicate key sa1b/3 in the shard" in r for r in reasons)
    assert report.failures == 2 and verify_store(Store(str(store))).ok


def test_exit_code_counts_failures_of_earlier_runs(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    _bad_shard(source, 0, "corrupt JPEG")
    shutil.copy(source / "sa_000000.tar", source / "sa_000001.tar")
    store = tmp_path / "store"
    first = run_cache(config(source, store, shards="0"), executor="local")
    assert first.exit_code == 1  # 1 failure, --max-failures 0
    rest = run_cache(config(source, store, shards="0-1"), executor="local")
    assert rest.shards_skipped == 1 and rest.exit_code == 1  # the selected shards hold failures either way
    # shard 1 is a copy of shard 0: its corrupt JPEG and its 2 keys already stored from shard 0 make 3 failures
    assert run_cache(config(source, store, shards="0-1", max_failures=MaxFailures.parse("3")), executor="local").exit_code == 1
    assert run_cache(config(source, store, shards="0-1", max_failures=MaxFailures.parse("4")), executor="local").exit_code == 0
    again = run_cache(config(source, store, shards="0"), executor="local")
    assert again.nothing_to_do and again.exit_code == 1, "a no-op rerun exits like the run it repeats"
    cli = runner.invoke(
        app,
        [
            "cache",
            "--dataset",
            "sa-1b",
            "--source",
            str(source),
            "--store",
            str(store),
            "--shards",
            "0",
            "--codec",
            "int8",
            "--executor",
            "local",
        ],
        env=WIDE,
    )
    assert cli.exit_code == 1 and "nothing to do" in cli.output and "exceed --max-failures 0" in cli.output


def unreadable_shard(source: Path, shard: str) -> Path:
    """Make ``shard`` of ``source`` fail with a real I/O error when read (listed, but opening it fails)."""
    import os

    path = source / shard
    saved = path.with_suffix(".saved")
    path.rename(saved)
    os.symlink("/proc/self/mem", path)  # a file the kernel refuses to read from offset 0
    return saved


def test_a_shard_that_cannot_be_read_stays_uncommitted_and_the_others_go_on(
    demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from esam3.workers import read_step

    monkeypatch.setattr(read_step, "RETRY_PAUSE_S", 0.0)
    source = tmp_path / "source"
    shutil.copytree(demo_root / "sa-1b", source)
    saved = unreadable_shard(source, "sa_000001.tar")
    store = tmp_path / "store"
    report = run_cache(config(source, store), executor="local")
    assert report.shards_committed == 1 and report.exit_code == 1 and report.failures == 0
    assert list(report.aborted) == ["sa_000001.tar"] and "cannot open sa_000001.tar" in report.aborted["sa_000001.tar"]
    assert "(read 4 times)" in report.aborted["sa_000001.tar"], "read again 3 times (--read-retries) before it is left"
    assert {k.split("/")[0] for k in keys(store)} == {"sa1b"} and len(keys(store)) == 3
    result = runner.invoke(
        app, ["cache", "--dataset", "sa-1b", "--source", str(source), "--store", str(tmp_path / "cli"), "--executor", "local"], env=WIDE
    )
    assert result.exit_code == 1 and "1 shard(s) hit a storage or network error and stay uncommitted (sa_000001.tar" in result.output
    assert "Traceback" not in result.output
    (source / "sa_000001.tar").unlink()
    saved.rename(source / "sa_000001.tar")
    rerun = run_cache(config(source, store), executor="local")
    assert (rerun.shards_skipped, rerun.shards_committed, rerun.exit_code, rerun.aborted) == (1, 1, 0, {})
    assert len(keys(store)) == len(set(keys(store))) == 6 and verify_store(Store(str(store))).ok


def test_frames_before_any_object_appears_are_stored(tiny_teacher: Sam3Teacher) -> None:
    """SA-V frames before the first prompted object have no objects: empty tensors, not a crash."""
    from esam3.schemas.codecs import FeatureCodec
    from esam3.workers.device_codecs import HostCopies, quantise_features, quantise_logits
    from esam3.workers.teacher_step import received
    from esam3.workers.write_step import EncodeFrames

    g = tiny_teacher.geometry
    write = EncodeFrames(g, FeatureCodec.INT8, "checksum", "run", 0)
    copies = HostCopies(torch.device("cpu"))
    parts = {
        "trunk": copies.send(quantise_features(torch.zeros(g.trunk_width, g.grid, g.grid), "int8")),
        "mask_logits": copies.send(quantise_logits(torch.zeros(0, g.mask_size, g.mask_size))),
        "maskmem_features": copies.send(quantise_features(torch.zeros(0, g.memory_channels, g.grid, g.grid), "int8")),
        "pix_feat_with_mem": copies.send(quantise_features(torch.zeros(0, g.hidden, g.grid, g.grid), "int8")),
        "object_score": copies.send_raw(torch.zeros(0)),
        "object_pointer": copies.send_raw(torch.zeros(0, g.hidden)),
    }
    copies.wait()
    row = {
        "key": "sav/x/00000",
        "shard": "sav_000.tar",
        "member": "sav_000/x.mp4",
        "height": 10,
        "width": 12,
        "transform": "{}",
        "precision": "fp32",
        "video_id": "x",
        "frame": 0,
        "frame_index": 0,
        "prompt_kind": "mask",
        "object_ids": [],
        "is_conditioning": [],
        "has_memory_conditioned": [],
        "input": None,
        "gt_masks": "[]",
    }
    stored = write.store_row(received(row, parts))
    assert decode_tensor(stored["maskmem_features"]).shape == (0, g.memory_channels, g.grid, g.grid)
    assert decode_tensor(stored["mask_logits"]).shape == (0, g.mask_size, g.mask_size)
    assert stored["gt_masks"] == [] and "input" not in stored


def test_two_datasets_create_one_store_at_the_same_time(demo_root: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    run_concurrently([config(demo_root / dataset, store, dataset=dataset) for dataset in ("sa-1b", "sa-v")])
    card = Store(str(store)).read_card()
    assert set(card["targets"]) == {"sa-1b", "sa-v"} and verify_store(Store(str(store))).ok


def test_lowrank_codec_fits_a_basis_once_and_stores_it(demo_root: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    result = runner.invoke(
        app,
        [
            "cache",
            "--dataset",
            "sa-1b",
            "--source",
            str(demo_root / "sa-1b"),
            "--store",
            str(store),
            "--executor",
            "local",
            "--codec",
            "lowrank",
            "--rank",
            "16",
        ],
        env=WIDE,
    )
    assert result.exit_code == 0, result.output
    basis = Store(str(store)).read_basis("sa-1b")
    assert basis is not None and basis.components.shape == (64, 16)
    rows = rows_of(store, "images")
    assert len(rows) == 6 and all(r["trunk"]["codec"] == "lowrank" and len(r["trunk"]["data"]) == 16 * 8 * 8 for r in rows)
    assert all(0 < r["trunk"]["error"] < 1 for r in rows)  # measured per row, whatever it is
    trunk = decode_tensor(rows[0]["trunk"], basis)
    assert trunk.shape == (64, 8, 8) and verify_store(Store(str(store))).ok
    stamp = (store / "basis-sa-1b.bin").stat().st_mtime_ns
    assert run_cache(config(demo_root / "sa-1b", store, codec="lowrank", rank=16), executor="local").nothing_to_do
    assert (store / "basis-sa-1b.bin").stat().st_mtime_ns == stamp
    result = runner.invoke(app, ["plan", "--dataset", "sa-1b", "--shards", "0", "--codec", "lowrank", "--json"], env=WIDE)
    assert json.loads(result.output)["bytes_per_row"]["trunk"] == 256 * 72 * 72 + 4 * 256  # 1.33 MB at SAM3's size


def test_lowrank_codec_on_videos(demo_root: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    report = run_cache(config(demo_root / "sa-v", store, dataset="sa-v", codec="lowrank", rank=8), executor="local")
    assert report.rows == 18 and Store(str(store)).read_basis("sa-v").rank == 8
    row = rows_of(store, "frames", limit=1)[0]
    assert row["trunk"]["codec"] == "lowrank" and row["maskmem_features"]["codec"] == "int8"
    assert verify_store(Store(str(store))).ok


def test_every_kind_of_bad_sample_becomes_a_failure_row(tmp_path: Path) -> None:
    """Each bad-input kind of the sources, plus a truncated tar, in one SA-1B run; a broken video in an SA-V run."""
    from tests.test_sources import SAV_BAD, _sav_shard

    source = tmp_path / "sa-1b"
    source.mkdir()
    cases = list(SA1B_BAD)
    for shard, case in enumerate(cases):
        _bad_shard(source, shard, case)
    truncated = source / f"sa_{len(cases):06d}.tar"
    shutil.copy(source / "sa_000000.tar", truncated)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    store = tmp_path / "store"
    report = run_cache(config(source, store, max_failures=MaxFailures.parse("100%")), executor="local")
    failures = lance.dataset(str(store / "failures.lance")).to_table().to_pylist()
    by_shard: dict[str, list] = {}
    for failure in failures:
        by_shard.setdefault(failure["shard"], []).append(failure)
    for shard, case in enumerate(cases):
        assert len(by_shard[f"sa_{shard:06d}.tar"]) == 1, case
    assert any("truncated or corrupt tar" in f["reason"] for f in by_shard[truncated.name])
    # the truncated copy repeats shard 0's keys: what it still holds is a duplicate, never a second row
    assert report.exit_code == 0 and len(keys(store)) == len(set(keys(store))) == 2 * len(cases)
    assert verify_store(Store(str(store))).ok
    videos = tmp_path / "sa-v"
    videos.mkdir()
    _sav_shard(videos, SAV_BAD["unreadable mp4"][0])
    video_store = tmp_path / "video-store"
    report = run_cache(config(videos, video_store, dataset="sa-v", max_failures=MaxFailures.parse("1")), executor="local")
    failure = lance.dataset(str(video_store / "failures.lance")).to_table().to_pylist()
    assert report.exit_code == 0 and len(failure) == 1 and "not a readable video" in failure[0]["reason"]
    assert {k.split("/")[1] for k in keys(video_store, "frames")} == {"sav_000001", "sav_000003"}


def test_address_with_nothing_listening_fails_at_once(demo_root: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # free once closed: nothing listens there
    args = [
        "cache",
        "--dataset",
        "sa-1b",
        "--source",
        str(demo_root / "sa-1b"),
        "--store",
        str(tmp_path / "s"),
        "--address",
        f"127.0.0.1:{port}",
    ]
    result = runner.invoke(app, args, env=WIDE)
    assert result.exit_code == 1, result.output
    assert f"--address 127.0.0.1:{port}: no Ray cluster answers (Connection refused)" in result.output


@pytest.mark.parametrize("fault", ["nan-iou", "fp16-overflow"])
def test_targets_that_cannot_be_stored_fail_their_row_only(
    demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """Non-finite targets (or values the codec cannot hold) are a failure row, never a stored Inf/NaN."""
    import dataclasses

    from esam3.workers.teacher import Sam3Teacher as Teacher

    calls = {"n": 0}
    if fault == "nan-iou":
        original = Teacher.prompt_targets

        def faulty(self, trunk, prompts, **kwargs):
            out = original(self, trunk, prompts, **kwargs)
            calls["n"] += 1
            if calls["n"] == 3:  # the second image's targets (each image's prompts are decoded twice: exact trunk,
                iou = out.iou.clone()  # then the codec's decoded trunk for the task-level error)
                iou[0, 0] = float("nan")
                out = dataclasses.replace(out, iou=iou)
            return out

        monkeypatch.setattr(Teacher, "prompt_targets", faulty)
    else:
        original = Teacher.trunk_features

        def faulty(self, pixels):
            out = original(self, pixels)
            calls["n"] += 1
            if calls["n"] == 1:
                out = out.clone()
                out[0] = 7e4  # finite in float32, Inf in fp16
            return out

        monkeypatch.setattr(Teacher, "trunk_features", faulty)
    store = tmp_path / "store"
    codec = "fp16" if fault == "fp16-overflow" else "int8"
    report = run_cache(config(demo_root / "sa-1b", store, codec=codec, max_failures=MaxFailures.parse("1")), executor="local")
    assert (report.rows, report.failures, report.exit_code) == (5, 1, 0)
    reason = lance.dataset(str(store / "failures.lance")).to_table().column("reason").to_pylist()[0]
    assert "not stored" in reason and ("NaN or Inf" in reason if fault == "nan-iou" else "do not fit codec fp16" in reason)
    assert verify_store(Store(str(store))).ok


@pytest.mark.parametrize("fault", ["fails-after-8-frames", "oom-after-8-frames", "nan-in-2-frames"])
def test_a_video_that_fails_midway_keeps_its_earlier_frames_and_counts_once(
    demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """Frames leave the teacher in blocks of 8 as they are made; the failure stands for the frames not stored."""
    import dataclasses

    import esam3.workers.teacher_step as teacher_step

    original = teacher_step.run_video
    videos: list[str] = []

    def faulty(teacher, work, **kwargs):
        videos.append(work.key)
        for targets in original(teacher, work, **kwargs):
            if work.key == videos[0] and fault == "fails-after-8-frames" and targets.frame == 8:
                raise ValueError("the tracker lost its memory")
            if work.key == videos[0] and fault == "oom-after-8-frames" and targets.frame == 8:  # not a ValueError
                raise RuntimeError("CUDA out of memory. Tried to allocate 12.00 GiB")
            if work.key == videos[0] and fault == "nan-in-2-frames" and targets.frame in (2, 5):
                targets = dataclasses.replace(targets, object_score=targets.object_score * float("nan"))
            yield targets

    monkeypatch.setattr(teacher_step, "run_video", faulty)
    store = tmp_path / "store"
    report = run_cache(config(demo_root / "sa-v", store, dataset="sa-v", max_failures=MaxFailures.parse("1")), executor="local")
    frames = rows_of(store, "frames")
    stored = sorted(f["frame"] for f in frames if f["video_id"] == videos[0].split("/")[1])
    expected = list(range(8)) if fault.endswith("after-8-frames") else [f for f in range(9) if f not in (2, 5)]
    assert stored == expected and report.rows == len(frames) == 9 + len(expected)
    assert report.failures == 1 and report.exit_code == 0, "one video failed, however many of its frames"
    failures = lance.dataset(str(store / "failures.lance")).to_table().to_pylist()
    assert len(failures) == (1 if fault.endswith("after-8-frames") else 2)
    assert "after frame 8" in failures[0]["reason"] if fault.endswith("after-8-frames") else "NaN" in failures[0]["reason"]
    if fault == "oom-after-8-frames":
        assert "RuntimeError: CUDA out of memory" in failures[0]["reason"]
    assert verify_store(Store(str(store))).ok


@pytest.mark.parametrize("poison", ["trunk", "prompts"])
def test_a_poison_sample_fails_alone_and_the_run_goes_on(
    demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, poison: str
) -> None:
    """Any error of the teacher on one sample (out of memory, a kernel error), not only a ValueError: the batch is
    run again one sample at a time, the sample that still fails is a failure row with its reason, the rest are
    stored; a teacher failing on every sample stops the run instead of failing them all."""
    from esam3.workers import teacher_step
    from esam3.workers.teacher import Sam3Teacher as Teacher

    name = "trunk_features" if poison == "trunk" else "prompt_targets"
    original, calls = getattr(Teacher, name), {"n": 0}

    def faulty(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= (2 if poison == "trunk" else 1):  # trunk: the batch of 3, then its first sample alone
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(self, *args)

    monkeypatch.setattr(Teacher, name, faulty)
    store = tmp_path / "store"
    report = run_cache(config(demo_root / "sa-1b", store, max_failures=MaxFailures.parse("1")), executor="local")
    assert (report.rows, report.failures, report.exit_code) == (5, 1, 0)
    reason = lance.dataset(str(store / "failures.lance")).to_table().column("reason").to_pylist()[0]
    said = "the teacher failed on it" if poison == "trunk" else "prompt targets failed"
    assert reason == f"{said}: RuntimeError: CUDA out of memory. Tried to allocate 20.00 GiB"
    assert verify_store(Store(str(store))).ok

    def broken(self, *args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(Teacher, name, broken)
    monkeypatch.setattr(teacher_step, "POISON_STREAK", 3)
    with pytest.raises(RuntimeError, match="failed on 3 samples in a row .* the teacher, not the samples, is failing"):
        run_cache(config(demo_root / "sa-1b", tmp_path / "broken"), executor="local")


def test_a_transient_read_error_is_retried_and_counted(demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection reset mid-shard: the shard is read again from its start, the samples already sent are skipped,
    and it commits whole; the summary counts the retry."""
    import fsspec.implementations.local as local

    from esam3.workers import read_step

    monkeypatch.setattr(read_step, "RETRY_PAUSE_S", 0.0)
    broken = demo_root / "sa-1b" / "sa_000001.tar"
    reads = {"bytes": 0, "limit": int(0.6 * broken.stat().st_size), "resets": 0}
    original_read = local.LocalFileOpener.read

    def read_then_reset_once(self, *args, **kwargs):
        data = original_read(self, *args, **kwargs)
        if self.path.endswith(broken.name) and not reads["resets"]:
            reads["bytes"] += len(data)
            if reads["bytes"] > reads["limit"]:
                reads["resets"] += 1
                raise ConnectionResetError("connection reset by peer")
        return data

    monkeypatch.setattr(local.LocalFileOpener, "read", read_then_reset_once)
    store = tmp_path / "store"
    result = runner.invoke(
        app,
        [
            "cache",
            "--dataset",
            "sa-1b",
            "--source",
            str(demo_root / "sa-1b"),
            "--store",
            str(store),
            "--executor",
            "local",
            "--codec",
            "int8",
        ],
        env=WIDE,
    )
    assert result.exit_code == 0 and reads["resets"] == 1, result.output
    assert "read retries" in result.output and keys(store) == [f"sa1b/{i}" for i in range(1, 7)]
    assert verify_store(Store(str(store))).ok
    [run] = read_runs(Store(str(store)))
    assert run["counts"]["read_retries"] == 1
    bad = runner.invoke(
        app,
        [
            "cache",
            "--dataset",
            "sa-1b",
            "--source",
            str(demo_root / "sa-1b"),
            "--store",
            str(store),
            "--executor",
            "local",
            "--read-retries",
            "21",
        ],
        env=WIDE,
    )
    assert bad.exit_code == 2 and "--read-retries" in bad.output


def test_actors_racing_to_store_a_basis_all_keep_the_same_one(tmp_path: Path) -> None:
    """Several actors fitting a basis at once: exactly one is stored (created once), and each gets that one back."""
    from esam3.schemas.codecs import fit_basis

    rng = np.random.default_rng(3)
    candidates = [fit_basis(rng.normal(size=(4, 8, 3, 3)).astype(np.float32), 4) for _ in range(6)]
    store = Store(str(tmp_path / "store"))
    store.fs.makedirs(store.path, exist_ok=True)
    barrier, kept = threading.Barrier(len(candidates)), [None] * len(candidates)

    def actor(i: int) -> None:
        barrier.wait()
        kept[i] = store.write_basis_once("sa-1b", candidates[i])

    threads = [threading.Thread(target=actor, args=(i,)) for i in range(len(candidates))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stored = store.read_basis("sa-1b").components
    assert all(np.array_equal(k.components, stored) for k in kept)
    assert sum(np.array_equal(c.components, stored) for c in candidates) == 1
    assert not [p for p in (tmp_path / "store").iterdir() if p.name.endswith(".tmp")], "no staging file left"


def test_a_shard_that_fails_midway_or_on_write_is_dropped_with_its_written_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An I/O error after some of a shard's rows were written (read side), or while writing them (write side):
    the shard is left uncommitted (its fragments stay invisible), the other shards commit; a 403 stops the run."""
    import fsspec.implementations.local as local

    import esam3.workers.shard_writer as shard_writer
    from esam3.pipeline.demo_data import write_demo_data
    from tests.conftest import small_config

    write_demo_data(small_config(tmp_path / "data", sa1b_shards=3, images_per_shard=10, sav_shards=0))
    source = tmp_path / "data" / "sa-1b"
    broken = source / "sa_000001.tar"
    reads = {"bytes": 0, "limit": int(0.9 * broken.stat().st_size)}
    original_read = local.LocalFileOpener.read

    def read_then_reset(self, *args, **kwargs):  # shard 1 breaks after its first 8-image batch went downstream
        data = original_read(self, *args, **kwargs)
        if self.path.endswith(broken.name):
            reads["bytes"] += len(data)
            if reads["bytes"] > reads["limit"]:
                raise ConnectionResetError("connection reset by peer")
        return data

    original_write = shard_writer.write_fragments

    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("in the way")

    def write_refused_for_shard_2(reader, uri, *args, **kwargs):  # the stream of one shard: its first rows tell which
        first = reader.read_next_batch()
        if "sa_000002.tar" in first.column(first.schema.get_field_index("shard")).to_pylist():
            uri = str(not_a_folder / "images.lance")  # Lance's own error: LanceError(IO) ... Not a directory
        rest = pa.RecordBatchReader.from_batches(reader.schema, [first, *reader])
        return original_write(rest, uri, *args, **kwargs)

    monkeypatch.setattr(local.LocalFileOpener, "read", read_then_reset)
    monkeypatch.setattr(shard_writer, "write_fragments", write_refused_for_shard_2)
    store = tmp_path / "store"
    report = run_cache(config(source, store, read_retries=0), executor="local")  # a reset that lasts: retries in the next test
    assert sorted(report.aborted) == ["sa_000001.tar", "sa_000002.tar"] and report.exit_code == 1
    assert "connection reset" in report.aborted["sa_000001.tar"] and "writing its rows failed" in report.aborted["sa_000002.tar"]
    assert "LanceError(IO)" in report.aborted["sa_000002.tar"] and ".rs:" not in report.aborted["sa_000002.tar"]
    assert report.rows_written >= 18 and report.rows == 10  # shard 1's first batch was written, never committed
    assert {r["shard"] for r in rows_of(store, "images")} == {"sa_000000.tar"} and verify_store(Store(str(store))).ok

    def refused(table, *args, **kwargs):
        raise PermissionError("403 Forbidden")

    monkeypatch.setattr(shard_writer, "write_fragments", refused)
    with pytest.raises(StoreError, match="writing refused"):
        run_cache(config(source, tmp_path / "refused"), executor="local")


@pytest.mark.parametrize(
    ("value", "said"), [("0", "greater than or equal to 1"), ("4097", "less than or equal to 4096"), ("x", "valid integer")]
)
def test_max_teachers_is_checked_before_any_work(demo_root: Path, tmp_path: Path, value: str, said: str) -> None:
    args = ["cache", "--dataset", "sa-1b", "--source", str(demo_root / "sa-1b"), "--store", str(tmp_path / "s"), "--max-teachers", value]
    bad = CliRunner().invoke(app, args, env=WIDE)
    assert bad.exit_code == 2 and "--max-teachers" in bad.output and said in bad.output, bad.output
    assert not (tmp_path / "s").exists()


def test_max_teachers_reaches_the_run_config() -> None:
    from esam3.pipeline.ray_plan import teacher_pool

    config = CacheConfig(dataset="sa-1b", source="x", store="y", max_teachers=3)
    assert teacher_pool(1, [8], config.max_teachers).compute.max_size == 3
