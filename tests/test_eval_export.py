"""What to do with a trained student: eval on the store's split and on COCO-format data, export, predict.

The metrics are checked against an "oracle" student (the tiny teacher's own trunk): it must score a perfect match
with the teacher's cached masks, and the prompt mapping from image pixels must reproduce the cached logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torch import nn
from typer.testing import CliRunner

from esam3.cli import app
from esam3.pipeline.demo_data import write_demo_coco
from esam3.pipeline.store import Store
from esam3.pipeline.store.rows import StoreRows
from esam3.schemas.prompts import PromptKind
from esam3.schemas.store import decode_tensor
from esam3.schemas.train import Stage1Config
from esam3.train.evaluate import EvalError, centre_click, evaluate_coco, evaluate_store
from esam3.train.model import ModelLoadError, StudentModel
from esam3.train.stage1 import run_stage1
from esam3.workers.preprocess import normalize

runner = CliRunner()


@pytest.fixture(scope="module")
def run(sa1b_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    run_stage1(
        Stage1Config(store=str(sa1b_store), out=out, student="es-ev-s", steps=2, batch_size=2, loader_workers=0, val_percent=40, lr=1e-3)
    )
    return out


@pytest.fixture(scope="module")
def exported(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("model") / "es-ev-s"
    result = runner.invoke(app, ["export", "--checkpoint", str(run), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def coco(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_demo_coco(demo_root / "sa-1b", tmp_path_factory.mktemp("coco"))


class Oracle(nn.Module):
    """A 'student' that is the teacher's trunk: what a perfectly distilled student would output."""

    def __init__(self, teacher, spec) -> None:
        super().__init__()
        self.teacher, self.spec = teacher, spec

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.teacher.trunk_features(normalize(pixels)).float()


@pytest.fixture
def oracle(run: Path, tiny_teacher) -> StudentModel:
    model = StudentModel.from_checkpoint(run)
    model.student = Oracle(tiny_teacher, model.student.spec)
    return model


def test_the_teachers_own_trunk_scores_a_perfect_match(oracle: StudentModel, sa1b_store: Path) -> None:
    result = evaluate_store(oracle, split="all")
    rows = StoreRows(Store(str(sa1b_store)), "images").take(list(range(6)), columns=["prompt_kinds"])
    assert result.rows == 6 and result.prompts == sum(r["prompt_kinds"]["shape"][0] for r in rows)
    assert result.feature_cosine > 0.9999 and result.feature_mse < 1e-3  # the fp16 codec's error only
    # not exactly 1: the tiny random teacher's mask logits hover near 0, so float-level differences (batching, the
    # fp16 trunk) flip boundary pixels; a wrong prompt mapping or pick scores like a random student (~0.4)
    assert result.miou_teacher > 0.97 and result.iou_score_error < 1e-3
    assert result.miou_gt == pytest.approx(result.teacher_miou_gt, abs=0.01)
    assert set(result.per_kind) <= {k.label for k in PromptKind} and sum(v["prompts"] for v in result.per_kind.values()) == result.prompts


