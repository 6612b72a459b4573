"""Benchmark scripts run end to end here: the GPU benchmark on CPU (tiny teacher), so it is known to work before a
GPU is lent, and the CPU-cost benchmark at full size on a few rows; their flags are checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPT = BENCHMARKS / "gpu_teacher.py"
SMALL = [
    "--device",
    "cpu",
    "--teacher",
    "tiny-random",
    "--repeats",
    "1",
    "--warmup",
    "1",
    "--prompt-images",
    "2",
    "--prompts",
    "3",
    "--video-frames",
    "2",
    "--objects",
    "2",
]


def run_script(*args: str, script: Path = SCRIPT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)


def load_benchmark(name: str):
    """A benchmark script as a module (its imports are the suite's own, so this costs no new interpreter)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rejected(name: str, args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> str:
    """Run a benchmark's ``main`` in this process with bad flags: it must exit 2 before doing anything; its stderr."""
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *args])
    with pytest.raises(SystemExit) as exit_info:
        load_benchmark(name).main()
    assert exit_info.value.code == 2
    return capsys.readouterr().err


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
    host = result["host_targets"]
    assert host["codec"] == "int8" and host["quantised_mb_per_image"] < host["float32_mb_per_image"] / 3
    assert 0 < host["trunk_error"] < 0.02 and 0 <= host["logits_error"] < 0.02 and host["quantised_ms_per_image"] > 0
    actor = result["actor"]
    assert actor["images_per_s"] > 0 and actor["block_mb_per_image"] > 0 and 0 < actor["codec_mask_iou"] <= 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batches", "1,x"], "--batches takes comma-separated integers"),
        (["--batches", "0"], "batch sizes must be at least 1"),
        (["--objects", "0"], "--objects must be at least 1"),
        (["--warmup", "-1"], "--warmup must be 0 or more"),
        (["--device", "tpu"], "invalid choice"),
        (["--codec", "lowrank"], "invalid choice"),
    ],
)
def test_gpu_teacher_rejects_bad_flags(
    args: list[str], message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    assert message in rejected("gpu_teacher", ["--device", "cpu", *args], monkeypatch, capsys)


@pytest.mark.parametrize(
    ("args", "unit"),
    [
        (["--dataset", "sa-1b", "--images", "4", "--prompts", "2"], "image"),
        (["--dataset", "sa-v", "--videos", "1", "--seconds", "0.5", "--objects", "1"], "frame"),
    ],
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
    [
        (["--images", "3"], "--images must be at least 4"),
        (["--objects", "0"], "--objects must be at least 1"),
        (["--seconds", "0.1"], "--seconds must be within 0.5-60"),
        (["--dataset", "pcs"], "invalid choice"),
    ],
)
def test_cpu_per_row_rejects_bad_flags(
    args: list[str], message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    assert message in rejected("cpu_per_row", args, monkeypatch, capsys)


def test_store_scale_grows_a_store_and_reports_each_checkpoint(tmp_path: Path) -> None:
    done = run_script(
        "--shards", "12", "--rows", "50", "--fragment-rows", "16", "--out", str(tmp_path), script=BENCHMARKS / "store_scale.py"
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    points = result["checkpoints"]
    assert [p["shards"] for p in points] == [1, 10, 12] and [p["snapshot_rows"] for p in points] == [50, 500, 600]
    assert points[-1]["fragments"] == 12 * 4 and all(p["manifest_bytes"] > 0 and p["commit_s"] > 0 for p in points)
    assert points[-1]["manifest_bytes"] > points[0]["manifest_bytes"]


def test_fast_decode_measures_cpu_and_feature_error() -> None:
    done = run_script("--images", "1", "--teacher", "tiny-random", "--short-side", "300", script=BENCHMARKS / "fast_decode.py")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    tiny = result["S=112"]
    assert tiny["decoded_at"][0] < 300 and tiny["mean_abs_grey_levels"] > 0 and tiny["trunk_rel_rms_mean"] > 0
    assert result["S=1008"]["cpu_ms_exact"] > 0 and "trunk_rel_rms_mean" not in result["S=1008"]


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("store_scale.py", ["--shards", "1"], "--shards must be at least 2"),
        ("store_scale.py", ["--fragment-rows", "-1"], "--fragment-rows must be at least 0"),
        ("fast_decode.py", ["--images", "0"], "--images must be at least 1"),
        ("fast_decode.py", ["--teacher", "full-random"], "invalid choice"),
    ],
)
def test_new_benchmarks_reject_bad_flags(
    script: str, args: list[str], message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    assert message in rejected(script.removesuffix(".py"), args, monkeypatch, capsys)


def test_train_reader_runs_every_loader_at_full_size() -> None:
    done = run_script(
        "--rows", "4", "--batch", "2", "--workers", "1", "--passes", "1", "--prompts", "2", "--no-s3", script=BENCHMARKS / "train_reader.py"
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rows"] == 4 and result["mb_per_row_store"] > 5  # int8 trunk 5.3 MB + JPEG + prompt targets
    for name in (
        "esam3_input_trunk_codes",
        "esam3_input_trunk_float",
        "esam3_input_trunk_prompts",
        "public_recipe",
        "fixed_record_threads",
    ):
        for temperature in ("cold", "warm"):
            entry = result[f"local_{temperature}_{name}"]
            assert entry["rows_per_s"] > 0 and len(entry["worker_rss_mb_end"]) == 1, (name, entry)
    assert result["warm_esam3_vs_public"] > 0


def test_train_reader_rejects_bad_flags(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    assert "--workers must be at least 1" in rejected("train_reader", ["--workers", "0"], monkeypatch, capsys)
    assert "--rss-epochs must be at least 0" in rejected("train_reader", ["--rss-epochs", "-1"], monkeypatch, capsys)


def test_train_reader_tracks_worker_memory_per_epoch() -> None:
    done = run_script(
        "--rows", "4", "--batch", "2", "--workers", "1", "--prompts", "2", "--rss-epochs", "2", script=BENCHMARKS / "train_reader.py"
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rows_read"] == 8 and len(result["worker_rss_mb_per_epoch"]) == 2 and result["worker_rss_mb_per_epoch"][0][0] > 100


def test_codecs_measures_massive_tokens_and_a_basis_fitted_across_shards() -> None:
    done = run_script(
        "--rows",
        "8",
        "--shards",
        "2",
        "--fit-rows",
        "4",
        "--rank",
        "8",
        "--channels",
        "32",
        "--side",
        "8",
        "--massive-tokens",
        "2",
        "--prompts",
        "2",
        "--mask-size",
        "64",
        script=BENCHMARKS / "codecs.py",
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["shape"] == [32, 8, 8] and result["rows_measured"] == 4
    logits = result["logit8d"]  # SAM-like logits: flat regions and ramps compress, the masks survive
    assert logits["int8_mb_per_image"] == round(2 * 4 * 64 * 64 / 1e6, 3) and logits["mb_per_image"] < logits["int8_mb_per_image"] / 2
    assert logits["mask_iou_min"] > 0.98 and 0 < logits["rel_rms_error"] < 0.02 and logits["mb_per_image"] < logits["logit8_mb_per_image"]
    sizes = logits["chosen_by_size"]  # what --mask-outputs chosen stores at --mask-size 64, 32, 16
    assert (
        list(sizes) == ["64", "32", "16"]
        and sizes["16"]["mb_per_image"] < sizes["32"]["mb_per_image"] < sizes["64"]["mb_per_image"] < logits["mb_per_image"]
    )
    assert sizes["64"]["mask_iou_mean"] > 0.98 and sizes["16"]["mask_iou_mean"] < sizes["64"]["mask_iou_mean"]
    int8 = result["int8"]
    # the massive tokens inflate the int8 scales of their channels: the other tokens' error grows
    assert int8["with_massive_tokens"]["rel_rms_error_other_tokens"] > int8["rel_rms_error_mean"] > 0
    assert result["lowrank"]["fitted_on_one_shard"]["rel_rms_error_mean_other_shards"] > 0
    budget = result["budget"]  # the low-rank candidates of --codec auto on a 32-channel trunk: 2, 4, 6, 8, 12, 16
    errors = [v["rel_rms_error_mean"] for v in budget["lowrank"].values()]
    assert list(budget["lowrank"]) == ["2", "4", "6", "8", "12", "16"] and errors == sorted(errors, reverse=True)
    within = [int(r) for r, v in budget["lowrank"].items() if v["rel_rms_error_mean"] <= 0.05]
    assert budget["smallest_within_rms"] == (min(within) if within else None)
    if within:
        assert budget["row_mb_targets_only"] < budget["row_mb_with_inputs"]
    bad = run_script("--rows", "8", "--fit-rows", "4", "--shards", "5", script=BENCHMARKS / "codecs.py")
    assert bad.returncode == 2 and "--shards must be between 1 and --fit-rows" in bad.stderr
    bad = run_script("--mask-size", "65", script=BENCHMARKS / "codecs.py")
    assert bad.returncode == 2 and "--mask-size must be an even number" in bad.stderr


def test_fidelity_the_cache_trains_the_student_the_live_teacher_trains(tmp_path: Path) -> None:
    """benchmarks/fidelity.py at its smallest: per-step losses from an fp16 store equal the live teacher's within
    1e-3 (relative), an int8 store's student scores the live-teacher student's mIoU within 0.02, and a student
    trains from the compact store (low-rank trunk, masks at half size), evaluated on the fp16 store's rows."""
    done = run_script(
        "--teacher",
        "tiny-random",
        "--steps",
        "4",
        "--images",
        "8",
        "--codecs",
        "int8,compact",
        "--rank",
        "16",
        "--out",
        str(tmp_path),
        script=BENCHMARKS / "fidelity.py",
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    fp16, int8 = result["codecs"]["fp16"], result["codecs"]["int8"]
    assert fp16["loss_relative_difference"]["first_step"] < 1e-4 and fp16["loss_relative_difference"]["max"] < 1e-3
    assert len(fp16["loss"]["cached"]) == len(fp16["loss"]["live"]) == 4 and max(fp16["term_max_absolute_difference"].values()) < 0.05
    for codec in (fp16, int8):
        assert abs(codec["miou_vs_teacher"]["cached"] - codec["miou_vs_teacher"]["live"]) < 0.02
        assert codec["teacher_trunk_forwards"] == {"cache_once": 8, "online_per_epoch": 4.0}  # 6 train rows: 1 batch of 4 per epoch
        assert codec["seconds"]["train_online"] > 0 and 0 < codec["seconds"]["online_teacher_share"] < 1
    compact = result["codecs"]["compact"]
    assert len(compact["loss"]["cached"]) == 4 and all(np.isfinite(compact["loss"]["cached"]))
    assert 0 <= compact["miou_vs_teacher"]["cached"] <= 1 and -1 <= compact["feature_cosine"]["cached"] <= 1
    assert compact["store_mb_per_image"] < int8["store_mb_per_image"] < fp16["store_mb_per_image"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--codecs", "fp8"], "--codecs: expected"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--images", "4"], "--images must be at least 8"),
        (["--val-percent", "100"], "--val-percent must be in"),
    ],
)
def test_fidelity_rejects_bad_flags(args: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_benchmark("fidelity").parse_args(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_train_step_times_students_with_and_without_prompts(capsys: pytest.CaptureFixture) -> None:
    load_benchmark("train_step").main(
        ["--teacher", "tiny-random", "--students", "es-ev-s,es-tv-s", "--warmup", "0", "--repeats", "1", "--prompts", "4"]
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["image_size"] == 112 and result["mask_size"] == 32 and set(result["students"]) == {"es-ev-s", "es-tv-s"}
    for student in result["students"].values():
        assert student["rows_per_s"] > 0 and student["features_only_rows_per_s"] > 0
    assert result["students"]["es-ev-s"]["backbone_parameters_m"] == 0.68


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--students", "es-xx-m"], "--students: expected names from"),
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--teacher", "sam9"], "invalid choice"),
    ],
)
def test_train_step_rejects_bad_flags(args: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_benchmark("train_step").parse_args(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_gpu_train_runs_on_cpu_from_a_store_it_makes(capsys: pytest.CaptureFixture) -> None:
    """benchmarks/gpu_train.py with --device cpu at the tiny geometry: the store, the heads file and the loop work."""
    load_benchmark("gpu_train").main(
        [
            "--device",
            "cpu",
            "--teacher",
            "tiny-random",
            "--students",
            "es-ev-s",
            "--rows",
            "6",
            "--steps",
            "3",
            "--batch",
            "2",
            "--prompts",
            "4",
            "--loader-workers",
            "1",
        ]
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["device"] == "CPU" and result["rows"] == 6
    student = result["students"]["es-ev-s"]
    assert student["rows_per_s"] > 0 and 0 <= student["data_wait_share"] < 1 and student["final_loss"] > 0


def test_video_student_times_both_trackers_part_by_part(capsys: pytest.CaptureFixture) -> None:
    """benchmarks/video_student.py at the tiny geometry: every part of both trackers is timed and counted."""
    load_benchmark("video_student").main(["--teacher", "tiny-random", "--students", "es-ev-s", "--repeats", "1"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    sam3, student = result["sam3"], result["students"]["es-ev-s"]
    assert set(sam3["parts_ms"]) == {"trunk", "neck", "memory_attention", "mask_decoder", "memory_encoder"}
    assert set(student["parts_ms"]) == {"encoder", "neck", "memory_attention", "perceiver", "mask_decoder", "memory_encoder"}
    assert sam3["frame_ms"] == pytest.approx(sum(sam3["parts_ms"].values())) and all(v > 0 for v in student["parts_ms"].values())
    assert sam3["memory_tokens_per_frame"] == 64 and student["memory_tokens_per_frame"] == 256 + 4  # the defaults suit SAM3's 72 x 72
    assert student["memory_parameters_m"] > 0 and sam3["trunk_parameters_m"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--students", "es-xx-m"], "--students: expected names from"),
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--trunk-repeats", "0"], "--trunk-repeats must be at least 1"),
    ],
)
def test_video_student_rejects_bad_flags(args: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_benchmark("video_student").parse_args(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--codecs", "lowrank"], "--codecs: expected a comma-separated list of fp16, bf16, int8"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--clip-length", "1"], "--clip-length must be at least 2"),
        (["--stage1-steps", "0"], "--stage1-steps must be at least 1"),
        (["--student", "es-xx-m"], "invalid choice"),
    ],
)
def test_fidelity_memory_rejects_bad_flags(args: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    """benchmarks/fidelity_memory.py (its mechanics run in tests/test_stage2.py at the tiny size): flags checked."""
    with pytest.raises(SystemExit) as exit_info:
        load_benchmark("fidelity_memory").parse_args(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
