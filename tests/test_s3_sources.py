"""Sources and `esam3 scan` against a real S3 server (SeaweedFS on 127.0.0.1), not a mock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest

from esam3.pipeline.shards import DatasetName, list_shards
from esam3.pipeline.sources import SA1BSource, SAVSource
from esam3.schemas.samples import Failure


@pytest.fixture(scope="module")
def bucket(s3, demo_root: Path) -> str:
    fs = fsspec.filesystem("s3", **s3.storage_options)
    fs.mkdir("shards")
    for path in sorted(demo_root.rglob("*.tar")):
        fs.put_file(str(path), f"shards/{path.parent.name}/{path.name}")
    # A truncated copy of shard 1 as shard 7, to see a failure over S3.
    data = (demo_root / "sa-1b" / "sa_000001.tar").read_bytes()
    fs.pipe_file("shards/sa-1b/sa_000007.tar", data[: len(data) // 2])
    return "s3://shards"


def test_sources_stream_from_s3(s3, bucket: str, demo_root: Path) -> None:
    refs = list_shards(f"{bucket}/sa-1b", DatasetName.SA1B, s3.storage_options)
    assert [(r.shard_id, r.url) for r in refs] == [
        (0, "s3://shards/sa-1b/sa_000000.tar"),
        (1, "s3://shards/sa-1b/sa_000001.tar"),
        (7, "s3://shards/sa-1b/sa_000007.tar"),
    ]
    remote = list(SA1BSource(f"{bucket}/sa-1b", s3.storage_options).iter_samples("0-1"))
    local = list(SA1BSource(str(demo_root / "sa-1b")).iter_samples("0-1"))
    assert [(s.key, s.jpeg, s.record) for s in remote] == [(s.key, s.jpeg, s.record) for s in local]
    broken = list(SA1BSource(f"{bucket}/sa-1b", s3.storage_options).iter_samples("7"))
    assert isinstance(broken[-1], Failure) and "truncated or corrupt tar" in broken[-1].reason
    videos = list(SAVSource(f"{bucket}/sa-v", s3.storage_options).iter_samples("all"))
    assert [v.key for v in videos] == ["sav/sav_000001", "sav/sav_000002"]


def test_cli_scan_over_s3_with_aws_environment(s3, bucket: str) -> None:
    """A user's way in: the standard AWS variables (endpoint included), no extra flags."""
    exe = Path(sys.executable).with_name("esam3")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | s3.env
    result = subprocess.run(
        [str(exe), "scan", "--dataset", "sa-1b", "--source", f"{bucket}/sa-1b", "--shards", "0,1", "--json"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["samples"] == 6 and report["shards"] == ["sa_000000.tar", "sa_000001.tar"]
    missing = subprocess.run(
        [str(exe), "scan", "--dataset", "sa-1b", "--source", f"{bucket}/sa-1b", "--shards", "2"], capture_output=True, text=True, env=env
    )
    assert missing.returncode == 2 and "shards 2 do not exist at the source (available: 0-1,7)" in missing.stderr


def test_scan_and_plan_take_an_s3_endpoint_flag(s3, bucket: str) -> None:
    """Credentials from the environment, the endpoint as a flag (no AWS_ENDPOINT_URL)."""
    exe = Path(sys.executable).with_name("esam3")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | {k: v for k, v in s3.env.items() if k != "AWS_ENDPOINT_URL"}
    result = subprocess.run(
        [str(exe), "scan", "--dataset", "sa-1b", "--source", f"{bucket}/sa-1b", "--shards", "0", "--s3-endpoint", s3.endpoint, "--json"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["samples"] == 3
    plan = subprocess.run(
        [str(exe), "plan", "--dataset", "sa-1b", "--shards", "all", "--source", f"{bucket}/sa-1b", "--s3-endpoint", s3.endpoint, "--json"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["shards"] == 3
    bad = subprocess.run(
        [str(exe), "scan", "--dataset", "sa-1b", "--source", f"{bucket}/sa-1b", "--s3-endpoint", "nope"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode == 2 and "--s3-endpoint" in bad.stderr