def test_prompts_in_image_pixels_decode_like_the_cache(oracle: StudentModel, sa1b_store: Path) -> None:
    """``StudentModel.decode`` maps image coordinates to the teacher frame as the cache's sampler does: from the
    cached trunk, a row's single-click and box prompts give back the teacher's cached logits."""
    store = Store(str(sa1b_store))
    rows = StoreRows(store, "images")
    checked = 0
    for row in rows.take(
        list(range(6)),
        columns=[
            "trunk",
            "preprocess",
            "prompt_kinds",
            "prompt_points",
            "prompt_labels",
            "prompt_boxes",
            "chosen_logits",
            "chosen_output",
            "iou",
        ],
    ):
        t = json.loads(row["preprocess"])
        scale = np.array([t["size"] / t["original_width"], t["size"] / t["original_height"]])
        kinds, labels = decode_tensor(row["prompt_kinds"]), decode_tensor(row["prompt_labels"])
        points, boxes = decode_tensor(row["prompt_points"]), decode_tensor(row["prompt_boxes"])
        clicks = [k for k in range(len(kinds)) if kinds[k] == PromptKind.POINT and (labels[k] >= 0).sum() == 1]
        framed = [k for k in range(len(kinds)) if kinds[k] == PromptKind.BOX]
        if not clicks and not framed:
            continue
        trunk = torch.from_numpy(rows.decode(row, "trunk"))[None]
        result = oracle.decode(
            trunk, (t["original_height"], t["original_width"]), points[clicks, 0] / scale, boxes[framed] / np.tile(scale, 2)
        )
        iou = decode_tensor(row["iou"])[clicks + framed]
        pick = [1 + int(np.argmax(iou[i, 1:])) if i < len(clicks) else 0 for i in range(len(iou))]  # one click: multimask
        assert decode_tensor(row["chosen_output"])[clicks + framed].tolist() == pick  # the store kept that output
        expected = decode_tensor(row["chosen_logits"])[clicks + framed]
        assert np.abs(result.logits.numpy() - expected).max() < 0.05 * max(1.0, np.abs(expected).max())
        assert result.masks.shape == (len(pick), t["original_height"], t["original_width"])
        checked += len(pick)
    assert checked >= 4


def test_eval_cli_on_the_val_split(run: Path) -> None:
    result = runner.invoke(app, ["eval", "--checkpoint", str(run), "--json"])
    assert result.exit_code == 0, result.output
    line = json.loads(result.output.strip().splitlines()[-1])
    assert line["split"] == "val" and 0 < line["rows"] < 6 and line["prompts"] > 0
    assert 0 <= line["miou_teacher"] <= 1 and 0 <= line["miou_gt"] <= 1 and -1 <= line["feature_cosine"] <= 1
    table = runner.invoke(app, ["eval", "--checkpoint", str(run), "--split", "all"])
    assert table.exit_code == 0 and "all split: 6 rows" in " ".join(table.output.split())
    empty = runner.invoke(app, ["eval", "--checkpoint", str(run), "--val-percent", "0"])
    assert empty.exit_code == 2 and "the val split of" in empty.output and "--split all" in empty.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give --checkpoint"),
        (["--checkpoint", "CKPT", "--model", "CKPT"], "one of them"),
        (["--checkpoint", "CKPT", "--split", "test"], "--split: expected val, train or all"),
        (["--checkpoint", "CKPT", "--coco-images", "x"], "needs both --coco-images and --coco-annotations"),
        (["--checkpoint", "CKPT", "--batch-size", "0"], "must be at least 1"),
        (["--checkpoint", "CKPT", "--device", "tpu"], "--device: expected cpu or cuda"),
        (["--checkpoint", "NOWHERE"], "not a checkpoint"),
    ],
)
def test_eval_flags_are_checked(run: Path, args: list[str], message: str) -> None:
    args = [str(run) if a == "CKPT" else a for a in args]
    result = runner.invoke(app, ["eval", *args])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output


