"""Finding and checking teacher checkpoints, and the ``esam3 teacher`` commands as a user runs them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from esam3.cli import app
from esam3.schemas.teacher import TeacherLoadError
from esam3.workers.heads import HEADS_CONFIG, HEADS_WEIGHTS
from esam3.workers.teacher import Sam3Teacher
from esam3.workers.teacher_loading import RANDOM_CONFIG_VERSION, load_checkpoint, load_model, materialize_random

runner = CliRunner()
WIDE = {"COLUMNS": "400"}


@pytest.fixture()
def checkpoint(tiny_teacher: Sam3Teacher, tmp_path: Path) -> Path:
    """A writable copy of the tiny teacher's checkpoint directory."""
    target = tmp_path / "ckpt"
    shutil.copytree(tiny_teacher.card.checkpoint_dir, target)
    return target


def test_random_teacher_is_saved_once_and_loaded_like_a_checkpoint(tiny_teacher: Sam3Teacher, esam3_cache: Path) -> None:
    path = Path(tiny_teacher.card.checkpoint_dir)
    assert path.parent == esam3_cache / "teachers" and path.name == f"tiny-random-v{RANDOM_CONFIG_VERSION}-seed0"
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= {p.name for p in path.iterdir()}
    assert json.loads((path / "config.json").read_text())["model_type"] == "sam3_video"
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert materialize_random("tiny-random", 0) == path and (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "staging folders left behind"


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("missing", "no such directory"),
        ("file", "not a directory"),
        ("no-config", "config.json is missing"),
        ("bad-json", "not valid JSON"),
        ("wrong-type", "model_type is 'sam2_video'"),
        ("bad-config", "not a valid sam3_video config"),
        ("no-weights", "no model.safetensors"),
        ("truncated-weights", "cannot load weights"),
        ("other-architecture", "weights do not match config.json"),
        ("bad-index", "cannot load weights"),
        ("mixed-sizes", "tracker_config.image_size is 56, expected 112"),
    ],
)
def test_bad_checkpoints_give_clear_errors(checkpoint: Path, breakage: str, message: str) -> None:
    config_file = checkpoint / "config.json"
    target = checkpoint
    if breakage == "missing":
        target = checkpoint / "nope"
    elif breakage == "file":
        target = config_file
    elif breakage == "no-config":
        config_file.unlink()
    elif breakage == "bad-json":
        config_file.write_text("{oops")
    elif breakage == "wrong-type":
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "model_type": "sam2_video"}))
    elif breakage == "bad-config":
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "tracker_config": 5}))
    elif breakage == "no-weights":
        (checkpoint / "model.safetensors").unlink()
    elif breakage == "truncated-weights":
        weights = checkpoint / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif breakage == "other-architecture":
        config = json.loads(config_file.read_text())
        config["tracker_config"]["num_maskmem"] = 3
        config_file.write_text(json.dumps(config))
    elif breakage == "bad-index":  # a sharded checkpoint whose index lacks its weight map
        (checkpoint / "model.safetensors").unlink()
        (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    elif breakage == "mixed-sizes":  # same weight shapes, but the tracker would reshape to another grid
        config = json.loads(config_file.read_text())
        config["tracker_config"]["image_size"] = 56
        config_file.write_text(json.dumps(config))
    with pytest.raises(TeacherLoadError, match=message) as error:
        load_checkpoint(target)
    assert str(target) in str(error.value)
    result = runner.invoke(app, ["teacher", "info", "--teacher", str(target)], env=WIDE)
    assert result.exit_code == 2 and message.split("'")[0] in result.output and "Traceback" not in result.output


def test_unknown_random_teacher_name_is_a_path(tmp_path: Path) -> None:
    with pytest.raises(TeacherLoadError, match="tiny-random, small-random, full-random"):
        load_model("tiny-randm")


def test_export_heads_command(tiny_teacher: Sam3Teacher, tmp_path: Path) -> None:
    out = tmp_path / "heads"
    result = runner.invoke(app, ["teacher", "export-heads", "--teacher", "tiny-random", "--out", str(out)], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "full teacher" in result.output and "heads (with detector)" in result.output
    assert tiny_teacher.card.checksum in result.output
    assert (out / HEADS_WEIGHTS).is_file() and (out / HEADS_CONFIG).is_file()
    result = runner.invoke(
        app, ["teacher", "export-heads", "--teacher", "tiny-random", "--out", str(out), "--no-detector", "--json"], env=WIDE
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["detector"] is False and payload["teacher"]["checksum"] == tiny_teacher.card.checksum
    assert payload["heads_parameters"] == tiny_teacher.card.parameters["tracker_heads"]
    assert payload["heads_bytes"] == (out / HEADS_WEIGHTS).stat().st_size < payload["teacher_bytes"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seed", "-1"], "--seed"),
        (["--teacher", ""], "--teacher"),
        (["--out", "FILE"], "exists and is not a folder"),
    ],
)
def test_export_heads_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    values = {"--teacher": "tiny-random", "--out": str(tmp_path / "out")}
    for flag, value in zip(args[::2], args[1::2]):
        values[flag] = str(afile) if value == "FILE" else value
    result = runner.invoke(app, ["teacher", "export-heads", *[x for kv in values.items() for x in kv]], env=WIDE)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_info_command(tiny_teacher: Sam3Teacher) -> None:
    result = runner.invoke(app, ["teacher", "info", "--teacher", "tiny-random", "--json"], env=WIDE)
    assert result.exit_code == 0, result.output
    card = json.loads(result.output)
    assert card["checksum"] == tiny_teacher.card.checksum and card["geometry"]["image_size"] == 112
    assert card["parameters"]["total"] == sum(p.numel() for p in tiny_teacher.model.parameters())
    result = runner.invoke(app, ["teacher", "info", "--teacher", "tiny-random"], env=WIDE)
    assert result.exit_code == 0 and "mask size" in result.output and tiny_teacher.card.checksum in result.output


def test_full_size_geometry_is_read_from_sam3s_default_config() -> None:
    """The facts SAM3 is known by (1008 px, 72x72 tokens of 1024, 288x288 masks, 64-channel memory) come from
    the config, not from constants: the full-random config is transformers' default Sam3VideoConfig."""
    from esam3.workers.heads import Geometry
    from esam3.workers.teacher_loading import random_config

    geometry = Geometry.from_config(random_config("full-random"))
    assert geometry == Geometry(
        image_size=1008,
        patch_size=14,
        grid=72,
        trunk_width=1024,
        hidden=256,
        mask_size=288,
        memory_channels=64,
        neck_sizes=(288, 144, 72),
    )


def test_bf16_checkpoint_loads_in_fp32(tiny_teacher: Sam3Teacher, tmp_path: Path, demo_root: Path) -> None:
    """A checkpoint stored in bf16 runs like any other (precision is the runner's choice, not the file's)."""
    import copy

    import torch

    from esam3.pipeline.sources import SAVSource
    from esam3.schemas.teacher import TeacherConfig, VideoTargetConfig

    bf16_dir = tmp_path / "bf16"
    copy.deepcopy(tiny_teacher.model).to(torch.bfloat16).save_pretrained(bf16_dir)  # never touch the shared one
    model = load_checkpoint(bf16_dir)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    teacher = Sam3Teacher(model, TeacherConfig(source=str(bf16_dir)), str(bf16_dir))
    assert teacher.card.precision == "fp32"
    assert teacher.card.checksum != tiny_teacher.card.checksum  # the weights were rounded to bf16
    video = next(iter(SAVSource(str(demo_root / "sa-v")).iter_samples("0")))
    frames = list(teacher.video_targets(video, VideoTargetConfig(max_objects=2, max_frames=3)))
    assert frames[-1].maskmem_features.dtype == torch.float32 and frames[-1].object_ids
