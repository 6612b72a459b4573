"""Shared fixtures: small demo shards in the true SA-1B / SA-V formats, generated once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from esam3.pipeline.demo_data import write_demo_data  # noqa: E402
from esam3.schemas.demo import DemoDataConfig  # noqa: E402


def small_config(out: Path, **overrides) -> DemoDataConfig:
    """Demo data small enough for unit tests (images ~240 px, videos 160x128, 1.5 s)."""
    values = dict(
        out=out,
        seed=7,
        sa1b_shards=2,
        images_per_shard=3,
        sav_shards=1,
        videos_per_shard=2,
        image_short_side=240,
        video_width=160,
        video_height=128,
        video_seconds=1.5,
    )
    values.update(overrides)
    return DemoDataConfig(**values)


def start_lean_ray(**resources: float):
    """A lean in-process Ray for tests (2 CPUs, a small object store, no dashboard), plus logical ``resources``
    (e.g. ``num_gpus=1``: GPUs this machine does not have, which actors and tasks reserve and run on the CPU)."""
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=300 * 2**20,
        logging_level="WARNING",
        log_to_driver=False,
        configure_logging=False,
        **resources,
    )
    return ray


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<root>/sa-1b/sa_00000{0,1}.tar`` (3 images each) and ``<root>/sa-v/sav_000.tar`` (2 videos)."""
    root = tmp_path_factory.mktemp("demo")
    write_demo_data(small_config(root))
    return root


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory):
    """A real SeaweedFS S3 server on loopback for the whole session."""
    from tests.s3_server import s3_server

    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture(scope="session", autouse=True)
def esam3_cache(tmp_path_factory: pytest.TempPathFactory):
    """Random teachers are saved under a per-session cache, not the user's ~/.cache/esam3."""
    root = tmp_path_factory.mktemp("esam3-cache")
    previous = os.environ.get("ESAM3_CACHE")
    os.environ["ESAM3_CACHE"] = str(root)
    yield root
    if previous is None:
        os.environ.pop("ESAM3_CACHE", None)
    else:
        os.environ["ESAM3_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_teacher(esam3_cache: Path):
    """The tiny random teacher, saved and loaded back through the checkpoint path (CPU, fp32, batch 4)."""
    from esam3.schemas.teacher import TeacherConfig
    from esam3.workers.teacher import Sam3Teacher

    return Sam3Teacher.load(TeacherConfig(source="tiny-random", batch_size=4))


@pytest.fixture(scope="session")
def sa1b_store(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo SA-1B shards (6 images) cached by the tiny teacher, fp16, in-process: the trainers' store."""
    from esam3.pipeline.plan import run_cache
    from esam3.schemas.cache import CacheConfig

    root = tmp_path_factory.mktemp("sa1b-store") / "store"
    run_cache(CacheConfig(dataset="sa-1b", source=str(demo_root / "sa-1b"), store=str(root), codec="fp16"), executor="local")
    return root


@pytest.fixture(scope="session")
def sav_store(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo SA-V shard (2 videos of 9 annotated frames, mask prompts) cached by the tiny teacher, fp16: stage 2's store."""
    from esam3.pipeline.plan import run_cache
    from esam3.schemas.cache import CacheConfig

    root = tmp_path_factory.mktemp("sav-store") / "store"
    run_cache(CacheConfig(dataset="sa-v", source=str(demo_root / "sa-v"), store=str(root), codec="fp16"), executor="local")
    return root


@pytest.fixture(scope="session")
def stage1_run(sa1b_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One step of a small stage-1 student (es-ev-s) on the SA-1B store: what stage 2 starts from."""
    from esam3.schemas.train import Stage1Config
    from esam3.train.stage1 import run_stage1

    out = tmp_path_factory.mktemp("stage1") / "run"
    run_stage1(Stage1Config(store=str(sa1b_store), out=out, student="es-ev-s", steps=1, batch_size=2, loader_workers=0, val_percent=0))
    return out


@pytest.fixture
def no_teacher_trunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building SAM3's ViT trunk, its vision model or the teacher, or running SAM3's memory attention, fails: a
    trainer must not need them."""
    from transformers.models.sam3 import modeling_sam3
    from transformers.models.sam3_tracker_video import modeling_sam3_tracker_video

    def refuse(*args, **kwargs):
        raise AssertionError("a trainer built the teacher's trunk or ran its memory attention")

    monkeypatch.setattr(modeling_sam3.Sam3ViTModel, "__init__", refuse)
    monkeypatch.setattr(modeling_sam3.Sam3VisionModel, "__init__", refuse)
    monkeypatch.setattr(modeling_sam3_tracker_video.Sam3TrackerVideoMemoryAttention, "forward", refuse)
    monkeypatch.setattr("esam3.workers.teacher.Sam3Teacher.load", refuse)
