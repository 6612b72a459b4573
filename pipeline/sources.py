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
from esam3.pipeline.tar_stream import MemberGroup, iter_member_groups
from esam3.schemas.errors import describe
from esam3.schemas.rle import RLEError, Runs, parse_counts
from esam3.schemas.samples import Failure, ImageSample, VideoSample
from esam3.schemas.sa1b import RLE, SA1BRecord
from esam3.schemas.sav import SAV_ANNOTATION_STRIDE, SAVRecord
from esam3.schemas.shards import ShardSpec

log = logging.getLogger(__name__)


class SampleError(ValueError):
    """A sample that cannot be used; the message becomes the failure reason."""


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
        with fsspec.open(shard.url, "rb", **self.storage_options) as fileobj:
            for item in iter_member_groups(fileobj, self._split, self.required, self.dataset.value, shard.name):
                if isinstance(item, Failure):
                    log.info("%s", item)
                    yield item
                    continue
                try:
                    yield self._sample(shard, item)
                except SampleError as exc:
                    failure = Failure(self.dataset.value, shard.name, item.first_member, str(exc))
                    log.info("%s", failure)
                    yield failure

    @staticmethod
    def _split(name: str) -> tuple[str, str] | None:
        raise NotImplementedError

    def _sample(self, shard: ShardRef, group: MemberGroup) -> Any:
        raise NotImplementedError


def _parse_json(group: MemberGroup, part: str, model: type) -> Any:
    try:
        return model.model_validate(json.loads(group.data(part)))
    except json.JSONDecodeError as exc:
        raise SampleError(f"{group.member(part)} is not valid JSON: {exc}") from None
    except ValidationError as exc:
        raise SampleError(f"{group.member(part)} does not match the {model.__name__} schema: {describe(exc)}") from None


def _runs(rle: RLE, where: str) -> Runs:
    try:
        return parse_counts(rle.counts, *rle.size)
    except RLEError as exc:
        raise SampleError(f"{where}: bad RLE: {exc}") from None


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
        jpg_name = group.member(".jpg").rsplit("/", 1)[-1]
        if record.image.file_name != jpg_name:
            raise SampleError(f"JSON file_name {record.image.file_name!r} does not match tar member {jpg_name!r}")
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(jpeg)
            if self.check_pixels:
                simplejpeg.decode_jpeg(jpeg, min_height=1, min_width=1)
        except ValueError as exc:
            raise SampleError(f"{jpg_name} is not a readable JPEG: {exc}") from None
        if (height, width) != (record.image.height, record.image.width):
            raise SampleError(
                f"{jpg_name} is {width}x{height} but its JSON says {record.image.width}x{record.image.height}"
            )
        masks = tuple(_runs(ann.segmentation, f"annotation {ann.id}") for ann in record.annotations)
        return ImageSample(
            key=f"sa1b/{record.image.image_id}", shard=shard.name, member=jpg_name, jpeg=jpeg, record=record,
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
        mp4_name = group.member(".mp4").rsplit("/", 1)[-1]
        if record.video_id != group.stem:
            raise SampleError(f"JSON video_id {record.video_id!r} does not match tar member {mp4_name!r}")
        masks = tuple(
            tuple(_runs(rle, f"masklet[{t}][{j}] (object {record.masklet_id[j]})") for j, rle in enumerate(objects))
            for t, objects in enumerate(record.masklet)
        )
        stride = SAV_ANNOTATION_STRIDE if self.frames == "annotated" else 1
        frames, indices, total = _decode_video(group.data(".mp4"), mp4_name, stride, self.max_frames)
        if frames.shape[1:3] != (record.video_height, record.video_width):
            raise SampleError(
                f"{mp4_name} frames are {frames.shape[2]}x{frames.shape[1]} but its JSON says "
                f"{record.video_width}x{record.video_height}"
            )
        if total is not None and total != record.video_frame_count:
            raise SampleError(
                f"{mp4_name} has {total} frames but its JSON video_frame_count is {record.video_frame_count} "
                f"(masklet covers {len(record.masklet)} annotated frames)"
            )
        return VideoSample(
            key=f"sav/{record.video_id}", shard=shard.name, member=mp4_name,
            frames=frames, frame_indices=indices, record=record, masks=masks,
        )


def _decode_video(data: bytes, name: str, stride: int, max_frames: int | None) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Decode every ``stride``-th frame as RGB; returns (frames, indices, total frame count or None if stopped early).

    H.264 must be decoded in order, so frames in between are decoded and dropped.
    """
    kept: list[np.ndarray] = []
    indices: list[int] = []
    count = 0
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise SampleError(f"{name} has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                if count % stride == 0:
                    if max_frames is not None and len(kept) == max_frames:
                        return np.stack(kept), np.asarray(indices, dtype=np.int64), None
                    kept.append(frame.to_ndarray(format="rgb24"))
                    indices.append(count)
                count += 1
    except av.FFmpegError as exc:
        raise SampleError(f"{name} is not a readable video: {exc}") from None
    if not kept:
        raise SampleError(f"{name} has no decodable frames")
    return np.stack(kept), np.asarray(indices, dtype=np.int64), count

