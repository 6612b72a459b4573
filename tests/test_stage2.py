"""Stage 2 from the store alone: the memory trains on clips, checkpoints, resumes exactly, and refuses wrong inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from esam3.schemas.train import Stage2Config, TrainingInputError
from esam3.train.loop import TrainError
from esam3.train.stage2 import run_stage2

SMALL = dict(
    batch_size=2,
    clip_length=3,
    objects=2,
    loader_workers=0,
    val_percent=0,
    lr=1e-3,
    seed=4,
    global_latents=4,
    perceiver_depth=1,
    memory_layers=1,
    memory_ffn=128,
)


def test_stage2_trains_the_memory_only(sav_store: Path, stage1_run: Path, tmp_path: Path, no_teacher_trunk: None) -> None:
    from esam3.train.stage2 import prepare_stage2

    assert (
        prepare_stage2(
            Stage2Config(store=str(sav_store), out=tmp_path / "x", init=stage1_run, **SMALL)
        ).tracker.heads.tracker_model.memory_attention
        is None
    )
    reports = []
    result = run_stage2(
        Stage2Config(store=str(sav_store), out=tmp_path / "run", init=stage1_run, steps=3, checkpoint_every=2, log_every=1, **SMALL),
        on_step=reports.append,
    )
    assert result.steps == 3 and [r.step for r in reports] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r.terms["total"])) for r in reports)
    assert {"memory_mse", "memory_cosine", "mask_bce", "mask_dice", "score_bce", "gt_mask", "gt_iou", "gt_score"} <= set(result.terms)
    weights = load_file(str(result.checkpoint / "student.safetensors"))
    stage1 = load_file(str(stage1_run / "checkpoints" / "step-00000001" / "student.safetensors"))
    encoder = {k[len("encoder.") :]: v for k, v in weights.items() if k.startswith("encoder.")}
    assert encoder.keys() == stage1.keys() and all(torch.equal(encoder[k], stage1[k]) for k in stage1)  # frozen
    assert any(k.startswith("memory.perceiver.") for k in weights)
    document = json.loads((result.checkpoint / "config.json").read_text())
    assert document["memory"]["window_grid"] == 2 and document["init"]["checkpoint"].endswith("step-00000001")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    assert {"loss/memory_mse", "loss/gt_mask", "loss/total", "train/lr"} <= set(events.Tags()["scalars"])
    assert events.Tags()["images"] == ["masks/frame_teacher_student"]


def test_stage2_resumes_exactly(sav_store: Path, stage1_run: Path, tmp_path: Path) -> None:
    config = dict(store=str(sav_store), init=stage1_run, steps=3, checkpoint_every=1, forcing_until=1.0, **SMALL)
    straight = run_stage2(Stage2Config(out=tmp_path / "straight", **config))

    def stop_after_1(report) -> None:
        if report.step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage2(Stage2Config(out=tmp_path / "resumed", **config), on_step=stop_after_1)
    resumed = run_stage2(Stage2Config(out=tmp_path / "resumed", resume=True, **config))
    a, b = (load_file(str(r.checkpoint / "student.safetensors")) for r in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stage2_refuses_a_wrong_init(sav_store: Path, stage1_run: Path, tmp_path: Path) -> None:
    base = dict(store=str(sav_store), steps=1, **SMALL)
    with pytest.raises(TrainingInputError, match="not a checkpoint"):
        run_stage2(Stage2Config(out=tmp_path / "a", init=tmp_path, **base))
    other = tmp_path / "other-teacher"
    shutil.copytree(stage1_run, other)
    for config in other.glob("checkpoints/step-*/config.json"):
        document = json.loads(config.read_text())
        document["store"]["checksum"] = "0" * 16
        config.write_text(json.dumps(document))
    with pytest.raises(TrainError, match="imitates teacher .* train stage 1 on a store of the same teacher"):
        run_stage2(Stage2Config(out=tmp_path / "b", init=other, **base))
    with pytest.raises(TrainingInputError, match="--window-grid 3 does not divide the memory grid 8"):
        run_stage2(Stage2Config(out=tmp_path / "c", init=stage1_run, **{**base, "window_grid": 3}))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([], "--init: Field required"),
        (["--init", "{init}", "--window-grid", "3"], "--window-grid 3 does not divide the memory grid 8; choose one of [1, 2, 4, 8]"),
        (["--init", "{init}", "--clip-length", "1"], "--clip-length: Input should be greater than or equal to 2"),
        (["--init", "{init}", "--forcing-start", "1.5"], "--forcing-start: Input should be less than or equal to 1"),
        (
            [
                "--init",
                "{init}",
                "--feature-weight",
                "0",
                "--cosine-weight",
                "0",
                "--mask-weight",
                "0",
                "--score-weight",
                "0",
                "--gt-weight",
                "0",
            ],
            "every loss weight is 0",
        ),
        (["--init", "{init}", "--batch-size", "9"], "fewer than one step of 9 x 1"),
        (["--init", "{out}"], "not a checkpoint"),
    ],
)
def test_stage2_flags_are_checked(sav_store: Path, stage1_run: Path, tmp_path: Path, flags: list[str], message: str) -> None:
    from typer.testing import CliRunner

    from esam3.cli import app

    flags = [f.format(init=stage1_run, out=tmp_path) for f in flags]
    result = CliRunner().invoke(
        app, ["train", "stage2", "--store", str(sav_store), "--out", str(tmp_path / "r"), "--val-percent", "0", *flags]
    )
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output


def test_stage2_cli_prints_the_memory_and_trains(sav_store: Path, stage1_run: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from esam3.cli import app

    args = [
        "train",
        "stage2",
        "--store",
        str(sav_store),
        "--out",
        str(tmp_path / "run"),
        "--init",
        str(stage1_run),
        "--steps",
        "1",
        "--val-percent",
        "0",
        "--loader-workers",
        "0",
        "--clip-length",
        "3",
        "--global-latents",
        "8",
        "--memory-ffn",
        "256",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "8 global + 2x2 window latents (4x4 tokens each)" in text and "12 tokens per memory frame (SAM3: 64)" in text
    assert "stage 2: memory" in text and (tmp_path / "run" / "checkpoints" / "latest").is_file()


def test_two_ray_train_workers_take_the_steps_of_one_worker_with_their_joint_batch(
    sav_store: Path, stage1_run: Path, tmp_path: Path
) -> None:
    """--workers 2: each rank tracks its own clip; DDP averages the gradients as one worker averages over its two clips.
    Teacher forcing is always on and every object is tracked, so no rank draws differently from the single worker."""
    from esam3.train.distributed import train

    config = dict(SMALL, store=str(sav_store), init=stage1_run, steps=2, warmup=0.0, forcing_start=1.0, forcing_end=1.0, objects=8)
    one = train(Stage2Config(out=tmp_path / "one", **config))
    alone = train(Stage2Config(out=tmp_path / "alone", **{**config, "batch_size": 1}))
    two = train(Stage2Config(out=tmp_path / "two", **{**config, "batch_size": 1, "workers": 2}))
    assert two.steps == 2 and json.loads((two.checkpoint / "config.json").read_text())["world_size"] == 2

    def distance(run) -> float:
        a, b = (load_file(str(r.checkpoint / "student.safetensors")) for r in (one, run))
        return float(torch.cat([(a[k] - b[k]).abs().flatten() for k in a if k.startswith("memory.")]).mean())

    assert distance(two) < 0.02 * distance(alone)


def test_the_cache_trains_the_memory_as_the_live_teacher_does(sav_store: Path, stage1_run: Path, tmp_path: Path, tiny_teacher) -> None:
    """Fidelity of the memory targets: the same run from the fp16 store and with the tiny teacher tracking every clip's
    video online gives the same losses step by step, within the codec's error."""
    from esam3.train.fidelity import LiveVideoTargets

    config = dict(store=str(sav_store), init=stage1_run, steps=3, forcing_until=1.0, **SMALL)
    cached, live = [], []
    run_stage2(Stage2Config(out=tmp_path / "cached", **config), on_step=cached.append)
    arms, differences = [], []

    def make(clips):
        arms.append(LiveVideoTargets(tiny_teacher, clips))

        def replace(batch):
            out = arms[-1](batch)
            for name in ("pix_feat_with_mem", "maskmem_features"):  # what the live teacher changed: the fp16 codec's error
                scale = float(batch[name].abs().max())
                differences.append(float((out[name] - batch[name]).abs().max()) / scale)
            return out

        return replace

    run_stage2(Stage2Config(out=tmp_path / "live", **config), on_step=live.append, targets=make)
    assert arms[0].frame_forwards >= 3 * 2 * 3  # every clip's video went through the teacher, every step
    assert 0 < max(differences) < 1e-2, differences
    for a, b in zip(cached, live):
        assert abs(a.terms["total"] - b.terms["total"]) <= 1e-3 * abs(b.terms["total"]), (a.step, a.terms, b.terms)
        assert abs(a.terms["memory_mse"] - b.terms["memory_mse"]) <= 1e-2 * b.terms["memory_mse"]


def test_learned_latents_and_embeddings_get_no_weight_decay() -> None:
    from esam3.train.loop import parameter_groups
    from esam3.train.memory import MemorySpec, StudentMemory

    memory = StudentMemory(
        MemorySpec(
            grid=8,
            hidden=128,
            memory_dim=64,
            memory_frames=7,
            max_pointers=16,
            global_latents=4,
            window_grid=2,
            perceiver_depth=1,
            perceiver_heads=1,
            attention_layers=1,
            attention_heads=1,
            attention_ffn=64,
        )
    )
    named = list(memory.named_parameters())
    decay, no_decay = parameter_groups(named, 0.01, frozenset(memory.no_weight_decay()))
    exempt = {id(p) for n, p in named if n in memory.no_weight_decay()}
    assert len(exempt) == 3 and exempt <= {id(p) for p in no_decay["params"]} and not exempt & {id(p) for p in decay["params"]}
