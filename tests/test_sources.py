"""Sources: a round trip from the demo writer, and one failure record per bad input with the rest of the shard kept."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from pycocotools import mask as mask_utils

from esam3.pipeline.demo_data import (
    MIN_ANNOTATED_AREA,
    sa1b_image,
    sa1b_scene,
    sample_rng,
    sav_scene,
    sav_video,
    write_tar,
)
from esam3.pipeline.shards import DatasetName
from esam3.pipeline.sources import SA1BSource, SAVSource
from esam3.schemas.samples import Failure, ImageSample, VideoSample
from tests.conftest import small_config


def _split(items):
    samples = [i for i in items if not isinstance(i, Failure)]
    failures = [i for i in items if isinstance(i, Failure)]
    return samples, failures


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255**2 / mse))


def test_sa1b_round_trip(demo_root: Path) -> None:
    samples, failures = _split(list(SA1BSource(str(demo_root / "sa-1b")).iter_samples("all")))
    assert failures == []
    assert [s.key for s in samples] == [f"sa1b/{i}" for i in range(1, 7)]
    config = small_config(demo_root)
    with tarfile.open(demo_root / "sa-1b" / "sa_000000.tar") as tar:
        written = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for index, sample in enumerate(samples[:3]):
        assert isinstance(sample, ImageSample) and sample.shard == "sa_000000.tar"
        assert sample.jpeg == written[f"sa_{index + 1}.jpg"]
        assert sample.record.model_dump(mode="json") == json.loads(written[f"sa_{index + 1}.json"])
        # Pixels and masks are what the scene renderer drew (JPEG is lossy; masks are exact).
        img, masks = sa1b_scene(sample_rng(config.seed, DatasetName.SA1B, 0, index), config.image_short_side)
        assert _psnr(simplejpeg.decode_jpeg(sample.jpeg), img) > 30
        annotated = [m for m in masks if m.sum() >= MIN_ANNOTATED_AREA]
        assert len(sample.masks) == len(annotated) == len(sample.record.annotations)
        for runs, mask, ann in zip(sample.masks, annotated, sample.record.annotations):
            np.testing.assert_array_equal(runs.to_mask(), mask)
            coco = {"size": list(ann.segmentation.size), "counts": ann.segmentation.counts.encode()}
            np.testing.assert_array_equal(runs.to_mask(), mask_utils.decode(coco).astype(bool))


def test_sav_round_trip(demo_root: Path) -> None:
    config = small_config(demo_root)
    samples, failures = _split(list(SAVSource(str(demo_root / "sa-v")).iter_samples("0")))
    assert failures == []
    assert [s.key for s in samples] == ["sav/sav_000001", "sav/sav_000002"]
    for index, sample in enumerate(samples):
        assert isinstance(sample, VideoSample)
        frames, masklet = sav_scene(sample_rng(config.seed, DatasetName.SAV, 0, index), config)
        np.testing.assert_array_equal(sample.frame_indices, np.arange(0, 36, 4))
        assert sample.frames.shape == (9, 128, 160, 3) and sample.frames.dtype == np.uint8
        for t, decoded in zip(sample.frame_indices, sample.frames):
            assert _psnr(decoded, frames[t]) > 28
        kept_objects = [j for j in range(len(masklet[0])) if any(step[j].sum() >= 16 for step in masklet)]
        assert len(kept_objects) == sample.record.masklet_num
        for t, step in enumerate(sample.masks):
            for runs, j in zip(step, kept_objects):
                np.testing.assert_array_equal(runs.to_mask(), masklet[t][j])
    every = list(SAVSource(str(demo_root / "sa-v"), frames="all", max_frames=10).iter_samples("all"))
    assert every[0].frames.shape[0] == 10
    np.testing.assert_array_equal(every[0].frame_indices, np.arange(10))


# ------------------------------------------------------------------------------------------ bad inputs


def _good_sa1b(image_id: int) -> tuple[bytes, dict]:
    jpeg, record = sa1b_image(np.random.default_rng(image_id), image_id, 96)
    return jpeg, record.model_dump(mode="json")


def _jpeg_truncated(jpeg: bytes, record: dict) -> list[tuple[str, bytes]]:
    return [("sa_2.jpg", jpeg[: len(jpeg) // 2]), ("sa_2.json", json.dumps(record).encode())]


def _rle_bad(jpeg: bytes, record: dict) -> list[tuple[str, bytes]]:
    record["annotations"][1]["segmentation"]["counts"] = "0 1"
    return [("sa_2.jpg", jpeg), ("sa_2.json", json.dumps(record).encode())]


def _rle_size(jpeg: bytes, record: dict) -> list[tuple[str, bytes]]:
    h, w = record["annotations"][0]["segmentation"]["size"]
    record["annotations"][0]["segmentation"]["size"] = [h + 1, w]
    return [("sa_2.jpg", jpeg), ("sa_2.json", json.dumps(record).encode())]


def _rle_short(jpeg: bytes, record: dict) -> list[tuple[str, bytes]]:
    """Counts that parse but cover fewer pixels than the declared size."""
    record["annotations"][0]["segmentation"]["counts"] = "42"
    return [("sa_2.jpg", jpeg), ("sa_2.json", json.dumps(record).encode())]


def _missing_field(jpeg: bytes, record: dict) -> list[tuple[str, bytes]]:
    del record["image"]["width"]
    return [("sa_2.jpg", jpeg), ("sa_2.json", json.dumps(record).encode())]


def _size_mismatch(jpeg: bytes, record: dict) -> list[tuple[str, bytes]]:
    record["image"]["width"] += 2
    for ann in record["annotations"]:
        ann["segmentation"]["size"][1] += 2
    return [("sa_2.jpg", jpeg), ("sa_2.json", json.dumps(record).encode())]


SA1B_BAD = {
    "corrupt JPEG": (lambda j, r: [("sa_2.jpg", b"\xff\xd8 not a jpeg"), ("sa_2.json", json.dumps(r).encode())],
                     "sa_2.jpg is not a readable JPEG"),
    "truncated JPEG": (_jpeg_truncated, "sa_2.jpg is not a readable JPEG: Premature end"),
    "missing JSON": (lambda j, r: [("sa_2.jpg", j)], "sample sa_2 has no .json member"),
    "missing JPEG": (lambda j, r: [("sa_2.json", json.dumps(r).encode())], "sample sa_2 has no .jpg member"),
    "invalid JSON": (lambda j, r: [("sa_2.jpg", j), ("sa_2.json", b"{not json")], "sa_2.json is not valid JSON"),
    "wrong JSON": (_missing_field, "does not match the SA1BRecord schema: image.width: Field required"),
    "RLE does not decode": (_rle_bad, "bad RLE: RLE counts string has characters outside"),
    "RLE wrong size": (_rle_size, "segmentation size"),
    "RLE short": (_rle_short, "bad RLE: RLE runs cover 6 pixels"),
    "image size mismatch": (_size_mismatch, "but its JSON says"),
}


@pytest.mark.parametrize("case", list(SA1B_BAD))
def test_sa1b_bad_sample_is_a_failure(tmp_path: Path, case: str) -> None:
    make, reason = SA1B_BAD[case]
    members = []
    for image_id in (1, 2, 3):
        jpeg, record = _good_sa1b(image_id)
        members += make(jpeg, record) if image_id == 2 else [(f"sa_{image_id}.jpg", jpeg), (f"sa_{image_id}.json", json.dumps(record).encode())]
    write_tar(tmp_path / "sa_000004.tar", members)
    samples, failures = _split(list(SA1BSource(str(tmp_path)).iter_samples("4")))
    assert [s.key for s in samples] == ["sa1b/1", "sa1b/3"]
    assert len(failures) == 1
    failure = failures[0]
    assert (failure.dataset, failure.shard) == ("sa-1b", "sa_000004.tar")
    assert failure.member.startswith("sa_2.")
    assert reason in failure.reason


def test_truncated_tar_keeps_earlier_samples(tmp_path: Path) -> None:
    members = []
    for image_id in (1, 2, 3):
        jpeg, record = _good_sa1b(image_id)
        members += [(f"sa_{image_id}.jpg", jpeg), (f"sa_{image_id}.json", json.dumps(record).encode())]
    write_tar(tmp_path / "sa_000000.tar", members)
    data = (tmp_path / "sa_000000.tar").read_bytes()
    with tarfile.open(tmp_path / "sa_000000.tar") as tar:
        cut = tar.getmember("sa_3.jpg").offset_data + 100  # inside the last image
    (tmp_path / "sa_000000.tar").write_bytes(data[:cut])
    samples, failures = _split(list(SA1BSource(str(tmp_path)).iter_samples("0")))
    assert [s.key for s in samples] == ["sa1b/1", "sa1b/2"]
    assert len(failures) == 1
    assert failures[0].member == "sa_3.jpg" and "truncated or corrupt tar" in failures[0].reason


def _sav_shard(tmp_path: Path, break_second) -> list:
    config = small_config(tmp_path, video_seconds=1.0)
    members = []
    for i in (1, 2, 3):
        video_id = f"sav_{i:06d}"
        mp4, record = sav_video(np.random.default_rng(i), video_id, config)
        parts = [(f"sav_000/{video_id}.mp4", mp4), (f"sav_000/{video_id}_manual.json", record.model_dump_json(exclude_none=True).encode())]
        members += break_second(parts, record.model_dump(mode="json", exclude_none=True)) if i == 2 else parts
    write_tar(tmp_path / "sav_000.tar", members)
    return list(SAVSource(str(tmp_path)).iter_samples("0"))


def _json(record: dict) -> bytes:
    return json.dumps(record).encode()


def _extra_frames(parts, record):
    record["video_frame_count"] += 8
    record["masklet"] += record["masklet"][-2:]
    return [parts[0], (parts[1][0], _json(record))]


def _masklet_short(parts, record):
    record["masklet"] = record["masklet"][:-1]
    return [parts[0], (parts[1][0], _json(record))]


def _masklet_rle(parts, record):
    record["masklet"][2][0]["counts"] = "!!"
    return [parts[0], (parts[1][0], _json(record))]


SAV_BAD = {
    "unreadable mp4": (lambda p, r: [(p[0][0], b"\x00\x00\x00\x18ftypmp42 garbage"), p[1]], "sav_000002.mp4 is not a readable video"),
    "truncated mp4": (lambda p, r: [(p[0][0], p[0][1][: len(p[0][1]) // 3]), p[1]], "sav_000002.mp4"),
    "missing JSON": (lambda p, r: [p[0]], "sample sav_000002 has no _manual.json member"),
    "frame count does not match the video": (_extra_frames, "has 24 frames but its JSON video_frame_count is 32"),
    "masklet frame count": (_masklet_short, "masklet has 5 annotated frames but video_frame_count 24 implies 6"),
    "masklet RLE": (_masklet_rle, "masklet[2][0] (object 0): bad RLE"),
}


@pytest.mark.parametrize("case", list(SAV_BAD))
def test_sav_bad_sample_is_a_failure(tmp_path: Path, case: str) -> None:
    make, reason = SAV_BAD[case]
    samples, failures = _split(_sav_shard(tmp_path, make))
    assert [s.key for s in samples] == ["sav/sav_000001", "sav/sav_000003"]
    assert len(failures) == 1
    assert (failures[0].dataset, failures[0].shard) == ("sa-v", "sav_000.tar")
    assert failures[0].member.startswith("sav_000/sav_000002") or failures[0].member == "sav_000002.mp4"
    assert reason in failures[0].reason


def test_source_reads_through_fsspec_urls(demo_root: Path) -> None:
    """Any fsspec URL works; the memory:// filesystem stands in for remote stores here (S3 is tested with a real server later)."""
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/shards/sa_000001.tar", (demo_root / "sa-1b" / "sa_000001.tar").read_bytes())
    samples, failures = _split(list(SA1BSource("memory://shards").iter_samples("all")))
    assert failures == [] and [s.key for s in samples] == ["sa1b/4", "sa1b/5", "sa1b/6"]
    assert samples[0].shard == "sa_000001.tar"
