"""Sources: the samples of selected SA-1B / SA-V shards, streamed from a folder or any fsspec URL.

Every sample is checked before it is yielded (JSON schema, JPEG header and size, each RLE, video decode and
frame counts); a bad one becomes a :class:`~esam3.schemas.samples.Failure` naming the shard, the tar member
and the reason, and the rest of the shard goes on. Nothing is written to disk.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any, Literal

import av
import fsspec
import numpy as np
import simplejpeg
from pydantic import ValidationError

from esam3.pipeline.shards import DatasetName, ShardRef, select_shards
from esam3.pipeline.tar_stream import MemberGroup, ShardReadError, iter_member_groups
from esam3.schemas.errors import describe
from esam3.schemas.rle import RLEError, Runs, parse_counts
from esam3.schemas.samples import Failure, ImageSample, VideoSample
from esam3.schemas.sa1b import RLE, SA1BRecord
from esam3.schemas.sav import SAV_ANNOTATION_STRIDE, SAV_FPS, SAVRecord
from esam3.schemas.shards import ShardSpec

log = logging.getLogger(__name__)
#: Bounds on what one sample may make a worker hold: beyond them the sample fails (a decompression bomb, a corrupt
#: header, a video far longer than SA-V's), rather than the worker running out of memory on every retry.
MAX_IMAGE_PIXELS = 100_000_000  # SA-1B: ~3.4 MP per image; 100 MP is 300 MB of RGB
MAX_JSON_BYTES = 256 << 20  # SA-1B / SA-V annotation files: a few MB; Python holds ~10x a JSON's size once parsed
MAX_VIDEO_BYTES = 8 << 30  # decoded RGB frames kept of one video (SA-V at 1080p: 6.2 MB a frame)


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.1f} GB"


class SampleError(ValueError):
    """A sample that cannot be used; the message becomes the failure reason, ``member`` the member at fault."""

    def __init__(self, reason: str, member: str | None = None) -> None:
        super().__init__(reason)
        self.member = member


class _ShardedSource:
    """Shared plumbing: select shards, open each one with fsspec, stream its member groups."""

    dataset: DatasetName
    required: frozenset[str]

    def __init__(self, source: str, storage_options: dict[str, Any] | None = None) -> None:
        self.source = source
        self.storage_options = dict(storage_options or {})

    def shards(self, spec: ShardSpec | str) -> list[ShardRef]:
        return select_shards(self.source, self.dataset, spec, self.storage_options)

    def iter_samples(self, spec: ShardSpec | str) -> Iterator[Any]:
        """Every sample (or failure) of the shards ``spec`` selects, shard by shard."""
        for shard in self.shards(spec):
            yield from self.iter_shard(shard)

    def iter_shard(self, shard: ShardRef) -> Iterator[Any]:
        """Samples and failures of one shard; raises :class:`ShardReadError` on I/O errors (retry the shard)."""
        try:
            fileobj = fsspec.open(shard.url, "rb", **self.storage_options).open()
        except OSError as exc:
            raise ShardReadError(f"cannot open {shard.name}: {exc}") from exc
        with fileobj:
            for item in iter_member_groups(fileobj, self._split, self.required, self.dataset.value, shard.name):
                if not isinstance(item, Failure):
                    item = self._checked(shard, item)
                if isinstance(item, Failure):
                    log.info("%s", item)
                yield item

    def _checked(self, shard: ShardRef, group: MemberGroup) -> Any:
        """The sample, or a failure naming the member at fault; unexpected errors are failures too (logged)."""
        try:
            return self._sample(shard, group)
        except SampleError as exc:
            return Failure(self.dataset.value, shard.name, exc.member or group.first_member, str(exc))
        except Exception as exc:  # noqa: BLE001 - one odd sample must not stop the shard
            log.exception("unexpected error on %s:%s", shard.name, group.first_member)
            reason = f"unexpected error ({type(exc).__name__}): {exc}"
            return Failure(self.dataset.value, shard.name, group.first_member, reason)

    @staticmethod
    def _split(name: str) -> tuple[str, str] | None:
        raise NotImplementedError

    def _sample(self, shard: ShardRef, group: MemberGroup) -> Any:
        raise NotImplementedError


def _parse_json(group: MemberGroup, part: str, model: type) -> Any:
    member = group.member(part)
    if len(group.data(part)) > MAX_JSON_BYTES:
        raise SampleError(
            f"{member} is {_gb(len(group.data(part)))} of JSON, over the {_gb(MAX_JSON_BYTES)} an annotation "
            "file may hold (SA-1B and SA-V ones are a few MB)",
            member,
        )
    try:
        return model.model_validate(json.loads(group.data(part)))
    except ValidationError as exc:
        raise SampleError(f"{member} does not match the {model.__name__} schema: {describe(exc)}", member) from None
    except (ValueError, RecursionError) as exc:  # bad syntax, not UTF-8, absurd numbers or nesting
        raise SampleError(f"{member} is not valid JSON: {exc}", member) from None


def _runs(rle: RLE, where: str, member: str) -> Runs:
    try:
        return parse_counts(rle.counts, *rle.size)
    except RLEError as exc:
        raise SampleError(f"{where}: bad RLE: {exc}", member) from None


class SA1BSource(_ShardedSource):
    """SA-1B: one :class:`ImageSample` (key ``sa1b/<image_id>``, JPEG bytes, annotations) per image.

    ``check_pixels`` entropy-decodes each JPEG (at 1/8 scale, which libjpeg-turbo does cheaply) to catch
    truncated or corrupt data; turn it off where a later step decodes the image anyway and reports errors.
    """

    dataset = DatasetName.SA1B
    required = frozenset({".jpg", ".json"})

    def __init__(self, source: str, storage_options: dict[str, Any] | None = None, check_pixels: bool = True) -> None:
        super().__init__(source, storage_options)
        self.check_pixels = check_pixels

    @staticmethod
    def _split(name: str) -> tuple[str, str] | None:
        for part in (".jpg", ".json"):
            if name.startswith("sa_") and name.endswith(part):
                return name[: -len(part)], part
        return None

    def _sample(self, shard: ShardRef, group: MemberGroup) -> ImageSample:
        record: SA1BRecord = _parse_json(group, ".json", SA1BRecord)
        jpeg = group.data(".jpg")
        member = group.member(".jpg")
        jpg_name = member.rsplit("/", 1)[-1]
        if record.image.file_name != jpg_name:
            raise SampleError(f"JSON file_name {record.image.file_name!r} does not match tar member {jpg_name!r}", group.member(".json"))
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(jpeg)
        except ValueError as exc:
            raise SampleError(f"{jpg_name} is not a readable JPEG: {exc}", member) from None
        if height * width > MAX_IMAGE_PIXELS:
            raise SampleError(
                f"{jpg_name} is {width}x{height} ({height * width / 1e6:.0f} MP), over the "
                f"{MAX_IMAGE_PIXELS / 1e6:.0f} MP an image may have (SA-1B's are ~3 MP)",
                member,
            )
        if self.check_pixels:
            try:
                simplejpeg.decode_jpeg(jpeg, min_height=1, min_width=1)
            except ValueError as exc:
                raise SampleError(f"{jpg_name} is not a readable JPEG: {exc}", member) from None
        if (height, width) != (record.image.height, record.image.width):
            raise SampleError(f"{jpg_name} is {width}x{height} but its JSON says {record.image.width}x{record.image.height}", member)
        masks = tuple(_runs(ann.segmentation, f"annotation {ann.id}", group.member(".json")) for ann in record.annotations)
        return ImageSample(
            key=f"sa1b/{record.image.image_id}",
            shard=shard.name,
            member=member,
            jpeg=jpeg,
            record=record,
            masks=masks,
        )


FrameSelection = Literal["annotated", "all"]


class SAVSource(_ShardedSource):
    """SA-V: one :class:`VideoSample` (key ``sav/<video_id>``, decoded frames, masklets) per video.

    ``frames="annotated"`` keeps every 4th frame (the frames ``masklet`` annotates), ``"all"`` keeps all;
    ``max_frames`` caps how many are kept (from the start) to bound memory on long videos.
    """

    dataset = DatasetName.SAV
    required = frozenset({".mp4", "_manual.json"})

    def __init__(
        self,
        source: str,
        storage_options: dict[str, Any] | None = None,
        frames: FrameSelection = "annotated",
        max_frames: int | None = None,
    ) -> None:
        super().__init__(source, storage_options)
        if frames not in ("annotated", "all"):
            raise ValueError(f"frames must be 'annotated' or 'all', got {frames!r}")
        if max_frames is not None and max_frames <= 0:
            raise ValueError(f"max_frames must be positive, got {max_frames}")
        self.frames = frames
        self.max_frames = max_frames

    @staticmethod
    def _split(name: str) -> tuple[str, str] | None:
        if not name.startswith("sav_"):
            return None
        for part in (".mp4", "_manual.json"):
            if name.endswith(part):
                return name[: -len(part)], part
        return None

    def _sample(self, shard: ShardRef, group: MemberGroup) -> VideoSample:
        record: SAVRecord = _parse_json(group, "_manual.json", SAVRecord)
        member = group.member(".mp4")
        name = member.rsplit("/", 1)[-1]
        if record.video_id != group.stem:
            raise SampleError(f"JSON video_id {record.video_id!r} does not match tar member {member!r}", group.member("_manual.json"))
        masks = tuple(
            tuple(
                _runs(rle, f"masklet[{t}][{j}] (object {record.masklet_id[j]})", group.member("_manual.json"))
                for j, rle in enumerate(objects)
            )
            for t, objects in enumerate(record.masklet)
        )
        stride = SAV_ANNOTATION_STRIDE if self.frames == "annotated" else 1
        size = (record.video_height, record.video_width)
        kept = -(-record.video_frame_count // stride)
        if self.max_frames is not None:
            kept = min(kept, self.max_frames)
        if kept * size[0] * size[1] * 3 > MAX_VIDEO_BYTES:
            raise SampleError(
                f"{name}: {kept} frames of {size[1]}x{size[0]} would hold {_gb(kept * size[0] * size[1] * 3)} "
                f"decoded, over the {_gb(MAX_VIDEO_BYTES)} a video may take: lower --max-frames",
                member,
            )
        try:
            frames, indices, total = _decode_video(group.data(".mp4"), size, stride, self.max_frames)
        except SampleError as exc:
            raise SampleError(f"{name}: {exc}", member) from None
        if total is not None and total != record.video_frame_count:
            raise SampleError(
                f"{name} has {total} frames but its JSON video_frame_count is "
                f"{record.video_frame_count} (masklet covers {len(record.masklet)} annotated frames)",
                member,
            )
        return VideoSample(
            key=f"sav/{record.video_id}",
            shard=shard.name,
            member=member,
            frames=frames,
            frame_indices=indices,
            record=record,
            masks=masks,
        )


def _decode_video(data: bytes, size: tuple[int, int], stride: int, max_frames: int | None) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Decode every ``stride``-th frame as RGB; returns (frames, indices, total frame count or None if stopped early).

    H.264 must be decoded in order, so frames in between are decoded and dropped. Every frame must be
    ``size`` = (height, width) and the stream must be SA-V's 24 fps, or frame indices would not line up
    with the masklets.
    """
    kept: list[np.ndarray] = []
    indices: list[int] = []
    count = 0
    try:
        with av.open(io.BytesIO(data), mode="r", metadata_errors="replace") as container:
            if not container.streams.video:
                raise SampleError("no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            if rate is None or abs(float(rate) - SAV_FPS) > 0.01:
                raise SampleError(f"frame rate is {float(rate) if rate else 'unknown'} fps, SA-V videos are {SAV_FPS} fps")
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                if (frame.height, frame.width) != size:
                    raise SampleError(f"frame {count} is {frame.width}x{frame.height} but the JSON says {size[1]}x{size[0]}")
                if count % stride == 0:
                    if max_frames is not None and len(kept) == max_frames:
                        return np.stack(kept), np.asarray(indices, dtype=np.int64), None
                    kept.append(frame.to_ndarray(format="rgb24"))
                    indices.append(count)
                count += 1
    except av.FFmpegError as exc:
        raise SampleError(f"not a readable video: {exc}") from None
    if not kept:
        raise SampleError("no decodable frames")
    return np.stack(kept), np.asarray(indices, dtype=np.int64), count
