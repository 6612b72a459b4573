"""The command line as a user runs it: help texts, version, demo-data, scan, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from esam3 import __version__
from esam3.cli import app

runner = CliRunner()


def test_version_and_help() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"esam3 {__version__}"
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("demo", "demo-data", "scan"):
        assert name in result.output


def _commands(group, path=()):
    for name, command in group.commands.items():
        yield (*path, name), command
        if hasattr(command, "commands"):
            yield from _commands(command, (*path, name))


def test_every_subcommand_has_help() -> None:
    commands = list(_commands(get_command(app)))
    assert {("teacher",), ("teacher", "export-heads"), ("teacher", "info")} <= {path for path, _ in commands}
    for path, command in commands:
        assert command.help and command.help.strip(), f"{path} has no help text"
        for param in command.params:
            if param.name not in ("help",):
                assert getattr(param, "help", None), f"{path} --{param.name} has no help text"
        assert runner.invoke(app, [*path, "--help"]).exit_code == 0


def test_demo_data_then_scan(tmp_path: Path) -> None:
    args = [
        "demo-data",
        "--out",
        str(tmp_path),
        "--sa1b-shards",
        "2",
        "--images-per-shard",
        "2",
        "--sav-shards",
        "1",
        "--videos-per-shard",
        "1",
        "--image-short-side",
        "128",
        "--video-width",
        "96",
        "--video-height",
        "64",
        "--video-seconds",
        "1",
        "--seed",
        "5",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "sa-1b").iterdir()) == ["sa_000000.tar", "sa_000001.tar"]
    assert json.loads((tmp_path / "demo-data.json").read_text())["seed"] == 5

    result = runner.invoke(app, ["scan", "--dataset", "sa-1b", "--source", str(tmp_path / "sa-1b"), "--shards", "1", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["shards"] == ["sa_000001.tar"] and report["samples"] == 2 and report["failures"] == []

    result = runner.invoke(app, ["scan", "--dataset", "sa-v", "--source", str(tmp_path / "sa-v")])
    assert result.exit_code == 0, result.output
    assert "sa-v at" in result.stdout


def test_scan_reports_failures_with_exit_code_1(tmp_path: Path) -> None:
    assert (
        runner.invoke(
            app,
            [
                "demo-data",
                "--out",
                str(tmp_path),
                "--sav-shards",
                "0",
                "--sa1b-shards",
                "1",
                "--images-per-shard",
                "2",
                "--image-short-side",
                "96",
            ],
        ).exit_code
        == 0
    )
    shard = tmp_path / "sa-1b" / "sa_000000.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    result = runner.invoke(app, ["scan", "--dataset", "sa-1b", "--source", str(tmp_path / "sa-1b"), "--json"])
    assert result.exit_code == 1
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["failures"] and "truncated or corrupt tar" in report["failures"][0]["reason"]
    table = runner.invoke(app, ["scan", "--dataset", "sa-1b", "--source", str(tmp_path / "sa-1b")], env={"COLUMNS": "400"})
    assert table.exit_code == 1 and "truncated or corrupt tar" in table.stdout


def test_failure_text_is_printed_verbatim(tmp_path: Path) -> None:
    """Reasons hold things like [height, width]; rich must not eat them as markup."""
    assert (
        runner.invoke(
            app,
            [
                "demo-data",
                "--out",
                str(tmp_path),
                "--sav-shards",
                "0",
                "--sa1b-shards",
                "1",
                "--images-per-shard",
                "1",
                "--image-short-side",
                "96",
            ],
        ).exit_code
        == 0
    )
    import tarfile

    shard = tmp_path / "sa-1b" / "sa_000000.tar"
    with tarfile.open(shard) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    record = json.loads(members["sa_1.json"])
    record["annotations"][0]["segmentation"]["size"] = [1, 1]
    members["sa_1.json"] = json.dumps(record).encode()
    from esam3.pipeline.demo_data import write_tar

    write_tar(shard, members.items())
    result = runner.invoke(app, ["scan", "--dataset", "sa-1b", "--source", str(tmp_path / "sa-1b")], env={"COLUMNS": "400"})
    assert result.exit_code == 1
    assert "does not match the image's [height, width]" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shards", "5-2"], "reversed range 5-2 (write 2-5)"),
        (["--shards", "-1"], "negative shard"),
        (["--shards", "x"], "cannot read 'x'"),
        (["--shards", "0-3"], "shards 2-3 do not exist at the source (available: 0-1)"),
        (["--shards", "0-999999999"], "shards 2-999999999 do not exist"),
        (["--shards", "1" * 5000], "is not a shard number"),
        (["--shards", "[/]"], "cannot read '[/]'"),
        (["--shards", "[bold]x"], "cannot read '[bold]x'"),
    ],
)
def test_bad_shards_are_one_line_exit_2(demo_root: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["scan", "--dataset", "sa-1b", "--source", str(demo_root / "sa-1b"), *args], terminal_width=100_000)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr  # no progress bar, no traceback
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--images-per-shard", "0"], "--images-per-shard: Input should be greater than or equal to 1"),
        (["--video-width", "101"], "video_width must be even"),
        (["--sa1b-shards", "0", "--sav-shards", "0"], "nothing to write"),
        (["--video-seconds", "-1"], "--video-seconds: Input should be greater than 0"),
        (["--seed", "-3"], "--seed: Input should be greater than or equal to 0"),
        (["--image-short-side", "10"], "--image-short-side"),
    ],
)
def test_bad_demo_flags_name_the_flag(tmp_path: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["demo-data", "--out", str(tmp_path), *args])
    assert result.exit_code == 2
    assert message in result.stderr
    assert not (tmp_path / "sa-1b").exists()


def test_missing_source_and_bad_dataset(tmp_path: Path) -> None:
    result = runner.invoke(app, ["scan", "--dataset", "sa-1b", "--source", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "is not a folder or prefix that exists" in result.stderr
    result = runner.invoke(app, ["scan", "--dataset", "sa-1b", "--source", "foo://bucket/x"])
    assert result.exit_code == 2 and "cannot use source 'foo://bucket/x'" in result.stderr
    result = runner.invoke(app, ["demo", "--out", str(tmp_path), "--seed", "-1"])
    assert result.exit_code == 2 and "--seed: Input should be greater than or equal to 0" in result.stderr
    result = runner.invoke(app, ["scan", "--dataset", "coco", "--source", str(tmp_path)])
    assert result.exit_code == 2


def test_installed_entry_point(demo_root: Path) -> None:
    """The real console script: exit code 2 and a single line on stderr, no traceback."""
    exe = Path(sys.executable).with_name("esam3")
    result = subprocess.run(
        [str(exe), "scan", "--dataset", "sa-1b", "--source", str(demo_root / "sa-1b"), "--shards", "9-1"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["esam3: error: shard spec '9-1': reversed range 9-1 (write 1-9)"]
    assert subprocess.run([str(exe), "--version"], capture_output=True, text=True).stdout.strip() == f"esam3 {__version__}"


def test_demo_command_caches_then_resumes(tmp_path: Path) -> None:
    """`esam3 demo` (the README's main job): full-size demo data once, cached by the tiny teacher on a local Ray
    into a store that verifies, then a student trained, evaluated, exported and used from it; a rerun reuses the
    data, caches nothing new and trains no further."""
    import lance

    result = runner.invoke(app, ["demo", "--out", str(tmp_path)], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "sa-1b at" in result.stdout and "sa-v at" in result.stdout
    assert "│      2 │      16 │" in result.stdout  # 2 SA-1B shards of 8 images
    store = tmp_path / "store"
    assert lance.dataset(str(store / "images.lance")).count_rows() == 16
    frames = lance.dataset(str(store / "frames.lance")).count_rows()
    assert frames > 0 and f"{16 + frames} rows" in result.stdout and "tensors verified" in result.stdout
    from esam3.train.demo import DEMO_STAGE2_STEPS, DEMO_STEPS

    checkpoint = tmp_path / "stage1" / "checkpoints" / f"step-{DEMO_STEPS:08d}"
    video_checkpoint = tmp_path / "stage2" / "checkpoints" / f"step-{DEMO_STAGE2_STEPS:08d}"
    for step, written in (
        ("esam3 train stage1", checkpoint),
        ("esam3 export ", tmp_path / "model"),
        ("esam3 predict ", tmp_path / "predict.png"),
        ("esam3 train stage2", video_checkpoint),
        ("esam3 export (video)", tmp_path / "video-model"),
        ("esam3 predict --video", tmp_path / "predict-video.png"),
    ):
        line = next(line for line in result.stdout.splitlines() if step in line)
        assert str(written) in line and written.exists(), line
    assert "J&F vs GT" in result.stdout and "tokens per memory frame (SAM3: 64)" in result.stdout
    assert f"{DEMO_STEPS} steps of" in result.stdout and "mask mIoU vs the teacher" in result.stdout and "box-prompt mIoU" in result.stdout
    assert (tmp_path / "model" / "model.safetensors").is_file() and (tmp_path / "stage1" / "tensorboard").is_dir()
    stamp = (tmp_path / "data" / "sa-1b" / "sa_000000.tar").stat().st_mtime_ns
    trained = (checkpoint / "student.safetensors").stat().st_mtime_ns
    video_trained = (video_checkpoint / "student.safetensors").stat().st_mtime_ns
    result = runner.invoke(app, ["demo", "--out", str(tmp_path), "--executor", "local"], env={"COLUMNS": "400"})
    assert result.exit_code == 0 and "reusing it" in result.stderr
    assert "0 new, 2 already done" in result.stdout and "0 new, 1 already done" in result.stdout
    assert (tmp_path / "data" / "sa-1b" / "sa_000000.tar").stat().st_mtime_ns == stamp
    assert (checkpoint / "student.safetensors").stat().st_mtime_ns == trained  # resumed at its last step: nothing to train
    assert (video_checkpoint / "student.safetensors").stat().st_mtime_ns == video_trained


def test_verbose_logs_each_bad_sample(tmp_path: Path) -> None:
    assert (
        runner.invoke(
            app,
            [
                "demo-data",
                "--out",
                str(tmp_path),
                "--sav-shards",
                "0",
                "--sa1b-shards",
                "1",
                "--images-per-shard",
                "2",
                "--image-short-side",
                "96",
            ],
        ).exit_code
        == 0
    )
    shard = tmp_path / "sa-1b" / "sa_000000.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    quiet = runner.invoke(app, ["scan", "--dataset", "sa-1b", "--source", str(tmp_path / "sa-1b")])
    loud = runner.invoke(app, ["-v", "scan", "--dataset", "sa-1b", "--source", str(tmp_path / "sa-1b")])
    assert "truncated or corrupt tar" in loud.stderr and "truncated or corrupt tar" not in quiet.stderr
