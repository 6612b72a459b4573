"""What a cache run says before it loads its teacher (SAM3: about a minute on a CPU): a store it cannot write or
reach, or settings other than the store's, are errors at once; a rerun of a finished run loads no teacher at all
(the card is remembered for the weight files), and a changed weight file is loaded again."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from esam3.cli import app
from esam3.pipeline.plan import run_cache
from esam3.schemas.cache import CacheConfig
from esam3.schemas.store import StoreError
from esam3.workers import teacher as teacher_module
from esam3.workers.teacher_loading import materialize_random


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every teacher load of the driver (or the test fails if ``refuse`` is set)."""
    seen: list[str] = []
    original = teacher_module.Sam3Teacher.load.__func__

    def counted(cls, config):
        seen.append(config.source)
        if "refuse" in seen:
            raise AssertionError("the teacher was loaded")
        return original(cls, config)

    monkeypatch.setattr(teacher_module.Sam3Teacher, "load", classmethod(counted))
    return seen


def _config(demo_root: Path, store: Path | str, **overrides) -> CacheConfig:
    values = {"dataset": "sa-1b", "source": str(demo_root / "sa-1b"), "store": str(store), "codec": "fp16"}
    return CacheConfig(**{**values, **overrides})


def test_a_finished_run_is_rerun_without_loading_the_teacher(demo_root: Path, sa1b_store: Path, loads: list[str]) -> None:
    loads.append("refuse")
    report = run_cache(_config(demo_root, sa1b_store), executor="local")
    assert report.nothing_to_do and report.shards_skipped == 2


def test_settings_other_than_the_store_s_are_refused_before_the_teacher_loads(demo_root: Path, sa1b_store: Path, loads: list[str]) -> None:
    loads.append("refuse")
    with pytest.raises(StoreError, match=r"other settings \(codec differ\)"):
        run_cache(_config(demo_root, sa1b_store, codec="int8"), executor="local")


def test_a_store_that_is_a_file_or_unreachable_is_an_error_before_the_teacher_loads(
    demo_root: Path, tmp_path: Path, loads: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    loads.append("refuse")
    a_file = tmp_path / "store.tar"
    a_file.write_bytes(b"not a store")
    result = CliRunner().invoke(
        app, ["cache", "--dataset", "sa-1b", "--source", str(demo_root / "sa-1b"), "--store", str(a_file), "--executor", "local"]
    )
    assert result.exit_code == 2 and "is a file, not a folder: give --store a new folder" in result.output, result.output
    assert "S3" not in result.output and "AWS" not in result.output, "a local path gets no S3 advice"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(StoreError, match=r"store s3://bucket/store: .*check the endpoint \(--s3-endpoint"):
        run_cache(_config(demo_root, "s3://bucket/store", s3_endpoint="http://127.0.0.1:9"), executor="local")


def test_the_card_is_remembered_per_weight_file_identity(demo_root: Path, tmp_path: Path, loads: list[str]) -> None:
    checkpoint = tmp_path / "teacher"
    shutil.copytree(materialize_random("tiny-random", 0), checkpoint)
    teacher = {"source": str(checkpoint)}
    run_cache(_config(demo_root, tmp_path / "store", shards="1", teacher=teacher), executor="local")
    assert loads == [str(checkpoint)] * 2, "the driver (card, heads) and the in-process teacher step"
    run_cache(_config(demo_root, tmp_path / "store", shards="1", teacher=teacher), executor="local")
    assert len(loads) == 2, "the rerun used the remembered card"
    weights = checkpoint / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # touched: maybe replaced
    report = run_cache(_config(demo_root, tmp_path / "store", shards="1", teacher=teacher), executor="local")
    assert len(loads) == 3 and report.nothing_to_do, "loaded again, same checksum: nothing to do"


def test_a_refusal_during_the_run_is_not_rerun_advice(demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection: a write refused mid-run (a permission changed under the run) exits 2 with what to fix, where
    a storage outage exits 1 saying to rerun, also when it is botocore's own error (s3fs passes it on untranslated)."""
    from botocore.exceptions import EndpointConnectionError

    import esam3.pipeline.plan as plan

    args = ["cache", "--dataset", "sa-1b", "--source", str(demo_root / "sa-1b"), "--store", str(tmp_path / "store"), "--executor", "local"]

    for error, code, said in (
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1/flaky?delete"), 1, "rerun the same command to resume"),
        (PermissionError(13, "Permission denied"), 2, "check that this user may write to the --store folder"),
        (ConnectionResetError("connection reset by peer"), 1, "rerun the same command to resume"),
    ):

        def failing(*_args, error=error, **_kwargs):
            raise error

        monkeypatch.setattr(plan, "run_cache", failing)
        result = CliRunner().invoke(app, args)
        assert result.exit_code == code and said in result.output, result.output
        assert "AWS" not in result.output and "Traceback" not in result.output


def test_max_frames_beyond_the_video_memory_bound_is_refused_at_the_start(
    demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from esam3.pipeline import sources

    monkeypatch.setattr(sources, "MAX_VIDEO_BYTES", 10 * 3 * 112 * 112)  # ten teacher frames of the tiny teacher
    result = CliRunner().invoke(
        app,
        [
            "cache",
            "--dataset",
            "sa-v",
            "--source",
            str(demo_root / "sa-v"),
            "--store",
            str(tmp_path / "s"),
            "--executor",
            "local",
            "--max-frames",
            "11",
        ],
    )
    assert result.exit_code == 2 and "--max-frames 11: as many teacher frames of 112x112 hold" in result.output, result.output
    assert "at most 10 fit" in result.output and not (tmp_path / "s" / "frames.lance").exists()


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--executor", "nope"], "--executor: expected ray or local"),
        (["--max-failures", "5x"], "--max-failures"),
        (["--dataset-from-sav"], "holds sa-v shards (sav_000.tar, ...), not sa-1b ones: pass --dataset sa-v"),
    ],
)
def test_usage_errors_come_before_the_heavy_imports(demo_root: Path, tmp_path: Path, args: list[str], said: str) -> None:
    """Flags and the source are checked before torch, Lance or Ray are imported (seconds on a cold start)."""
    import json
    import subprocess
    import sys

    source = demo_root / ("sa-v" if args == ["--dataset-from-sav"] else "sa-1b")
    argv = ["cache", "--dataset", "sa-1b", "--source", str(source), "--store", str(tmp_path / "s")]
    argv += [] if args == ["--dataset-from-sav"] else args
    script = f"""
import json, sys
from typer.testing import CliRunner
from esam3.cli import app
result = CliRunner().invoke(app, {argv!r}, env={{"COLUMNS": "300"}})
print(json.dumps([result.exit_code, result.output, sorted(m for m in ("torch", "lance", "ray", "transformers") if m in sys.modules)]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    code, output, heavy = json.loads(done.stdout.strip().splitlines()[-1])
    assert code == 2 and said in output and heavy == [], (output, heavy)
