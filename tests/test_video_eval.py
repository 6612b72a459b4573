"""A stage-2 student as a tracker: export and load, J&F on the store's videos and on a DAVIS-format folder, predict.

The scoring is checked with a "student" that returns the teacher's cached outputs (J&F vs the teacher must be 1 and
vs the ground truth must equal the teacher's own) and with one that returns the ground truth (DAVIS J&F = 1).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from esam3.cli import app
from esam3.pipeline.sources import SAVSource
from esam3.schemas.sav import SAV_ANNOTATION_STRIDE
from esam3.schemas.train import Stage2Config
from esam3.train.stage2 import run_stage2
from esam3.train.tracker import Decoded
from esam3.train.video_eval import evaluate_davis, evaluate_video_store
from esam3.train.video_model import VideoStudentModel


@pytest.fixture(scope="module")
def stage2_run(sav_store: Path, stage1_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stage2") / "run"
    run_stage2(
        Stage2Config(
            store=str(sav_store),
            out=out,
            init=stage1_run,
            steps=2,
            batch_size=2,
            clip_length=3,
            loader_workers=0,
            val_percent=0,
            global_latents=4,
            perceiver_depth=1,
            memory_layers=1,
            memory_ffn=128,
        )
    )
    return out


@pytest.fixture(scope="module")
def davis(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo SA-V videos' annotated frames as a DAVIS-format folder (JPEG frames, palette PNG annotations)."""
    root = tmp_path_factory.mktemp("davis")
    for sample in SAVSource(str(demo_root / "sa-v")).iter_samples("0"):
        name = sample.key.split("/")[1]
        (root / "JPEGImages" / name).mkdir(parents=True)
        (root / "Annotations" / name).mkdir(parents=True)
        for position, index in enumerate(sample.frame_indices.tolist()):
            if index % SAV_ANNOTATION_STRIDE:
                continue
            labels = np.zeros(sample.frames.shape[1:3], np.uint8)
            for k, runs in enumerate(sample.masks[index // SAV_ANNOTATION_STRIDE][:3]):
                labels[runs.to_mask().astype(bool)] = k + 1
            Image.fromarray(sample.frames[position]).save(root / "JPEGImages" / name / f"{position:05d}.jpg", quality=95)
            png = Image.fromarray(labels, mode="P")
            png.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0] * 756)
            png.save(root / "Annotations" / name / f"{position:05d}.png")
    return root


def test_export_and_load_give_the_same_tracker(stage2_run: Path, tmp_path: Path, davis: Path) -> None:
    model = VideoStudentModel.from_checkpoint(stage2_run)
    report = model.save(tmp_path / "model")
    loaded = VideoStudentModel.load(tmp_path / "model")
    document = json.loads((tmp_path / "model" / "config.json").read_text())
    assert document["kind"] == "esam3-video-student" and document["memory"]["global_latents"] == 4
    parts = (model.student, model.heads.tracker_model, model.heads.tracker_neck, model.memory)  # not the detector heads
    assert report.parameters == sum(p.numel() for part in parts for p in part.parameters()) and document["parameters"]["memory"] > 0
    a, b = evaluate_davis(model, davis, limit=1), evaluate_davis(loaded, davis, limit=1)
    assert a.jf == b.jf and a.frames == 9


