"""``--codec auto``: every candidate codec measured on pilot rows from several shards, the smallest within
``--max-error`` taken and stored once; reruns adopt it; rows over the budget are counted; ``plan`` does the same."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from esam3.cli import app
from esam3.pipeline.codec_pilot import choose_codec, pilot_rows, quotas, spread
from esam3.pipeline.store.check import verify_store
from esam3.pipeline.plan import run_cache
from esam3.pipeline.shards import DatasetName, ShardRef, select_shards
from esam3.pipeline.store import Store
from esam3.pipeline.store.rows import StoreRows
from esam3.schemas.cache import CacheConfig, ErrorBudget
from esam3.schemas.codecs import fit_basis
from esam3.schemas.store import StoreError
from esam3.schemas.errors import ConfigError
from esam3.schemas.teacher import TeacherConfig, TeacherLoadError
from esam3.workers.preprocess import normalize
from tests.conftest import start_lean_ray
from esam3.workers.codec_choice import candidate_ranks

runner = CliRunner()
WIDE = {"COLUMNS": "400"}


def auto(demo_root: Path, store: Path, budget: ErrorBudget) -> CacheConfig:
    return CacheConfig(dataset="sa-1b", source=str(demo_root / "sa-1b"), store=str(store), error_budget=budget)


def test_the_budget_parses_and_candidates_spread() -> None:
    assert ErrorBudget.parse("mask=0.02") == ErrorBudget(mask_iou_loss=0.02, rel_rms=0.05)
    assert ErrorBudget.parse(" rms=0.1 , mask=0.005") == ErrorBudget(mask_iou_loss=0.005, rel_rms=0.1)
    for text in ("", "iou=0.1", "mask", "mask=x", "mask=1.5"):
        with pytest.raises(ValueError):
            ErrorBudget.parse(text)
    assert candidate_ranks(1024) == [64, 128, 192, 256, 384, 512] and candidate_ranks(8) == [1, 2, 3, 4]
    assert quotas(5) == [4, 3, 3, 3, 3] and quotas(7) == [3, 3, 2, 2, 2, 2, 2] and sum(quotas(8)) == 16  # every shard counts
    shards = [ShardRef(DatasetName.SA1B, i, f"x/{i}") for i in range(100)]
    assert [s.shard_id for s in spread(shards, 8)] == [0, 14, 28, 42, 57, 71, 85, 99] and spread(shards[:3], 8) == shards[:3]


def test_auto_takes_the_smallest_codec_within_the_budget_and_keeps_it(
    demo_root: Path, tmp_path: Path, tiny_teacher, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a loose budget that the tiny random teacher's low-rank codecs can meet (its features are random: only a wide
    # basis keeps them), so the choice is a rank the pilot measured, not the most exact codec
    budget = ErrorBudget(mask_iou_loss=0.3, rel_rms=0.6)
    store = tmp_path / "store"
    report = run_cache(auto(demo_root, store, budget), executor="local")
    choice = Store(str(store)).read_codec_choice("sa-1b")
    assert choice["rows"] == 6 and choice["shards"] == ["sa_000000.tar", "sa_000001.tar"]  # the pilot read both shards
    within = [c for c in choice["candidates"] if c["within"]]
    assert within and (choice["codec"], choice["rank"]) == (within[0]["codec"], within[0]["rank"])
    assert all(c["trunk_bytes"] >= within[0]["trunk_bytes"] for c in within)  # the smallest that fits
    assert choice["codec"] == "lowrank" and choice["teacher"] == tiny_teacher.card.checksum
    # the run's basis is the pilot's, fitted on the rows of both shards (not the first teacher batch's)
    config = auto(demo_root, store, budget)
    pilot = pilot_rows(config, select_shards(config.source, DatasetName.SA1B, "all"), 112, None)
    pixels = torch.stack([torch.frombuffer(bytearray(r["pixels"]), dtype=torch.uint8).reshape(3, 112, 112) for r in pilot])
    expected = fit_basis(tiny_teacher.trunk_features(normalize(pixels)).float().numpy(), choice["rank"]).components
    stored = Store(str(store)).read_basis("sa-1b").components
    assert np.abs(stored @ stored.T - expected @ expected.T).max() < 1e-3  # the same subspace
    rows = StoreRows(Store(str(store)), "images").where(columns=["trunk", "codec_mask_iou", "codec"])
    assert {r["codec"] for r in rows} == {"lowrank"} and report.codec == f"lowrank r={choice['rank']}"
    loss = np.mean([1 - r["codec_mask_iou"] for r in rows])
    rms = np.mean([r["trunk"]["error"] for r in rows])
    above = sum(1 for r in rows if r["codec_mask_iou"] < 1 - budget.mask_iou_loss or r["trunk"]["error"] > budget.rel_rms)
    assert report.budget["means"] == pytest.approx({"mask_iou_loss": loss, "rel_rms": rms}, abs=1e-5)
    assert report.budget["rows_above"] == above and report.budget["within"] == (loss <= 0.3 and rms <= 0.6)
    info = runner.invoke(app, ["store", "info", str(store), "--json"], env=WIDE)
    assert json.loads(info.output)["tables"]["images"]["codec_choice"]["budget_check"] == report.budget
    said = " ".join(runner.invoke(app, ["store", "info", str(store)], env=WIDE).output.split())
    assert f"lowrank r={choice['rank']} chosen by --codec auto on 6 pilot rows of 2 shard(s) under --max-error mask=0.3,rms=0.6" in said
    monkeypatch.setattr("esam3.pipeline.codec_pilot.choose_codec", lambda *a: pytest.fail("measured again"))
    again = run_cache(auto(demo_root, store, budget), executor="local")  # adopts the stored choice: no new pilot
    assert again.nothing_to_do
    with pytest.raises(Exception, match="chosen under another budget"):
        run_cache(auto(demo_root, store, ErrorBudget()), executor="local")


def test_the_pilot_writes_nothing_into_another_teachers_store(demo_root: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    run_cache(CacheConfig(dataset="sa-v", source=str(demo_root / "sa-v"), store=str(store), codec="int8"), executor="local")
    other = auto(demo_root, store, ErrorBudget()).model_copy(update={"teacher": TeacherConfig(source="tiny-random", seed=1)})
    with pytest.raises(StoreError, match="holds targets of teacher"):
        run_cache(other, executor="local")
    assert Store(str(store)).read_codec_choice("sa-1b") is None and Store(str(store)).read_basis("sa-1b") is None


def test_auto_from_the_cli_with_the_default_budget(demo_root: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    base = ["cache", "--dataset", "sa-1b", "--source", str(demo_root / "sa-1b"), "--store", str(store), "--executor", "local"]
    result = runner.invoke(app, [*base, "--codec", "auto", "--json"], env=WIDE)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    choice = Store(str(store)).read_codec_choice("sa-1b")
    assert choice["budget"] == ErrorBudget().model_dump() and report["codec"].split()[0] == choice["codec"]
    chosen = next(c for c in choice["candidates"] if (c["codec"], c["rank"]) == (choice["codec"], choice["rank"]))
    # random features: nothing low-rank keeps them within the default budget; the smallest codec that does is taken
    assert chosen["within"] and all(not c["within"] for c in choice["candidates"] if c["trunk_bytes"] < chosen["trunk_bytes"])
    assert report["budget"]["rows"] == report["rows"] == 6 and 0 <= report["budget"]["rows_above"] <= 6
    other = tmp_path / "explicit"
    assert run_cache(
        CacheConfig(dataset="sa-1b", source=str(demo_root / "sa-1b"), store=str(other), codec="int8", shards="0"), executor="local"
    ).rows
    refused = runner.invoke(
        app,
        [
            "cache",
            "--dataset",
            "sa-1b",
            "--source",
            str(demo_root / "sa-1b"),
            "--store",
            str(other),
            "--codec",
            "auto",
            "--executor",
            "local",
        ],
        env=WIDE,
    )
    assert refused.exit_code == 2 and "holds sa-1b rows cached with --codec int8; pass --codec int8" in refused.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-error", "mask=0.01"], "--max-error: is the budget of --codec auto"),
        (["--codec", "auto", "--max-error", "mask=2"], "--max-error: mask_iou_loss: Input should be less than 1"),
        (["--codec", "auto", "--max-error", "iou=0.1"], "--max-error: expected mask=X and / or rms=Y"),
        (["--codec", "auto", "--targets", "trunk"], "codec auto measures what each codec costs the heads' masks"),
        (["--codec", "auto", "--rank", "64"], "--rank: --codec auto chooses the rank"),
    ],
)
def test_auto_usage_errors(demo_root: Path, tmp_path: Path, args: list[str], message: str) -> None:
    base = ["cache", "--dataset", "sa-1b", "--source", str(demo_root / "sa-1b"), "--store", str(tmp_path / "s"), "--executor", "local"]
    result = runner.invoke(app, [*base, *args], env=WIDE)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "s").exists()


def test_plan_measures_the_codecs_before_a_run(demo_root: Path) -> None:
    plan = [
        "plan",
        "--dataset",
        "sa-1b",
        "--shards",
        "all",
        "--source",
        str(demo_root / "sa-1b"),
        "--teacher",
        "tiny-random",
        "--codec",
        "auto",
    ]
    result = runner.invoke(app, [*plan, "--max-error", "mask=0.3,rms=0.6", "--json"], env=WIDE)
    assert result.exit_code == 0, result.output
    said = json.loads(result.output.strip().splitlines()[-1])  # after the pilot's progress bar (stderr)
    pilot = said["codec_pilot"]
    assert pilot["rows"] == 6 and said["codec"] == f"lowrank r={pilot['rank']}"
    assert said["bytes_per_row"]["trunk"] == next(c["trunk_bytes"] for c in pilot["candidates"] if c["rank"] == pilot["rank"])
    assert np.all(np.diff([c["trunk_bytes"] for c in pilot["candidates"]]) >= 0)  # smallest first
    table = " ".join(runner.invoke(app, plan, env=WIDE).output.split())  # the title wraps at the table's width
    assert "codec auto on 6 pilot rows of 2 shard(s), budget --max-error mask=0.01,rms=0.05" in table and "(chosen)" in table
    missing = runner.invoke(app, ["plan", "--dataset", "sa-1b", "--shards", "0-9", "--codec", "auto"], env=WIDE)
    assert missing.exit_code == 2 and "--codec auto: pass --source" in missing.output
    video = runner.invoke(app, ["plan", "--dataset", "sa-v", "--shards", "0", "--codec", "auto"], env=WIDE)
    assert video.exit_code == 2 and "it needs --dataset sa-1b" in video.output


def test_on_a_cluster_with_gpus_the_pilot_is_a_ray_task_holding_one(demo_root: Path, tmp_path: Path) -> None:
    """With the Ray executor the pilot runs where a GPU is (a CPU head node's driver would take minutes at full size):
    here one logical GPU, which the pilot's task holds and gives back before the run's teacher actor takes it."""
    ray = start_lean_ray(num_gpus=1)
    try:
        loose = ErrorBudget(mask_iou_loss=0.3, rel_rms=0.6)  # a low-rank choice: its basis travels back through Ray
        report = run_cache(auto(demo_root, tmp_path / "store", loose).model_copy(update={"shards": "0"}), executor="ray")
    finally:
        ray.shutdown()
    store = Store(str(tmp_path / "store"))
    choice = store.read_codec_choice("sa-1b")
    assert choice["measured_on"]["pid"] != os.getpid() and choice["measured_on"]["device"] == "cpu"  # a Ray worker
    assert choice["codec"] == "lowrank" and store.read_basis("sa-1b").rank == choice["rank"]
    assert report.rows == 3 and report.budget["rows"] == 3 and verify_store(store).ok


def test_the_pilot_refuses_another_teacher_and_a_run_refuses_a_basis_of_another_rank(demo_root: Path, tmp_path: Path) -> None:
    config = auto(demo_root, tmp_path / "store", ErrorBudget())
    shards = select_shards(config.source, DatasetName.SA1B, "all")
    with pytest.raises(TeacherLoadError, match="every worker must see the same checkpoint"):
        choose_codec(config, shards, None, checksum="0" * 16)  # a worker whose checkpoint differs from the driver's
    left = Store(str(tmp_path / "left"))  # what a pilot cut short (or a racing one) may leave: a basis, no rows
    (tmp_path / "left").mkdir()
    left.write_basis_once("sa-1b", fit_basis(np.random.default_rng(0).normal(size=(2, 64, 8, 8)).astype(np.float32), 8))
    explicit = CacheConfig(dataset="sa-1b", source=str(demo_root / "sa-1b"), store=str(tmp_path / "left"), codec="lowrank", rank=16)
    with pytest.raises(
        ConfigError, match="holds a sa-1b low-rank basis of rank 8, this run's codec has rank 16: pass --codec lowrank --rank 8"
    ):
        run_cache(explicit, executor="local")
    assert Store(str(tmp_path / "left")).read_card() is None  # refused before the store got a card