def test_an_exported_model_loads_alone_and_segments_like_its_checkpoint(
    run: Path, exported: Path, sa1b_store: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    image = np.random.default_rng(0).integers(0, 256, (90, 130, 3), dtype=np.uint8)
    before = StudentModel.from_checkpoint(run).segment(image, points=[[40, 30]], boxes=[[10, 5, 90, 70]])
    document = json.loads((exported / "config.json").read_text())
    assert document["kind"] == "esam3-student" and document["student"]["name"] == "es-ev-s"
    monkeypatch.setattr("esam3.pipeline.store.Store.__init__", lambda *a, **k: (_ for _ in ()).throw(AssertionError("store opened")))
    model = StudentModel.load(exported)
    after = model.segment(image, points=[[40, 30]], boxes=[[10, 5, 90, 70]])
    assert np.array_equal(before.masks, after.masks) and np.allclose(before.scores, after.scores)
    assert after.masks.shape == (2, 90, 130)
    card = json.loads((sa1b_store / "store.json").read_text())
    assert document["provenance"]["store"]["teacher_parameters"]["total"] == card["teacher"]["parameters"]["total"]
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    (broken / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(ModelLoadError, match="unreadable"):
        StudentModel.load(broken)
    with pytest.raises(ModelLoadError, match="config.json is missing"):
        StudentModel.load(tmp_path)


def test_export_cli_reports_sizes_next_to_the_teachers(run: Path, tmp_path: Path, sa1b_store: Path) -> None:
    result = runner.invoke(app, ["export", "--checkpoint", str(run), "--out", str(tmp_path / "m"), "--json"])
    assert result.exit_code == 0, result.output
    line = json.loads(result.output.strip().splitlines()[-1])
    model = StudentModel.load(tmp_path / "m")
    assert line["parameters"] == sum(p.numel() for p in model.parameters())
    assert line["bytes"] == sum(f.stat().st_size for f in (tmp_path / "m").iterdir())
    card = json.loads((sa1b_store / "store.json").read_text())
    assert line["teacher_parameters"] == card["teacher"]["parameters"]["total"]
    assert round(line["sam3_parameters"] / 1e6, 1) == 859.9  # SAM3: trunk 446M + text encoder 354M + heads 60M
    table = runner.invoke(app, ["export", "--checkpoint", str(run), "--out", str(tmp_path / "m2")])
    assert table.exit_code == 0 and "the store's teacher" in table.output and "859.92M" in table.output
    assert runner.invoke(app, ["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "x")]).exit_code == 2


def test_coco_eval_scores_masks_against_the_annotations(
    oracle: StudentModel, coco: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images, annotations = coco
    document = json.loads(annotations.read_text())
    box = evaluate_coco(oracle, images, annotations, "box")
    point = evaluate_coco(oracle, images, annotations, "point")
    assert box.images == 6 and box.annotations == point.annotations == len(document["annotations"])
    # recomputed here: the oracle's masks for every GT box against the decoded GT masks
    ious = []
    for entry in document["images"]:
        objects = [a for a in document["annotations"] if a["image_id"] == entry["id"]]
        from PIL import Image

        pixels = np.array(Image.open(images / entry["file_name"]).convert("RGB"))
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in objects])
        masks = oracle.segment(pixels, boxes=boxes).masks
        for a, mask in zip(objects, masks):
            gt = mask_utils.decode({"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()}).astype(bool)
            ious.append((mask & gt).sum() / max(1, (mask | gt).sum()))
    assert box.miou == pytest.approx(float(np.mean(ious)), abs=1e-6)
    # a model whose masks are the annotations scores 1; crowd annotations and polygons are handled
    edited = json.loads(annotations.read_text())
    first = edited["annotations"][0]
    x, y, w, h = first["bbox"]
    edited["annotations"].append({**first, "id": 10_000, "iscrowd": 1})
    edited["annotations"].append({**first, "id": 10_001, "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
    size = first["segmentation"]["size"]
    dense = mask_utils.decode({"size": size, "counts": first["segmentation"]["counts"].encode()}).flatten(order="F")
    changes = np.flatnonzero(np.diff(np.concatenate([[0], dense, [1 - dense[-1]]])))  # COCO's uncompressed RLE: runs from 0s
    edited["annotations"].append(
        {**first, "id": 10_002, "segmentation": {"size": size, "counts": np.diff(np.concatenate([[0], changes])).tolist()}}
    )
    edited["annotations"].append({**first, "id": 10_003, "segmentation": {"size": size, "counts": [size[0] * size[1]]}})  # empty
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(edited))

    visits = iter(edited["images"])  # evaluate_coco segments each image once, in the file's order

    def perfect(image, points=None, boxes=None):
        entry = next(visits)
        assert (entry["height"], entry["width"]) == image.shape[:2]
        masks = []
        for a in (a for a in edited["annotations"] if a["image_id"] == entry["id"] and not a.get("iscrowd")):
            seg = a["segmentation"]
            if isinstance(seg, list) or isinstance(seg["counts"], list):
                rle = mask_utils.frPyObjects(seg, *image.shape[:2])
                rle = mask_utils.merge(rle) if isinstance(rle, list) else rle
            else:
                rle = {**seg, "counts": seg["counts"].encode()}
            if mask_utils.area(rle):
                masks.append(mask_utils.decode(rle).astype(bool))
        return type("Result", (), {"masks": np.stack(masks)})()

    monkeypatch.setattr(oracle, "segment", perfect)
    result = evaluate_coco(oracle, images, path)
    assert result.miou == pytest.approx(1.0) and result.skipped_crowd == 1 and result.skipped_empty == 1
    assert result.annotations == len(document["annotations"]) + 2  # + the polygon and the uncompressed RLE
    monkeypatch.undo()
    with pytest.raises(EvalError, match="missing .* is --coco-images the right folder"):
        evaluate_coco(oracle, tmp_path, annotations)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(EvalError, match="not a COCO instances file"):
        evaluate_coco(oracle, images, tmp_path / "bad.json")


def test_centre_click_lies_on_the_object() -> None:
    ring = np.zeros((20, 20), bool)
    ring[2:18, 2:5] = True  # the box centre (10, 10) is off the object
    x, y = centre_click(ring, (2, 2, 3, 16))
    assert ring[int(y), int(x)]
    full = np.ones((20, 20), bool)
    assert centre_click(full, (0, 0, 20, 20)) == (10.0, 10.0)


def test_coco_cli_and_predict_cli(exported: Path, coco: tuple[Path, Path], tmp_path: Path) -> None:
    images, annotations = coco
    result = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(exported),
            "--coco-images",
            str(images),
            "--coco-annotations",
            str(annotations),
            "--prompt",
            "point",
            "--limit",
            "2",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    line = json.loads(result.output.strip().splitlines()[-1])
    assert line["images"] == 2 and line["prompt"] == "point" and 0 <= line["miou"] <= 1
    picture = sorted(images.iterdir())[0]
    out = tmp_path / "overlay.png"
    result = runner.invoke(
        app,
        [
            "predict",
            "--model",
            str(exported),
            "--image",
            str(picture),
            "--point",
            "50,40",
            "--box",
            "5,5,120,90",
            "--out",
            str(out),
            "--json",
            "--repeats",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    line = json.loads(result.output.strip().splitlines()[-1])
    from PIL import Image

    pixels = np.array(Image.open(picture).convert("RGB"))
    expected = StudentModel.load(exported).segment(pixels, points=[[50, 40]], boxes=[[5, 5, 120, 90]]).masks
    decoded = [mask_utils.decode({"size": m["rle"]["size"], "counts": m["rle"]["counts"].encode()}).astype(bool) for m in line["masks"]]
    assert [list(m) for m in map(dict.keys, line["masks"])][0][:1] == ["point"] and np.array_equal(np.stack(decoded), expected)
    assert line["latency_ms"] > 0 and Image.open(out).size == (pixels.shape[1], pixels.shape[0])
    text = runner.invoke(app, ["predict", "--model", str(exported), "--image", str(picture), "--box", "5,5,120,90", "--out", str(out)])
    assert text.exit_code == 0 and "ms per image on cpu" in " ".join(text.output.split())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give at least one --point"),
        (["--point", "1,2,3"], "--point: expected 2 comma-separated numbers"),
        (["--box", "10,10,5,20"], "x1 > x0 and y1 > y0"),
        (["--point", "nan,1"], "--point: expected 2"),
        (["--point", "1,2", "--repeats", "0"], "--repeats must be at least 1"),
    ],
)
def test_predict_flags_are_checked(exported: Path, coco: tuple[Path, Path], tmp_path: Path, args: list[str], message: str) -> None:
    picture = sorted(coco[0].iterdir())[0]
    result = runner.invoke(app, ["predict", "--model", str(exported), "--image", str(picture), "--out", str(tmp_path / "o.png"), *args])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    missing = runner.invoke(app, ["predict", "--model", str(tmp_path), "--image", str(picture), "--point", "1,2", "--json"])
    assert missing.exit_code == 2 and "config.json is missing" in missing.output
