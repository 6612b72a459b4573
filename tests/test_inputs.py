"""What a row holds besides the targets (store format 3): the student's input and the ground truth, and that the
cached trunk is the teacher's trunk of the very file (SAM3's own preprocessing, not a DCT-scaled decode)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from esam3.cli import app
from esam3.pipeline.demo_data import sa1b_image, write_tar
from esam3.pipeline.plan import run_cache
from esam3.pipeline.shards import DatasetName, ShardRef
from esam3.pipeline.sources import SA1BSource, SAVSource
from esam3.pipeline.store import Store
from esam3.pipeline.store.rows import StoreRows
from esam3.schemas.cache import CacheConfig
from esam3.schemas.sav import SAV_ANNOTATION_STRIDE
from esam3.schemas.store import decode_tensor
from esam3.schemas.teacher import VideoTargetConfig
from esam3.workers.decode import teacher_input
from esam3.workers.read_step import ReadImages
from esam3.workers.teacher import Sam3Teacher
from esam3.workers.video_targets import prepare_video
from tests import sam3_reference as ref

runner = CliRunner()
#: Short sides: 96 (no DCT scale applies at S = 112), 240 (decoded at 1/2 by --fast-decode), 500 (at 1/4).
SHORT_SIDES = (96, 240, 500)


@pytest.fixture(scope="module")
def sized_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SA-1B shard of photo-like demo images at three sizes (written as the real SA-1B members)."""
    root = tmp_path_factory.mktemp("sized") / "sa-1b"
    root.mkdir()
    members = []
    for image_id, short in enumerate(SHORT_SIDES, start=1):
        jpeg, record = sa1b_image(np.random.default_rng(image_id), image_id, short)
        members += [(f"sa_{image_id}.jpg", jpeg), (f"sa_{image_id}.json", json.dumps(record.model_dump(mode="json")).encode())]
    write_tar(root / "sa_000000.tar", members)
    return root


@pytest.fixture(scope="module")
def transformers_trunks(sized_source: Path, tiny_teacher: Sam3Teacher) -> dict[str, torch.Tensor]:
    """Per key: the trunk transformers computes on the file (PIL decode, Sam3ImageProcessor, Sam3Model)."""
    from transformers import Sam3Model

    g = tiny_teacher.geometry
    model = Sam3Model.from_pretrained(tiny_teacher.card.checkpoint_dir, local_files_only=True).eval()
    out = {}
    for sample in SA1BSource(str(sized_source)).iter_samples("all"):
        import io

        image = np.array(Image.open(io.BytesIO(sample.jpeg)).convert("RGB"))
        with torch.no_grad():
            tokens = model.get_vision_features(pixel_values=ref.pixel_values([image], g.image_size)).last_hidden_state
        out[sample.key] = tokens.transpose(1, 2).reshape(g.trunk_width, g.grid, g.grid)
    return out


