"""The GPU benchmark script runs end to end on CPU (tiny teacher), so it is known to work before a GPU is lent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_teacher.py"
SMALL = ["--device", "cpu", "--teacher", "tiny-random", "--repeats", "1", "--warmup", "1", "--prompt-images", "2",
         "--prompts", "3", "--video-frames", "2", "--objects", "2"]


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


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
