"""Cache step 1 (CPU): stream one shard into WORK batches, ready for the teacher.

SA-1B: decoded, resized pixels and sampled prompts per image. SA-V: per video, the annotated frames resized to
the teacher frame and each object's ground-truth prompt. Bad samples become ``failure`` rows (the source's
checks, plus JPEGs that fail to decode here); the shard ends with one ``end`` row counting the store rows and
failures it will make, which is how the driver knows the shard is complete.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from esam3.pipeline.object_store import access_refused
from esam3.pipeline.shards import ShardRef
from esam3.pipeline.tar_stream import ShardReadError
from esam3.pipeline.sources import SA1BSource, SAVSource
from esam3.schemas.codecs import encode_png
from esam3.schemas.prompts import PromptConfig
from esam3.schemas.sav import SAV_ANNOTATION_STRIDE
from esam3.schemas.samples import Failure, ImageSample, VideoSample
from esam3.schemas.teacher import VideoTargetConfig
from esam3.schemas.errors import first_line
from esam3.schemas.work import KIND_ABORT, KIND_END, KIND_FAILURE, KIND_SAMPLE, WORK
from esam3.workers.decode import decode_for_teacher
from esam3.workers.preprocess import transform_record
from esam3.workers.prompts import sample_prompts
from esam3.workers.video_targets import prepare_video

log = logging.getLogger(__name__)
#: The pause before the first read of a shard again (doubling each time): a reset connection or a 5xx must not
#: cost an 11k-image shard (``--read-retries`` sets how many times).
RETRY_PAUSE_S = 2.0


class _ReadShard:
    """Shared loop: items of one shard -> WORK tables of at most ``batch_rows`` rows, then the end row."""

    batch_rows: int
    read_retries: int

    def __call__(self, shard: ShardRef) -> Iterator[pa.Table]:
        try:
            yield from self._batches(shard)
        except ShardReadError as exc:  # I/O, not bad data: this shard is left for a rerun, the others go on
            log.warning("%s: reading failed, the shard stays uncommitted in this run: %s", shard.name, exc)
            abort = {"kind": KIND_ABORT, "dataset": shard.dataset.value, "shard": shard.name, "reason": first_line(exc)}
            yield pa.Table.from_pylist([abort], schema=WORK)

    def _retried(self, shard: ShardRef, retries: list[int]) -> Iterator[Any]:
        """The shard's items; on a transient I/O error the shard is read again from its start (a tar stream has no
        random access) and the items already given are skipped, ``read_retries`` times at most; ``retries`` counts.
        A refusal or a missing file is not transient: no retry."""
        given, attempts = 0, self.read_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                for position, item in enumerate(self.items(shard)):
                    if position >= given:
                        given += 1
                        yield item
                return
            except ShardReadError as exc:
                if isinstance(exc.__cause__, (PermissionError, FileNotFoundError)) or access_refused(exc):
                    raise
                if attempt == attempts == 1:
                    raise
                if attempt == attempts:
                    raise ShardReadError(f"{exc} (read {attempts} times)") from exc
                pause = RETRY_PAUSE_S * 2 ** (attempt - 1)
                log.warning(
                    "%s: %s; reading it again in %.0f s (attempt %d of %d)", shard.name, first_line(exc), pause, attempt + 1, attempts
                )
                retries[0] += 1
                time.sleep(pause)

    def _batches(self, shard: ShardRef) -> Iterator[pa.Table]:
        rows: list[dict[str, Any]] = []
        store_rows = samples = 0
        seen: set[str] = set()
        retries = [0]
        for item in self._retried(shard, retries):
            samples += 1
            if not isinstance(item, Failure) and item.key in seen:
                item = Failure(shard.dataset.value, shard.name, item.member, f"duplicate key {item.key} in the shard; kept the first")
            elif not isinstance(item, Failure):
                seen.add(item.key)
            row = self._checked_row(shard, item)
            store_rows += row["frames"] if row.get("frames") is not None else 1  # a video makes a row per frame
            rows.append(row)
            if len(rows) == self.batch_rows:
                yield pa.Table.from_pylist(rows, schema=WORK)
                rows = []
        rows.append(
            {
                "kind": KIND_END,
                "dataset": shard.dataset.value,
                "shard": shard.name,
                "count": store_rows,
                "samples": samples,
                "retries": retries[0],
            }
        )
        yield pa.Table.from_pylist(rows, schema=WORK)

    def _checked_row(self, shard: ShardRef, item: Any) -> dict[str, Any]:
        """The row, or a failure row if preparing it raised: one odd sample must not stop the shard."""
        try:
            return self.row(shard, item)
        except Exception as exc:  # noqa: BLE001 - logged with its traceback, kept as a failure
            log.exception("unexpected error preparing %s:%s", shard.name, getattr(item, "member", "?"))
            member = getattr(item, "member", "?")
            return failure_row(Failure(shard.dataset.value, shard.name, member, f"unexpected error ({type(exc).__name__}): {exc}"))

    def items(self, shard: ShardRef) -> Iterator[Any]:
        raise NotImplementedError

    def row(self, shard: ShardRef, item: Any) -> dict[str, Any]:
        raise NotImplementedError


@dataclass(frozen=True)
class ReadImages(_ReadShard):
    """Callable on one shard; yields WORK tables of at most ``batch_rows`` rows."""

    source: str
    image_size: int
    prompts: PromptConfig
    with_prompts: bool = True
    dct_scaling: bool = False
    store_inputs: bool = True
    batch_rows: int = 8
    read_retries: int = 3
    storage_options: dict[str, Any] | None = field(default=None, repr=False)  # may hold credentials

    def items(self, shard: ShardRef) -> Iterator[Failure | ImageSample]:
        yield from SA1BSource(self.source, self.storage_options, check_pixels=False).iter_shard(shard)  # decoded below

    def row(self, shard: ShardRef, item: Failure | ImageSample) -> dict[str, Any]:
        if isinstance(item, Failure):
            return failure_row(item)
        try:
            pixels, original, decoded = decode_for_teacher(item.jpeg, self.image_size, self.dct_scaling)
        except (ValueError, RuntimeError) as exc:  # simplejpeg raises ValueError on corrupt data
            return failure_row(Failure(shard.dataset.value, shard.name, item.member, f"JPEG does not decode: {exc}"))
        row: dict[str, Any] = {
            "kind": KIND_SAMPLE,
            "dataset": shard.dataset.value,
            "shard": shard.name,
            "key": item.key,
            "member": item.member,
            "image_id": item.record.image.image_id,
            "height": original[0],
            "width": original[1],
            "transform": json.dumps(transform_record(original, self.image_size, decoded), sort_keys=True),
            "pixels": pixels.numpy().tobytes(),
            "jpeg": item.jpeg if self.store_inputs else None,
            "k": 0,
            "gt_masks": "[]",
        }
        if self.with_prompts:
            prompts = sample_prompts(item.key, item.masks, original, self.image_size, self.prompts)
            row.update(
                k=len(prompts),
                prompt_mask_index=prompts.mask_index.astype(np.int32).tobytes(),
                prompt_kinds=prompts.kinds.astype(np.int8).tobytes(),
                prompt_points=prompts.points_model.astype(np.float32).tobytes(),
                prompt_labels=prompts.labels.astype(np.int8).tobytes(),
                prompt_boxes=prompts.boxes_model.astype(np.float32).tobytes(),
                gt_masks=json.dumps([rle_value(item.record.annotations[i].segmentation) for i in prompts.mask_index.tolist()]),
            )
        return row


def rle_value(rle: Any) -> dict[str, Any]:
    """A source's COCO RLE (``size`` = [h, w], ``counts``) as the store's ``RLE`` struct value."""
    return {"height": int(rle.size[0]), "width": int(rle.size[1]), "counts": rle.counts}


def failure_row(failure: Failure) -> dict[str, Any]:
    return {
        "kind": KIND_FAILURE,
        "dataset": failure.dataset,
        "shard": failure.shard,
        "member": failure.member,
        "reason": failure.reason,
    }


@dataclass(frozen=True)
class ReadVideos(_ReadShard):
    """Callable on one SA-V shard; one WORK row per video (its annotated frames and object prompts)."""

    source: str
    image_size: int
    video: VideoTargetConfig
    store_inputs: bool = True
    batch_rows: int = 1
    read_retries: int = 3
    storage_options: dict[str, Any] | None = field(default=None, repr=False)  # may hold credentials

    def items(self, shard: ShardRef) -> Iterator[Failure | VideoSample]:
        # Keep only the annotated frames that will be used (max_frames of them).
        yield from SAVSource(self.source, self.storage_options, max_frames=self.video.max_frames).iter_shard(shard)

    def row(self, shard: ShardRef, item: Failure | VideoSample) -> dict[str, Any]:
        if isinstance(item, Failure):
            return failure_row(item)
        work = prepare_video(item, self.video, self.image_size)
        masks = [p.mask for p in work.prompts if p.mask is not None]
        prompts, mask_index = [], 0
        for p in work.prompts:
            prompts.append(
                {
                    "object_id": p.object_id,
                    "frame": p.frame,
                    "kind": p.kind.value,
                    "points": None if p.points is None else p.points.tolist(),
                    "labels": None if p.labels is None else p.labels.tolist(),
                    "mask_index": mask_index if p.mask is not None else None,
                }
            )
            mask_index += p.mask is not None
        height, width = item.frames.shape[1:3]
        column = {object_id: j for j, object_id in enumerate(item.record.masklet_id)}
        frame_masks = [
            {
                str(p.object_id): rle_value(item.record.masklet[int(index) // SAV_ANNOTATION_STRIDE][column[p.object_id]])
                for p in work.prompts
            }
            for index in work.frame_indices.tolist()
        ]
        return {
            "kind": KIND_SAMPLE,
            "dataset": shard.dataset.value,
            "shard": shard.name,
            "key": item.key,
            "member": item.member,
            "height": int(height),
            "width": int(width),
            "transform": json.dumps(transform_record((int(height), int(width)), self.image_size), sort_keys=True),
            "pixels": work.pixels.tobytes(),
            "frames": len(work.pixels),
            "video_frames": work.video_frames,
            "frame_indices": work.frame_indices.astype(np.int64).tobytes(),
            "video_prompts": json.dumps(prompts),
            "prompt_masks": np.stack(masks).astype(np.float32).tobytes() if masks else b"",
            "frame_inputs": [encode_png(frame.transpose(1, 2, 0)).data for frame in work.pixels] if self.store_inputs else None,
            "frame_masks": json.dumps(frame_masks),
        }
