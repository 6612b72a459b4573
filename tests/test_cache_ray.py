"""The cache job on a real local Ray (loopback, 2 CPUs): the streaming plan, and a teacher actor SIGKILLed mid-run."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import lance
import pytest

from esam3.pipeline.demo_data import write_demo_data
from esam3.pipeline.plan import run_cache
from esam3.pipeline.ray_plan import ray_errors
from esam3.pipeline.store import Store
from esam3.pipeline.store.check import verify_store
from esam3.schemas.cache import CacheConfig, RunError
from esam3.schemas.store import StoreError
from esam3.pipeline.tar_stream import ShardReadError
from tests.conftest import small_config, start_lean_ray


@pytest.fixture(scope="module")
def local_ray():
    ray = start_lean_ray()
    yield ray
    ray.shutdown()


def _keys(store: Path, table: str) -> list[str]:
    return sorted(lance.dataset(str(store / f"{table}.lance")).to_table(columns=["key"]).column("key").to_pylist())


def test_ray_plan_caches_images_and_videos(local_ray, demo_root: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    images = run_cache(CacheConfig(dataset="sa-1b", source=str(demo_root / "sa-1b"), store=str(store)), executor="ray")
    videos = run_cache(CacheConfig(dataset="sa-v", source=str(demo_root / "sa-v"), store=str(store)), executor="ray")
    assert (images.rows, images.shards_committed, videos.rows, videos.shards_committed) == (6, 2, 18, 1)
    local = tmp_path / "local"
    run_cache(CacheConfig(dataset="sa-1b", source=str(demo_root / "sa-1b"), store=str(local)), executor="local")
    assert _keys(store, "images") == _keys(local, "images")
    assert len(set(_keys(store, "frames"))) == 18 and verify_store(Store(str(store))).ok
    # writers bundle teacher blocks (8 images, or 8 frames) into fragments of up to 64 rows of a shard
    assert len(lance.dataset(str(store / "images.lance")).get_fragments()) == 2
    assert len(lance.dataset(str(store / "frames.lance")).get_fragments()) == 1


def _teacher_actor_pids() -> list[int]:
    """Ray titles an actor's process ``ray::MapWorker(MapBatches(TeacherImages))``; find it in /proc (Linux). Only
    this test process's descendants (its Ray's workers): tests running side by side have teachers of their own."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"TeacherImages" in command and _descends_from_me(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def _descends_from_me(pid: int) -> bool:
    me = os.getpid()
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        if pid == me:
            return True
    return False


def cache_in_background(tmp_path: Path, shards: int) -> tuple[threading.Thread, dict[str, object]]:
    """A Ray cache run of ``shards`` demo shards of 3 images (small teacher, batch 1) into ``tmp_path/store``, in a
    thread; the dict gets its ``report``."""
    source = tmp_path / "data"
    write_demo_data(small_config(source, sa1b_shards=shards, images_per_shard=3, sav_shards=0))
    config = CacheConfig(
        dataset="sa-1b", source=str(source / "sa-1b"), store=str(tmp_path / "store"), teacher={"source": "small-random", "batch_size": 1}
    )
    done: dict[str, object] = {}
    thread = threading.Thread(target=lambda: done.update(report=run_cache(config, executor="ray")))
    thread.start()
    return thread, done


def test_sigkilled_teacher_actor_is_replaced_and_every_key_lands_once(local_ray, tmp_path: Path) -> None:
    store = tmp_path / "store"
    thread, done = cache_in_background(tmp_path, shards=6)
    killed = None
    deadline = time.monotonic() + 120
    while thread.is_alive() and time.monotonic() < deadline and killed is None:
        ledger = store / "ledger.lance"
        committed = lance.dataset(str(ledger)).count_rows() if ledger.exists() else 0
        pids = _teacher_actor_pids()
        if committed >= 1 and pids:
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    thread.join(timeout=300)
    assert killed is not None, "the run ended before an actor could be killed mid-run"
    assert not thread.is_alive() and "report" in done
    report = done["report"]
    assert report.rows == 18 and report.shards_committed + report.shards_skipped == 6
    assert _keys(store, "images") == sorted(f"sa1b/{i}" for i in range(1, 19))  # each exactly once
    assert verify_store(Store(str(store))).ok


def test_local_object_store_grows_with_the_machine() -> None:
    from esam3.pipeline.ray_plan import object_store_bytes

    gib = 2**30
    assert object_store_bytes(2 * gib) == int(0.6 * gib)  # a small machine: Ray's own 30% cap
    assert object_store_bytes(24 * gib) == int(2.4 * gib)
    assert object_store_bytes(1024 * gib) == int(102.4 * gib)  # a big GPU box: no constant spilling


def test_teacher_pool_fits_on_nodes() -> None:
    """A CPU teacher actor must fit on one node: one per big node, sized by the smallest of them; a 0-CPU or small
    head gets none."""
    from esam3.pipeline.ray_plan import TeacherPool, teacher_pool

    assert teacher_pool(0, [2]) == TeacherPool(actors=1, per_actor=1, threads=1, side_cpus=0.5, max_actors=1)
    assert teacher_pool(0, [0, 16, 16]) == TeacherPool(actors=2, per_actor=15, threads=15, side_cpus=0.5, max_actors=2)
    assert teacher_pool(0, [8, 16]) == TeacherPool(actors=2, per_actor=7, threads=7, side_cpus=0.5, max_actors=2)
    assert teacher_pool(0, [1]) == TeacherPool(actors=1, per_actor=0.5, threads=1, side_cpus=0.25, max_actors=1)
    assert teacher_pool(0, [2, 64, 64]) == TeacherPool(actors=2, per_actor=63, threads=63, side_cpus=0.5, max_actors=2)  # small head
    assert teacher_pool(0, []) == TeacherPool(actors=1, per_actor=0.5, threads=1, side_cpus=0.25, max_actors=1)
    assert teacher_pool(0, [0, 16, 16], max_teachers=1).actors == 1  # --max-teachers caps a CPU pool too


