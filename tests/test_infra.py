"""infra/: the Dockerfile, the Ray cluster config and the KubeRay RayJob agree with the package and each other."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import yaml
from typer.main import get_command

from esam3.cli import app
from esam3.schemas.cache import CacheConfig
from esam3.schemas.teacher import TeacherConfig

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"


def _ray_version_ok(version: str) -> bool:
    """pyproject pins ray[...] >=2.50,<2.61."""
    major, minor = (int(v) for v in version.split(".")[:2])
    return major == 2 and 50 <= minor < 61


def _entrypoint_is_a_valid_cache_command(entrypoint: str) -> dict[str, str]:
    words = shlex.split(entrypoint)
    assert words[:2] == ["esam3", "cache"], words
    flags = {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            flags[word] = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else ""
    # Every flag is one the command has, and the values make a valid run config (nothing runs).
    known = {opt for param in get_command(app).commands["cache"].params for opt in getattr(param, "opts", [])}
    assert set(flags) <= known, set(flags) - known
    CacheConfig(
        dataset=flags["--dataset"],
        source=flags["--source"],
        store=flags["--store"],
        shards=flags.get("--shards", "all"),
        teacher=TeacherConfig(source=flags["--teacher"]),
        codec=flags.get("--codec", "fp16"),
        address=flags.get("--address"),
    )
    return flags


def test_dockerfile_installs_the_package_with_the_pinned_torch() -> None:
    text = (INFRA / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE=(\S+)$", text, re.M).group(1)
    assert base.startswith("rayproject/ray:") and _ray_version_ok(base.split(":")[1].split("-")[0])
    env_pins = re.search(r"TORCH_PINS=\(([^)]*)\)", (ROOT / "scripts" / "env.sh").read_text()).group(1).replace('"', "").split()
    for pin in env_pins:
        assert pin in text, f"{pin} (scripts/env.sh) missing from the Dockerfile"
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    for folder in package_dirs:
        assert re.search(rf"^COPY --chown=ray:users {folder} \./{folder}$", text, re.M), f"the image misses {folder}/"
    assert "pip install --no-cache-dir -c /tmp/torch-pins.txt ." in text and "esam3 --version" in text
    assert not re.search(r"AWS_(SECRET|ACCESS)", text), "no credentials in the image"


def test_ray_cluster_config() -> None:
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    config = yaml.safe_load((INFRA / "ray-cluster.yaml").read_text())
    validate_config(fillout_defaults(dict(config)))  # Ray's own schema check of a cluster-launcher config
    assert config["available_node_types"]["gpu_worker"]["min_workers"] >= 1
    assert config["head_node_type"] in config["available_node_types"]
    assert config["docker"]["image"].split(":")[-1].startswith("0.1.0")
    assert any(cmd.startswith("ray start --head") for cmd in config["head_start_ray_commands"])
    assert all("ray start" in cmd or cmd == "ray stop" for cmd in config["worker_start_ray_commands"])
    comment = (INFRA / "ray-cluster.yaml").read_text()
    submitted = comment.split("-- \\")[1].split("\n# One teacher")[0].replace("#", " ").replace("\\", " ")
    _entrypoint_is_a_valid_cache_command(" ".join(submitted.split()))


def test_kuberay_rayjob() -> None:
    job = yaml.safe_load((INFRA / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    flags = _entrypoint_is_a_valid_cache_command(spec["entrypoint"])
    assert flags["--address"] == "auto" and {"--dataset", "--source", "--store", "--teacher"} <= set(flags)
    cluster = spec["rayClusterSpec"]
    assert _ray_version_ok(cluster["rayVersion"])
    head = cluster["headGroupSpec"]["template"]["spec"]
    workers = [group["template"]["spec"] for group in cluster["workerGroupSpecs"]]
    images = {c["image"] for pod in [head, *workers] for c in pod["containers"]}
    assert len(images) == 1, "head and workers must run the same image"
    teacher_dir = flags["--teacher"]
    for pod in [head, *workers]:  # the driver (head) loads the teacher too, not only the GPU workers
        mounts = [m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])]
        assert any(teacher_dir.startswith(m) for m in mounts), f"{teacher_dir} is not mounted in every pod"
        assert all(s["secretRef"]["name"] == "esam3-s3" for c in pod["containers"] for s in c.get("envFrom", []))
    assert any("nvidia.com/gpu" in c["resources"]["limits"] for pod in workers for c in pod["containers"])
    for pod in [head, *workers]:  # credentials only through the Secret, never as literal env values
        for container in pod["containers"]:
            for variable in container.get("env", []):
                assert not (variable["name"].startswith("AWS_") and "value" in variable), variable["name"]
