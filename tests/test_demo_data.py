"""The demo writer: determinism, the exact released formats, and masks consistent with boxes/areas/points."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
import simplejpeg
from pycocotools import mask as mask_utils

from esam3.pipeline.demo_data import write_demo_data
from esam3.schemas.demo import DemoDataConfig
from tests.conftest import small_config

SA1B_IMAGE_KEYS = {"image_id", "width", "height", "file_name"}
SA1B_ANN_KEYS = {"id", "bbox", "area", "segmentation", "point_coords", "predicted_iou", "stability_score", "crop_box"}
SAV_KEYS = {
    "video_id",
    "video_duration",
    "video_frame_count",
    "video_height",
    "video_width",
    "video_resolution",
    "video_environment",
    "video_split",
    "masklet",
    "masklet_id",
    "masklet_size_rel",
    "masklet_size_abs",
    "masklet_size_bucket",
    "masklet_visibility_changes",
    "masklet_first_appeared_frame",
    "masklet_frame_count",
    "masklet_edited_frame_count",
    "masklet_type",
    "masklet_num",
}


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.tar"))}


def test_deterministic_for_a_seed(tmp_path: Path, demo_root: Path) -> None:
    write_demo_data(small_config(tmp_path / "again"))
    assert _digests(tmp_path / "again") == _digests(demo_root)
    # A shard does not depend on how many shards are written, and another seed gives other data.
    write_demo_data(small_config(tmp_path / "one", sa1b_shards=1, sav_shards=0))
    assert _digests(tmp_path / "one")["sa-1b/sa_000000.tar"] == _digests(demo_root)["sa-1b/sa_000000.tar"]
    write_demo_data(small_config(tmp_path / "other", seed=8, sav_shards=0))
    assert _digests(tmp_path / "other")["sa-1b/sa_000000.tar"] != _digests(demo_root)["sa-1b/sa_000000.tar"]


def test_sa1b_format(demo_root: Path) -> None:
    members = _members(demo_root / "sa-1b" / "sa_000001.tar")
    names = list(members)
    assert names == ["sa_4.jpg", "sa_4.json", "sa_5.jpg", "sa_5.json", "sa_6.jpg", "sa_6.json"]
    sizes = set()
    for stem in ("sa_4", "sa_5", "sa_6"):
        record = json.loads(members[f"{stem}.json"])
        assert set(record) == {"image", "annotations"}
        assert set(record["image"]) == SA1B_IMAGE_KEYS
        image = record["image"]
        assert image["file_name"] == f"{stem}.jpg"
        height, width, _, _ = simplejpeg.decode_jpeg_header(members[f"{stem}.jpg"])
        assert (height, width) == (image["height"], image["width"])
        sizes.add((height, width))
        assert len(record["annotations"]) >= 3
        ids = [a["id"] for a in record["annotations"]]
        assert len(set(ids)) == len(ids)
        for ann in record["annotations"]:
            assert set(ann) == SA1B_ANN_KEYS
            assert ann["segmentation"]["size"] == [height, width]
            rle = {"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()}
            mask = mask_utils.decode(rle).astype(bool)
            assert ann["area"] == int(mask.sum())
            np.testing.assert_allclose(ann["bbox"], mask_utils.toBbox(rle))
            ((x, y),) = ann["point_coords"]
            assert mask[int(y), int(x)]
            assert 0 <= ann["predicted_iou"] <= 1 and 0 <= ann["stability_score"] <= 1
            assert ann["crop_box"] == [0.0, 0.0, float(width), float(height)]
    assert len(sizes) > 1  # varied sizes


def test_sa1b_masks_overlap(demo_root: Path) -> None:
    """Part masks nest inside objects, so some annotations overlap (as in SA-1B)."""
    overlapping = 0
    for member, data in _members(demo_root / "sa-1b" / "sa_000000.tar").items():
        if not member.endswith(".json"):
            continue
        anns = json.loads(data)["annotations"]
        masks = [mask_utils.decode({"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()}) for a in anns]
        stacked = np.stack(masks).astype(int).sum(axis=0)
        overlapping += int((stacked > 1).any())
    assert overlapping >= 1


def test_full_size_images_are_sa1b_sized(tmp_path: Path) -> None:
    write_demo_data(DemoDataConfig(out=tmp_path, sa1b_shards=1, images_per_shard=4, sav_shards=0, seed=3))
    for name, data in _members(tmp_path / "sa-1b" / "sa_000000.tar").items():
        if name.endswith(".jpg"):
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            assert 900 <= min(height, width) <= 1500 and max(height, width) <= 2700


def test_sav_format(demo_root: Path) -> None:
    members = _members(demo_root / "sa-v" / "sav_000.tar")
    assert list(members) == [
        "sav_000/sav_000001.mp4",
        "sav_000/sav_000001_manual.json",
        "sav_000/sav_000002.mp4",
        "sav_000/sav_000002_manual.json",
    ]
    late_arrival = False
    for stem in ("sav_000001", "sav_000002"):
        record = json.loads(members[f"sav_000/{stem}_manual.json"])
        assert set(record) == SAV_KEYS
        assert record["video_id"] == stem
        with av.open(io.BytesIO(members[f"sav_000/{stem}.mp4"])) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264"
            assert stream.average_rate == 24
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert len(frames) == record["video_frame_count"] == 36
        assert frames[0].shape == (record["video_height"], record["video_width"], 3) == (128, 160, 3)
        assert record["video_duration"] == pytest.approx(1.5)
        n = record["masklet_num"]
        assert n >= 2 and record["masklet_id"] == list(range(n))
        assert len(record["masklet"]) == 9  # frames 0, 4, ..., 32
        for t, objects in enumerate(record["masklet"]):
            assert len(objects) == n
            for rle in objects:
                assert rle["size"] == [128, 160]
        for j in range(n):
            areas = [int(mask_utils.area({"size": [128, 160], "counts": step[j]["counts"].encode()})) for step in record["masklet"]]
            first = next(t for t, a in enumerate(areas) if a >= 16) * 4
            assert record["masklet_first_appeared_frame"][j] == first
            late_arrival |= first > 0
        for key in (
            "masklet_size_rel",
            "masklet_size_abs",
            "masklet_size_bucket",
            "masklet_visibility_changes",
            "masklet_frame_count",
            "masklet_edited_frame_count",
            "masklet_type",
        ):
            assert len(record[key]) == n
    assert late_arrival, "an object should enter after the first frame"


def test_objects_move(demo_root: Path) -> None:
    record = json.loads(_members(demo_root / "sa-v" / "sav_000.tar")["sav_000/sav_000001_manual.json"])
    first = record["masklet"][0][0]["counts"]
    assert any(step[0]["counts"] != first for step in record["masklet"][1:])