def test_the_gpu_teacher_pool_grows_with_the_cluster() -> None:
    """GPUs that join mid-run get teachers: an autoscaling pool from the GPUs at the start, up to --max-teachers
    (unbounded by default), with a shard writer for each teacher it may hold."""
    from esam3.pipeline.ray_plan import TeacherPool, teacher_pool

    pool = teacher_pool(4, [0, 32])
    assert pool == TeacherPool(actors=4, per_actor=1, threads=None, side_cpus=0.5, max_actors=None)
    assert (pool.compute.min_size, pool.compute.max_size, pool.writers) == (4, float("inf"), 4)
    bounded = teacher_pool(2, [32, 32], max_teachers=8)
    assert (bounded.compute.min_size, bounded.compute.max_size, bounded.writers) == (2, 8, 8)
    capped = teacher_pool(8, [32], max_teachers=4)
    assert (capped.actors, capped.compute.min_size, capped.compute.max_size, capped.writers) == (4, 4, 4, 4)


def test_a_shard_that_cannot_be_read_in_a_ray_worker_is_left_for_a_rerun(local_ray, demo_root: Path, tmp_path: Path) -> None:
    from tests.test_cache import unreadable_shard

    source = tmp_path / "source"
    shutil.copytree(demo_root / "sa-1b", source)
    unreadable_shard(source, "sa_000000.tar")
    store = tmp_path / "store"
    report = run_cache(CacheConfig(dataset="sa-1b", source=str(source), store=str(store), read_retries=0), executor="ray")
    assert list(report.aborted) == ["sa_000000.tar"] and report.shards_committed == 1 and report.exit_code == 1
    assert len(_keys(store, "images")) == 3 and verify_store(Store(str(store))).ok


@pytest.mark.parametrize(
    ("error", "expected", "message"),
    [
        (StoreError("store s3://b/x: access refused"), StoreError, "^store s3://b/x: access refused$"),
        (ShardReadError("cannot open sa_000001.tar: reset"), ShardReadError, "^cannot open sa_000001.tar: reset$"),
        (ZeroDivisionError("division by zero"), RunError, "a pipeline step failed: ZeroDivisionError: division by zero; rerun"),
    ],
)
@pytest.mark.parametrize("via", ["ray-data", "ray-task"])
def test_errors_in_ray_steps_reach_the_driver_as_one_line(local_ray, error: Exception, expected: type, message: str, via: str) -> None:
    """Ray wraps a step's error in its own types; the driver gives back ours (exit codes hold) or a RunError."""
    import ray

    def step(batch):
        raise error

    with pytest.raises(expected, match=message) as raised:
        with ray_errors():
            if via == "ray-data":  # the original survives only as text
                ray.data.from_items([{"a": 1}]).map_batches(step, batch_format="pyarrow").take_all()
            else:  # the original is RayTaskError.cause
                ray.get(ray.remote(step).remote(None))
    assert "\n" not in str(raised.value) and type(raised.value) is expected


@pytest.mark.parametrize(("root_level", "auth_level"), [(logging.WARNING, logging.ERROR), (logging.INFO, logging.NOTSET)])
def test_rays_token_auth_notice_shows_only_with_verbose(monkeypatch: pytest.MonkeyPatch, root_level: int, auth_level: int) -> None:
    """A local Ray's "Token authentication is enabled" notice is an internal: hidden unless -v (INFO)."""
    import ray

    from esam3.pipeline import ray_plan

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: None)
    root, auth = logging.getLogger(), logging.getLogger("ray._private.authentication")
    before = root.level, auth.level
    root.setLevel(root_level)
    auth.setLevel(logging.NOTSET)
    try:
        assert ray_plan._init_ray(None) is True
        assert auth.level == auth_level
    finally:
        root.setLevel(before[0])
        auth.setLevel(before[1])


@pytest.mark.parametrize("verbose", [False, True])
def test_rays_actor_argument_notice_is_hidden_unless_verbose(verbose: bool) -> None:
    """Ray's C++ core writes its notice to fd 2 (out of logging's reach); a normal run drops just that line."""
    import subprocess
    import sys

    script = f"""
import logging, os, sys
logging.basicConfig(level={logging.INFO if verbose else logging.WARNING})
from esam3.pipeline.stderr_filter import hide_lines
with hide_lines():
    os.write(2, b"[2026-12-07 17:38:11,562 E 1369 1369] core_worker.cc:2465: Actor with class name: 'MapWorker' and ID: 'x' "
                b"has constructor arguments in the object store and max_restarts > 0. If the arguments ...\\n")
    os.write(2, b"progress 1/3\\r")
    print("a line of ours", file=sys.stderr)
print("after", file=sys.stderr)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)  # bytes: \r kept
    said = result.stderr.decode()
    assert result.returncode == 0, said
    assert "progress 1/3\ra line of ours\nafter\n" in said
    assert ("has constructor arguments in the object store" in said) is verbose
