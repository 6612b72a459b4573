"""Sources: a round trip from the demo writer, and one failure record per bad input with the rest of the shard kept."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from pycocotools import mask as mask_utils


from esam3.pipeline.demo_data import (
    MIN_ANNOTATED_AREA,
    encode_h264,
    encode_rle,
    sa1b_image,
    sa1b_scene,
    sample_rng,
    sav_scene,
    sav_video,
    write_tar,
)
from esam3.pipeline.shards import DatasetName
from esam3.pipeline.sources import SA1BSource, SAVSource
from esam3.pipeline.tar_stream import ShardReadError
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


def _raw_json(data: bytes):
    return lambda j, r: [("sa_2.jpg", j), ("sa_2.json", data)]


def _file_name(jpeg: bytes, record: dict) -> list[tuple[str, bytes]]:
    record["image"]["file_name"] = "sa_9.jpg"
    return [("sa_2.jpg", jpeg), ("sa_2.json", json.dumps(record).encode())]


# case -> (make the bad members of image 2, words of the reason, the member blamed)
SA1B_BAD = {
    "corrupt JPEG": (
        lambda j, r: [("sa_2.jpg", b"\xff\xd8 not a jpeg"), ("sa_2.json", json.dumps(r).encode())],
        "sa_2.jpg is not a readable JPEG",
        "sa_2.jpg",
    ),
    "truncated JPEG": (_jpeg_truncated, "sa_2.jpg is not a readable JPEG: Premature end", "sa_2.jpg"),
    "missing JSON": (lambda j, r: [("sa_2.jpg", j)], "sample sa_2 has no .json member", "sa_2.jpg"),
    "missing JPEG": (lambda j, r: [("sa_2.json", json.dumps(r).encode())], "sample sa_2 has no .jpg member", "sa_2.json"),
    "invalid JSON": (_raw_json(b"{not json"), "sa_2.json is not valid JSON", "sa_2.json"),
    "JSON not UTF-8": (_raw_json(b'{"image": "\xff\xfe"}'), "sa_2.json is not valid JSON", "sa_2.json"),
    "JSON too deep": (_raw_json(b"[" * 100_000), "sa_2.json is not valid JSON", "sa_2.json"),
    "JSON not an object": (_raw_json(b"[1, 2]"), "does not match the SA1BRecord schema: (input)", "sa_2.json"),
    "wrong JSON": (_missing_field, "does not match the SA1BRecord schema: image.width: Field required", "sa_2.json"),
    "file_name mismatch": (_file_name, "JSON file_name 'sa_9.jpg' does not match tar member 'sa_2.jpg'", "sa_2.json"),
    "RLE does not decode": (_rle_bad, "bad RLE: RLE counts string has characters outside", "sa_2.json"),
    "RLE wrong size": (_rle_size, "segmentation size", "sa_2.json"),
    "RLE short": (_rle_short, "bad RLE: RLE runs cover 6 pixels", "sa_2.json"),
    "image size mismatch": (_size_mismatch, "but its JSON says", "sa_2.jpg"),
}


@pytest.mark.parametrize("case", list(SA1B_BAD))
def test_sa1b_bad_sample_is_a_failure(tmp_path: Path, case: str) -> None:
    make, reason, blamed = SA1B_BAD[case]
    members = []
    for image_id in (1, 2, 3):
        jpeg, record = _good_sa1b(image_id)
        members += (
            make(jpeg, record) if image_id == 2 else [(f"sa_{image_id}.jpg", jpeg), (f"sa_{image_id}.json", json.dumps(record).encode())]
        )
    write_tar(tmp_path / "sa_000004.tar", members)
    samples, failures = _split(list(SA1BSource(str(tmp_path)).iter_samples("4")))
    assert [s.key for s in samples] == ["sa1b/1", "sa1b/3"]
    assert len(failures) == 1
    failure = failures[0]
    assert (failure.dataset, failure.shard) == ("sa-1b", "sa_000004.tar")
    assert failure.member == blamed
    assert reason in failure.reason


def _three_images(tmp_path: Path) -> tuple[Path, bytes]:
    members = []
    for image_id in (1, 2, 3):
        jpeg, record = _good_sa1b(image_id)
        members += [(f"sa_{image_id}.jpg", jpeg), (f"sa_{image_id}.json", json.dumps(record).encode())]
    path = tmp_path / "sa_000000.tar"
    write_tar(path, members)
    return path, path.read_bytes()


def _offsets(path: Path) -> dict[str, tuple[int, int]]:
    """member -> (header offset, data offset)."""
    with tarfile.open(path) as tar:
        return {m.name: (m.offset, m.offset_data) for m in tar.getmembers()}


@pytest.mark.parametrize(
    ("damage", "keys", "lost"),
    [
        ("cut inside the last image", ["sa1b/1", "sa1b/2"], None),
        ("cut inside a JSON", ["sa1b/1"], "sa_2"),
        ("cut at a sample boundary", ["sa1b/1", "sa1b/2"], None),
        ("cut inside a header", ["sa1b/1", "sa1b/2"], None),
        ("garbage header mid-archive", ["sa1b/1"], "sa_2"),
        ("no end-of-archive marker", ["sa1b/1", "sa1b/2", "sa1b/3"], None),
    ],
)
def test_damaged_tar_keeps_earlier_samples(tmp_path: Path, damage: str, keys: list[str], lost: str | None) -> None:
    path, data = _three_images(tmp_path)
    at = _offsets(path)
    end_of_data = len(data) - 1024  # two zero blocks end a tar
    broken = {
        "cut inside the last image": data[: at["sa_3.jpg"][1] + 100],
        "cut inside a JSON": data[: at["sa_2.json"][1] + 10],
        "cut at a sample boundary": data[: at["sa_3.jpg"][0]],
        "cut inside a header": data[: at["sa_3.jpg"][0] + 200],
        "garbage header mid-archive": data[: at["sa_2.json"][0]] + b"\x07" * 512 + data[at["sa_2.json"][0] + 512 :],
        "no end-of-archive marker": data[:end_of_data].rstrip(b"\0") + b"\0" * (-len(data[:end_of_data].rstrip(b"\0")) % 512),
    }[damage]
    path.write_bytes(broken)
    samples, failures = _split(list(SA1BSource(str(tmp_path)).iter_samples("0")))
    assert [s.key for s in samples] == keys
    assert len(failures) == 1, failures
    assert "truncated or corrupt tar" in failures[0].reason and "the rest of the shard is lost" in failures[0].reason
    assert (f"incomplete samples lost: {lost}" in failures[0].reason) if lost else ("incomplete" not in failures[0].reason)


def test_empty_and_non_tar_shards(tmp_path: Path) -> None:
    (tmp_path / "sa_000000.tar").write_bytes(b"")
    (tmp_path / "sa_000001.tar").write_bytes(b"this is not a tar archive at all" * 40)
    for shard in ("0", "1"):
        samples, failures = _split(list(SA1BSource(str(tmp_path)).iter_samples(shard)))
        assert samples == [] and len(failures) == 1 and "truncated or corrupt tar at the start" in failures[0].reason


def test_read_errors_are_raised_for_retry(demo_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An I/O error is not bad data: it propagates as ShardReadError so the caller can retry the shard."""
    import fsspec.implementations.local as local

    source = SA1BSource(str(demo_root / "sa-1b"))
    shard = source.shards("0")[0]

    def flaky_read(self, *args, **kwargs):
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(local.LocalFileOpener, "read", flaky_read)
    with pytest.raises(ShardReadError, match="reading sa_000000.tar failed .*connection reset"):
        list(source.iter_shard(shard))


