"""The teacher pool on a real Ray cluster that grows mid-run: a node with a GPU joins, and gets a teacher.

The GPUs are Ray's logical resources (this machine has none): the actors reserve them and run the teacher on the
CPU, which is all Ray Data's autoscaling actor pool sees.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from esam3.pipeline.store import Store
from esam3.pipeline.store.check import verify_store
from tests.test_cache_ray import _keys, _teacher_actor_pids, cache_in_background


@pytest.fixture
def one_gpu_cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        connect=True,
        head_node_args={"num_cpus": 2, "num_gpus": 1, "object_store_memory": 300 * 2**20, "include_dashboard": False},
    )
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_a_gpu_that_joins_mid_run_gets_a_teacher(one_gpu_cluster, tmp_path: Path) -> None:
    store = tmp_path / "store"
    thread, done = cache_in_background(tmp_path, shards=8)  # 8 teacher tasks of ~10 s here: time for a second teacher
    joined, most = False, 0
    deadline = time.monotonic() + 240
    while thread.is_alive() and time.monotonic() < deadline:
        teachers = len(_teacher_actor_pids())
        most = max(most, teachers)
        if teachers and not joined:  # the run is going with one teacher: a GPU node joins, with logical CPUs to
            one_gpu_cluster.add_node(num_cpus=6, num_gpus=1)  # spare: read / encode tasks must not take the teacher's
            joined = True
        time.sleep(0.05)
    thread.join(timeout=60)
    assert joined and not thread.is_alive() and "report" in done
    assert most >= 2, "the teacher pool did not grow onto the GPU that joined"
    report = done["report"]
    assert report.rows == 24 and report.shards_committed == 8
    assert _keys(store, "images") == sorted(f"sa1b/{i}" for i in range(1, 25))
    assert verify_store(Store(str(store))).ok