def _trunk_errors(store: Path, references: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """Per key: (relative RMS of the stored trunk against transformers' trunk of the file, the row's own codec error)."""
    rows = StoreRows(Store(str(store)), "images")
    out = {}
    for row in rows.where(columns=["key", "trunk"]):
        expected = references[row["key"]].numpy()
        trunk = rows.decode(row, "trunk")
        out[row["key"]] = (float(np.linalg.norm(trunk - expected) / np.linalg.norm(expected)), row["trunk"]["error"])
    return out


@pytest.mark.parametrize("codec", ["fp16", "bf16", "int8", "lowrank"])
def test_cached_trunk_is_transformers_trunk_of_the_file_within_codec_error(
    codec: str, sized_source: Path, transformers_trunks: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    store = tmp_path / "store"
    config = CacheConfig(dataset="sa-1b", source=str(sized_source), store=str(store), codec=codec, rank=16, targets=("trunk",))
    assert run_cache(config, executor="local").rows == len(SHORT_SIDES)
    errors = _trunk_errors(store, transformers_trunks)
    for key, (error, codec_error) in errors.items():
        assert error <= codec_error * 1.05 + 1e-4, (key, error, codec_error)  # the only difference is the codec's


def test_fast_decode_is_opt_in_recorded_and_differs_where_dct_scaling_applies(
    sized_source: Path, transformers_trunks: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    store = tmp_path / "fast"
    config = CacheConfig(dataset="sa-1b", source=str(sized_source), store=str(store), codec="fp16", targets=("trunk",), dct_scaling=True)
    run_cache(config, executor="local")
    errors = _trunk_errors(store, transformers_trunks)
    assert errors["sa1b/1"][0] <= errors["sa1b/1"][1] + 1e-4  # 96 px: no DCT scale covers 112, decoded in full
    for key in ("sa1b/2", "sa1b/3"):  # decoded at 1/2 and 1/4: another image than the one SAM3 preprocesses
        assert errors[key][0] > 10 * errors[key][1] + 1e-3, (key, errors[key])
    rows = {r["key"]: json.loads(r["preprocess"]) for r in StoreRows(Store(str(store)), "images").where(columns=["key", "preprocess"])}
    assert rows["sa1b/3"]["decoded_width"] < rows["sa1b/3"]["original_width"]
    assert json.loads((store / "targets-sa-1b.json").read_text())["dct_scaling"] is True


@pytest.mark.parametrize("fast", [False, True])
def test_image_rows_hold_the_file_and_the_prompted_masks(fast: bool, sized_source: Path, tmp_path: Path, tiny_teacher: Sam3Teacher) -> None:
    """Decoding a row's input through its transform record gives the teacher's input bit for bit; gt_masks are
    the source's RLEs of the prompted masks, in prompt order."""
    store = tmp_path / "store"
    run_cache(CacheConfig(dataset="sa-1b", source=str(sized_source), store=str(store), codec="int8", dct_scaling=fast), executor="local")
    read = ReadImages(
        str(sized_source), tiny_teacher.geometry.image_size, CacheConfig(dataset="sa-1b", source="-", store="-").prompts, dct_scaling=fast
    )
    shard = ShardRef(DatasetName.SA1B, 0, str(sized_source / "sa_000000.tar"))
    seen = {r["key"]: r for table in read(shard) for r in table.to_pylist() if r["kind"] == "sample"}
    samples = {s.key: s for s in SA1BSource(str(sized_source)).iter_samples("all")}
    rows = StoreRows(Store(str(store)), "images").where()
    assert len(rows) == len(SHORT_SIDES)
    for row in rows:
        assert row["input"]["codec"] == "jpeg" and bytes(row["input"]["data"]) == samples[row["key"]].jpeg
        pixels = teacher_input("jpeg", row["input"]["data"], json.loads(row["preprocess"]))
        assert pixels.dtype == torch.uint8 and pixels.numpy().tobytes() == seen[row["key"]]["pixels"]
        annotations = samples[row["key"]].record.annotations
        expected = [annotations[i].segmentation for i in decode_tensor(row["prompt_mask_index"]).tolist()]
        assert [(m["height"], m["width"], m["counts"]) for m in row["gt_masks"]] == [(*e.size, e.counts) for e in expected]
        assert len(row["gt_masks"]) == row["prompt_kinds"]["shape"][0] > 0


def test_frame_rows_hold_the_teachers_frame_and_each_objects_mask(demo_root: Path, tmp_path: Path, tiny_teacher: Sam3Teacher) -> None:
    store = tmp_path / "store"
    run_cache(CacheConfig(dataset="sa-v", source=str(demo_root / "sa-v"), store=str(store), codec="int8"), executor="local")
    size = tiny_teacher.geometry.image_size
    videos = {s.key.split("/")[1]: s for s in SAVSource(str(demo_root / "sa-v"), max_frames=64).iter_samples("all")}
    rows = StoreRows(Store(str(store)), "frames").where()
    assert rows and any(r["object_ids"] for r in rows)
    for row in rows:
        sample = videos[row["video_id"]]
        work = prepare_video(sample, VideoTargetConfig(), size)
        assert row["input"]["codec"] == "png" and row["input"]["shape"] == [size, size, 3]
        frame = teacher_input("png", row["input"]["data"], json.loads(row["preprocess"]))
        assert torch.equal(frame, torch.from_numpy(work.pixels[row["frame"]]))  # lossless: exactly the teacher's input
        t = row["frame_index"] // SAV_ANNOTATION_STRIDE
        column = {o: j for j, o in enumerate(sample.record.masklet_id)}
        expected = [sample.record.masklet[t][column[o]] for o in row["object_ids"]]
        assert [(m["height"], m["width"], m["counts"]) for m in row["gt_masks"]] == [(*e.size, e.counts) for e in expected]


def test_inputs_none_keeps_targets_only(demo_root: Path, tmp_path: Path) -> None:
    for dataset in ("sa-1b", "sa-v"):
        store = tmp_path / dataset
        run_cache(
            CacheConfig(dataset=dataset, source=str(demo_root / dataset), store=str(store), codec="int8", inputs="none"), executor="local"
        )
        table = "images" if dataset == "sa-1b" else "frames"
        rows = StoreRows(Store(str(store)), table).where(columns=["key", "input", "gt_masks"])
        assert rows and all(r["input"] is None for r in rows) and any(r["gt_masks"] for r in rows)
        assert json.loads((store / f"targets-{dataset}.json").read_text())["inputs"] == "none"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dataset", "sa-v", "--fast-decode"], "--fast-decode: applies to sa-1b only"),
        (["--dataset", "sa-1b", "--inputs", "pixels"], "--inputs"),
    ],
)
def test_input_flag_errors(args: list[str], message: str, tmp_path: Path) -> None:
    result = runner.invoke(app, ["cache", *args, "--source", str(tmp_path), "--store", str(tmp_path / "s")], env={"COLUMNS": "400"})
    assert result.exit_code == 2 and message in result.output, result.output


def test_fast_decode_flag_reaches_the_rows(sized_source: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    args = [
        "cache",
        "--dataset",
        "sa-1b",
        "--source",
        str(sized_source),
        "--store",
        str(store),
        "--executor",
        "local",
        "--targets",
        "trunk",
        "--fast-decode",
    ]
    result = runner.invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert json.loads((store / "targets-sa-1b.json").read_text())["dct_scaling"] is True
    rows = StoreRows(Store(str(store)), "images").where(columns=["key", "preprocess"])
    assert {r["key"]: json.loads(r["preprocess"])["decoded_width"] < json.loads(r["preprocess"])["original_width"] for r in rows} == {
        "sa1b/1": False,
        "sa1b/2": True,
        "sa1b/3": True,
    }


def test_a_store_of_the_earlier_format_is_refused_with_the_fix(demo_root: Path, tmp_path: Path) -> None:
    store = tmp_path / "old"
    run_cache(CacheConfig(dataset="sa-1b", source=str(demo_root / "sa-1b"), store=str(store), codec="int8", shards="0"), executor="local")
    card = json.loads((store / "store.json").read_text())
    (store / "store.json").write_text(json.dumps({**card, "format": 3}))  # before the chosen mask outputs
    result = runner.invoke(app, ["store", "info", str(store)], env={"COLUMNS": "400"})
    assert result.exit_code == 2 and "format 3" in result.output and "cache into a new --store" in result.output


def test_rows_record_what_the_trunk_codec_costs_the_heads_masks(demo_root: Path, tmp_path: Path) -> None:
    means = {}
    for codec, rank in (("fp16", 256), ("int8", 256), ("lowrank", 2)):
        store = tmp_path / codec
        run_cache(
            CacheConfig(dataset="sa-1b", source=str(demo_root / "sa-1b"), store=str(store), codec=codec, rank=rank, shards="0"),
            executor="local",
        )
        rows = StoreRows(Store(str(store)), "images").where(columns=["key", "codec_mask_iou", "codec_iou_error"])
        assert all(0 < r["codec_mask_iou"] <= 1 and r["codec_iou_error"] >= 0 for r in rows)
        means[codec] = float(np.mean([r["codec_mask_iou"] for r in rows]))
        info = runner.invoke(app, ["store", "info", str(store)], env={"COLUMNS": "400"}).output
        assert "the trunk codec costs the heads' masks a mean IoU of" in info and f"over {len(rows)} rows" in info
    assert means["fp16"] > 0.99 and means["fp16"] >= means["int8"] > means["lowrank"]  # a rank-2 basis moves the masks
    plan = [
        "plan",
        "--dataset",
        "sa-1b",
        "--shards",
        "0-9",
        "--teacher",
        "tiny-random",
        "--codec",
        "int8",
        "--measured-in",
        str(tmp_path / "int8"),
    ]
    said = runner.invoke(app, [*plan, "--json"], env={"COLUMNS": "400"})
    assert said.exit_code == 0, said.output
    planned = json.loads(said.output)
    assert planned["codec_task_error"]["mask_iou_mean"] == pytest.approx(means["int8"], abs=1e-4)
    # the pilot's stored logits give the bytes per value the plan counts them at (here: the tiny teacher's noisy ones)
    logits = StoreRows(Store(str(tmp_path / "int8")), "images").where(columns=["chosen_logits", "logits_mask_iou"])
    rate = sum(len(r["chosen_logits"]["data"]) for r in logits) / sum(np.prod(r["chosen_logits"]["shape"]) for r in logits)
    assert planned["logit_bytes_per_value"] == pytest.approx(rate) and planned["bytes_per_row"]["chosen_logits"] == int(
        16 * (rate * 32 * 32 + 4)
    )
    assert planned["codec_task_error"]["logits_mask_iou_mean"] == pytest.approx(np.mean([r["logits_mask_iou"] for r in logits]), abs=1e-4)
    table = runner.invoke(app, plan, env={"COLUMNS": "400"}).output
    assert "heads' mask IoU, decoded vs exact trunk" in table and "stored mask logits: mask IoU vs the teacher's" in table
    assert f"mask logits at {rate:.3f} B/value as measured in" in table
    for args, message in (
        (["--codec", "fp16", "--measured-in", str(tmp_path / "int8")], "was cached with --codec int8, this plan is for fp16"),
        (["--codec", "int8", "--measured-in", str(tmp_path / "int8")], "was cached with mask side 32, this plan is for 288"),  # SAM3's
        (
            ["--teacher", "tiny-random", "--codec", "int8", "--mask-size", "16", "--measured-in", str(tmp_path / "int8")],
            "was cached with mask side 32, this plan is for 16",
        ),
        (["--measured-in", str(tmp_path / "nowhere")], "is not an esam3 store"),
    ):
        bad = runner.invoke(app, ["plan", "--dataset", "sa-1b", "--shards", "0", *args], env={"COLUMNS": "400"})
        assert bad.exit_code == 2 and message in bad.output, bad.output
    untouched = tmp_path / "trunk-only"
    run_cache(
        CacheConfig(dataset="sa-1b", source=str(demo_root / "sa-1b"), store=str(untouched), codec="int8", targets=("trunk",), shards="0"),
        executor="local",
    )
    assert all(r["codec_mask_iou"] is None for r in StoreRows(Store(str(untouched)), "images").where(columns=["codec_mask_iou"]))