def test_unexpected_errors_become_failures(demo_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug or an input nobody foresaw fails that sample, not the shard (and is logged with a traceback)."""
    calls = {"n": 0}
    original = SA1BSource._sample

    def sometimes_broken(self, shard, group):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyError("surprise")
        return original(self, shard, group)

    monkeypatch.setattr(SA1BSource, "_sample", sometimes_broken)
    samples, failures = _split(list(SA1BSource(str(demo_root / "sa-1b")).iter_samples("0")))
    assert [s.key for s in samples] == ["sa1b/1", "sa1b/3"]
    assert failures[0].member == "sa_2.jpg" and "unexpected error (KeyError)" in failures[0].reason


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


def _video_id(parts, record):
    record["video_id"] = "sav_000009"
    return [parts[0], (parts[1][0], _json(record))]


def _other_size(parts, record):
    record["video_width"] += 2
    for step in record["masklet"]:
        for rle in step:
            rle["size"][1] += 2
    return [parts[0], (parts[1][0], _json(_with_counts_for(record)))]


def _with_counts_for(record):
    """Give every RLE an empty mask of the (new) declared size so only the video size is wrong."""
    h, w = record["video_height"], record["video_width"]
    for step in record["masklet"]:
        for rle in step:
            rle["counts"] = encode_rle(np.zeros((h, w), bool))["counts"]
    return record


def _other_rate(parts, record):
    frames = [np.full((128, 160, 3), 60 + 8 * i, np.uint8) for i in range(record["video_frame_count"])]
    return [(parts[0][0], encode_h264(frames, 30)), parts[1]]


SAV_BAD = {
    "unreadable mp4": (
        lambda p, r: [(p[0][0], b"\x00\x00\x00\x18ftypmp42 garbage"), p[1]],
        "sav_000002.mp4: not a readable video",
        "sav_000/sav_000002.mp4",
    ),
    "truncated mp4": (
        lambda p, r: [(p[0][0], p[0][1][: len(p[0][1]) // 3]), p[1]],
        "sav_000002.mp4: not a readable video",
        "sav_000/sav_000002.mp4",
    ),
    "missing JSON": (lambda p, r: [p[0]], "sample sav_000002 has no _manual.json member", "sav_000/sav_000002.mp4"),
    "JSON not valid": (lambda p, r: [p[0], (p[1][0], b"\x00\x01")], "is not valid JSON", "sav_000/sav_000002_manual.json"),
    "frame count does not match the video": (_extra_frames, "has 24 frames but its JSON video_frame_count is 32", "sav_000/sav_000002.mp4"),
    "masklet frame count": (
        _masklet_short,
        "masklet has 5 annotated frames but video_frame_count 24 implies 6",
        "sav_000/sav_000002_manual.json",
    ),
    "masklet RLE": (_masklet_rle, "masklet[2][0] (object 0): bad RLE", "sav_000/sav_000002_manual.json"),
    "video_id mismatch": (_video_id, "JSON video_id 'sav_000009' does not match", "sav_000/sav_000002_manual.json"),
    "video size differs from JSON": (_other_size, "frame 0 is 160x128 but the JSON says 162x128", "sav_000/sav_000002.mp4"),
    "not 24 fps": (_other_rate, "frame rate is 30.0 fps, SA-V videos are 24 fps", "sav_000/sav_000002.mp4"),
}


@pytest.mark.parametrize("case", list(SAV_BAD))
def test_sav_bad_sample_is_a_failure(tmp_path: Path, case: str) -> None:
    make, reason, blamed = SAV_BAD[case]
    samples, failures = _split(_sav_shard(tmp_path, make))
    assert [s.key for s in samples] == ["sav/sav_000001", "sav/sav_000003"]
    assert len(failures) == 1
    assert (failures[0].dataset, failures[0].shard, failures[0].member) == ("sa-v", "sav_000.tar", blamed)
    assert reason in failures[0].reason


def test_resolution_change_mid_stream_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two H.264 streams of different sizes back to back. Raw H.264 carries no frame rate (the demuxer
    guesses 25 fps), so the rate check is aligned to that guess to reach the per-frame size check."""
    from esam3.pipeline import sources

    data = b"".join(encode_h264([np.zeros(size, np.uint8)] * 6, 24, container_format="h264") for size in ((128, 160, 3), (96, 128, 3)))
    monkeypatch.setattr(sources, "SAV_FPS", 25)
    with pytest.raises(sources.SampleError, match="frame 6 is 128x96 but the JSON says 160x128"):
        sources._decode_video(data, (128, 160), 4, None)


def test_source_reads_through_fsspec_urls(demo_root: Path) -> None:
    """Any fsspec URL works; the memory:// filesystem stands in for remote stores here (S3 is tested with a real server later)."""
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/shards/sa_000001.tar", (demo_root / "sa-1b" / "sa_000001.tar").read_bytes())
    samples, failures = _split(list(SA1BSource("memory://shards").iter_samples("all")))
    assert failures == [] and [s.key for s in samples] == ["sa1b/4", "sa1b/5", "sa1b/6"]
    assert samples[0].shard == "sa_000001.tar"


@pytest.mark.parametrize(
    ("dataset", "bound", "value", "said"),
    [
        ("sa-1b", "MAX_IMAGE_PIXELS", 1000, "MP an image may have"),
        ("sa-1b", "MAX_JSON_BYTES", 100, "of JSON, over the"),
        ("sa-v", "MAX_JSON_BYTES", 100, "of JSON, over the"),
        ("sa-v", "MAX_VIDEO_BYTES", 100_000, "decoded, over the 0.0 GB a video may take: lower --max-frames"),
    ],
)
def test_samples_beyond_the_memory_bounds_fail_with_the_reason(
    demo_root: Path, monkeypatch: pytest.MonkeyPatch, dataset: str, bound: str, value: int, said: str
) -> None:
    """Bounds lowered to the demo's sizes: each sample fails with a reason, none is loaded whole first."""
    from esam3.pipeline import sources

    monkeypatch.setattr(sources, bound, value)
    source = SA1BSource(str(demo_root / dataset)) if dataset == "sa-1b" else SAVSource(str(demo_root / dataset), max_frames=8)
    items = list(source.iter_samples("all"))
    assert items and all(isinstance(i, Failure) and said in i.reason for i in items), [getattr(i, "reason", i) for i in items]
