"""The main job on a Ray cluster: `ray start --head` on 127.0.0.1, then `ray job submit -- esam3 cache ...`."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import lance
import pytest

from esam3.pipeline.store import Store
from esam3.pipeline.store.check import verify_store


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def ray_cluster():
    """A one-node Ray cluster bound to loopback, its dashboard (job server) on a free port; stopped afterwards."""
    # The ray CLI run by this interpreter: the cluster's workers then use it too, and it sees the esam3 install.
    ray_exe = [sys.executable, "-m", "ray.scripts.scripts"]
    bin_dir = Path(sys.executable).parent  # the esam3 entry point; jobs find it on the PATH of `ray start`
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    gcs, dashboard = _free_port(), _free_port()
    temp = tempfile.mkdtemp(prefix="esam3-ray-", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    start = subprocess.run(
        [
            *ray_exe,
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        yield env, f"http://127.0.0.1:{dashboard}", ray_exe
    finally:
        subprocess.run([*ray_exe, "stop", "--force"], capture_output=True, env=env, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_job_submit_runs_the_cache_on_the_cluster(ray_cluster, demo_root: Path, tmp_path: Path) -> None:
    env, dashboard, ray_exe = ray_cluster
    store = tmp_path / "store"
    submit = subprocess.run(
        [
            *ray_exe,
            "job",
            "submit",
            "--address",
            dashboard,
            "--",
            "esam3",
            "cache",
            "--dataset",
            "sa-1b",
            "--source",
            str(demo_root / "sa-1b"),
            "--store",
            str(store),
            "--address",
            "auto",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    report = json.loads(next(line for line in submit.stdout.splitlines()[::-1] if line.startswith("{")))
    assert report["rows"] == 6 and report["shards_committed"] == 2
    assert lance.dataset(str(store / "images.lance")).count_rows() == 6
    assert verify_store(Store(str(store))).ok
