"""Benchmark scripts run end to end here: the GPU benchmark on CPU (tiny teacher), so it is known to work before a
GPU is lent, and the CPU-cost benchmark at full size on a few rows; their flags are checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPT = BENCHMARKS / "gpu_teacher.py"
SMALL = ["--device", "cpu", "--teacher", "tiny-random", "--repeats", "1", "--warmup", "1", "--prompt-images", "2",
         "--prompts", "3", "--video-frames", "2", "--objects", "2"]


def run_script(*args: str, script: Path = SCRIPT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)


def test_gpu_teacher_runs_on_cpu_and_writes_its_json(tmp_path: Path) -> None:
    done = run_script(*SMALL, "--batches", "1,2", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "gpu_teacher.json").read_text())
    assert json.loads(done.stdout.strip().splitlines()[-1]) == result
    assert result["gpu"].startswith("CPU") and result["teacher"] == "tiny-random"
    assert result["parameters"]["trunk"] > 0
    for section in ("trunk_fp32", "trunk_bf16_weights"):
        assert set(result[section]) == {"batch1", "batch2", "to_host_fp16"}
        assert all(result[section][f"batch{b}"]["images_per_s"] > 0 for b in (1, 2))
        assert result[section]["batch1"]["mfu"] is None  # no peak is known for a CPU
    assert result["prompts"]["k"] == 3 and result["prompts"]["prompts_per_s"] > 0
    assert result["video"]["frames"] == 2 and result["video"]["frame_objects_per_s"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batches", "1,x"], "--batches takes comma-separated integers"),
        (["--batches", "0"], "batch sizes must be at least 1"),
        (["--objects", "0"], "--objects must be at least 1"),
        (["--warmup", "-1"], "--warmup must be 0 or more"),
        (["--device", "tpu"], "invalid choice"),
    ],
)
def test_gpu_teacher_rejects_bad_flags(args: list[str], message: str) -> None:
    done = run_script("--device", "cpu", *args)
    assert done.returncode == 2
    assert message in done.stderr


@pytest.mark.parametrize(
    ("args", "unit"),
    [(["--dataset", "sa-1b", "--images", "4", "--prompts", "2"], "image"),
     (["--dataset", "sa-v", "--videos", "1", "--seconds", "0.5", "--objects", "1"], "frame")],
)
def test_cpu_per_row_measures_each_step_at_full_size(tmp_path: Path, args: list[str], unit: str) -> None:
    done = run_script(*args, "--out", str(tmp_path), script=BENCHMARKS / "cpu_per_row.py")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["geometry"] == {"image": 1008, "trunk": [1024, 72, 72], "mask": 288}
    assert result["rows_stored"] == result["units"] > 0 and result["stored_mb"] > 0
    steps = result[f"cpu_ms_per_{unit}"]
    assert all(steps[name] > 0 for name in ("read", "teacher_host", "encode", "write_total")) and steps["write_total"] >= steps["encode"]


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--images", "3"], "--images must be at least 4"), (["--objects", "0"], "--objects must be at least 1"),
     (["--seconds", "0.1"], "--seconds must be within 0.5-60"), (["--dataset", "pcs"], "invalid choice")],
)
def test_cpu_per_row_rejects_bad_flags(args: list[str], message: str) -> None:
    done = run_script(*args, script=BENCHMARKS / "cpu_per_row.py")
    assert done.returncode == 2 and message in done.stderr