def test_store_eval_scores_the_teachers_own_masks_as_a_perfect_match(stage2_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = VideoStudentModel.from_checkpoint(stage2_run)
    honest = evaluate_video_store(model, split="all")
    for name in ("jf_gt", "jf_teacher", "teacher_jf_gt"):
        assert 0.0 <= getattr(honest, name)["J&F"] <= 1.0
    assert honest.videos == 2 and honest.frames == 18 and honest.objects >= 4 and -1 <= honest.memory_cosine <= 1

    def teacher(batch, clip_length, objects, forcing, generator=None):  # the cached teacher outputs of every tracked frame
        rows, slots = torch.nonzero(batch["object_valid"] & ~batch["is_conditioning"], as_tuple=True)
        k = len(rows)
        return [
            Decoded(
                rows,
                slots,
                torch.zeros_like(rows),
                batch["mask_logits"][rows, slots][:, None],
                torch.zeros(k, 1),
                batch["object_score"][rows, slots],
                torch.zeros(k, dtype=torch.long),
                batch["pix_feat_with_mem"][rows, slots],
            )
        ]

    monkeypatch.setattr(model.tracker, "forward", teacher)
    perfect = evaluate_video_store(model, split="all")
    assert perfect.jf_teacher["J&F"] == 1.0 and perfect.jf_gt == perfect.teacher_jf_gt == honest.teacher_jf_gt
    assert perfect.memory_cosine == pytest.approx(1.0, abs=1e-5)
    assert perfect.jf_gt["objects"] == honest.objects and perfect.jf_gt["frames"] > 0


def test_davis_eval_scores_the_ground_truth_as_a_perfect_match(stage2_run: Path, davis: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = VideoStudentModel.from_checkpoint(stage2_run)
    honest = evaluate_davis(model, davis)
    assert honest.videos == 2 and honest.frames == 18 and 0 <= honest.jf["J&F"] <= 1 and honest.ms_per_frame > 0

    class Truth:
        def __init__(self, labels: np.ndarray, ids: list[int]) -> None:
            self.labels, self.ids = labels, ids

        def frame_masks(self, t: int, height: int, width: int) -> np.ndarray:
            return np.stack([self.labels[t] == k for k in self.ids])

    def track(pixels, prompts):
        video = next(name for name, value in frames.items() if value == len(pixels))
        return Truth(labels[video], [p.object_id for p in prompts])

    from esam3.train.video_eval import davis_videos, read_palette_mask

    labels = {name: np.stack([read_palette_mask(p) for p in masks]) for name, _, masks in davis_videos(davis)[:1]}
    frames = {name: len(value) for name, value in labels.items()}
    monkeypatch.setattr(model, "track", track)
    perfect = evaluate_davis(model, davis, limit=1)
    assert perfect.jf["J&F"] == 1.0 and perfect.jf["objects"] >= 2 and perfect.jf["frames"] > 0


def test_davis_folder_errors_name_the_fix(stage2_run: Path, davis: Path, tmp_path: Path) -> None:
    from esam3.train.evaluate import EvalError

    model = VideoStudentModel.from_checkpoint(stage2_run)
    with pytest.raises(EvalError, match="no JPEGImages/ folder"):
        evaluate_davis(model, tmp_path)
    broken = tmp_path / "broken"
    (broken / "JPEGImages" / "v").mkdir(parents=True)
    (broken / "Annotations" / "v").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(broken / "JPEGImages" / "v" / "00000.jpg")
    with pytest.raises(EvalError, match="1 frame\\(s\\) of v have no annotation"):
        evaluate_davis(model, broken)


def test_eval_export_and_predict_on_the_cli(stage2_run: Path, stage1_run: Path, davis: Path, demo_root: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["eval", "--checkpoint", str(stage2_run), "--split", "all"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "student vs ground truth: J&F" in text and "the teacher vs ground truth (for scale)" in text
    result = runner.invoke(app, ["eval", "--checkpoint", str(stage1_run), "--davis", str(davis)])
    assert result.exit_code == 2 and "give a stage-2 checkpoint" in result.output
    result = runner.invoke(app, ["export", "--checkpoint", str(stage2_run), "--out", str(tmp_path / "model"), "--json"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["eval", "--model", str(tmp_path / "model"), "--davis", str(davis), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["videos"] == 2
    mp4 = _demo_mp4(demo_root, tmp_path)  # the demo video, out of its tar
    first_mask = next((davis / "Annotations").iterdir()) / "00000.png"
    for prompt in (["--mask", str(first_mask)], ["--point", "80,64"], ["--box", "40,30,120,100"]):
        out = tmp_path / f"strip-{prompt[0][2:]}.png"
        result = runner.invoke(
            app,
            [
                "predict",
                "--model",
                str(tmp_path / "model"),
                "--video",
                str(mp4),
                *prompt,
                "--out",
                str(out),
                "--max-frames",
                "12",
                "--json",
            ],
        )
        assert result.exit_code == 0, result.output
        line = json.loads(result.output.strip().splitlines()[-1])
        assert line["frames"] == 12 and len(line["objects"]) >= 1 and len(line["objects"][0]["masks"]) == 12
        assert out.is_file() and Image.open(out).size[0] > Image.open(out).size[1]  # a strip of frames
        assert line["ms_per_frame"] > 0 and line["sam3_ms_per_frame"] is None
    result = runner.invoke(
        app,
        [
            "predict",
            "--model",
            str(tmp_path / "model"),
            "--video",
            str(mp4),
            "--point",
            "80,64",
            "--max-frames",
            "3",
            "--vs-sam3",
            "--out",
            str(tmp_path / "s.png"),
        ],
    )
    assert result.exit_code == 0 and "SAM3's tracker at the same input size (112 px" in " ".join(result.output.split()), result.output
    for args, message in (
        ([], "--point"),
        (["--mask", str(first_mask), "--strip", "0"], "--strip must be at least 1"),
        (["--mask", str(first_mask), "--max-frames", "0"], "--max-frames must be at least 1"),
        (["--mask", str(tmp_path / "none.png")], "not a readable PNG"),
    ):
        result = runner.invoke(
            app, ["predict", "--model", str(tmp_path / "model"), "--video", str(mp4), "--out", str(tmp_path / "x.png"), *args]
        )
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    result = runner.invoke(
        app,
        ["predict", "--model", str(tmp_path / "model"), "--image", str(mp4), "--mask", str(first_mask), "--out", str(tmp_path / "x.png")],
    )
    assert result.exit_code == 2 and "--mask prompts a video's first frame" in result.output


def _demo_mp4(demo_root: Path, tmp_path: Path) -> Path:
    import tarfile

    with tarfile.open(next((demo_root / "sa-v").glob("*.tar"))) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".mp4"))
        path = tmp_path / Path(member.name).name
        path.write_bytes(tar.extractfile(member).read())
    return path
