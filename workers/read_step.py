"""Cache step 1 (CPU): stream one SA-1B shard into WORK batches: decoded, resized pixels and sampled prompts.

Bad samples become ``failure`` rows (the source's checks, plus JPEGs that fail to decode here); the shard ends
with one ``end`` row counting everything it sent, which is how the driver knows the shard is complete.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from esam3.pipeline.shards import ShardRef
from esam3.pipeline.sources import SA1BSource
from esam3.schemas.prompts import PromptConfig
from esam3.schemas.samples import Failure, ImageSample
from esam3.schemas.work import KIND_END, KIND_FAILURE, KIND_SAMPLE, WORK
from esam3.workers.decode import decode_for_teacher
from esam3.workers.preprocess import transform_record
from esam3.workers.prompts import sample_prompts


@dataclass(frozen=True)
class ReadImages:
    """Callable on one shard; yields WORK tables of at most ``batch_rows`` rows."""

    source: str
    image_size: int
    prompts: PromptConfig
    with_prompts: bool = True
    dct_scaling: bool = True
    batch_rows: int = 8
    storage_options: dict[str, Any] | None = None

    def __call__(self, shard: ShardRef) -> Iterator[pa.Table]:
        source = SA1BSource(self.source, self.storage_options, check_pixels=False)  # the decode below checks pixels
        rows: list[dict[str, Any]] = []
        sent = 0
        for item in source.iter_shard(shard):
            rows.append(self._row(shard, item))
            if len(rows) == self.batch_rows:
                sent += len(rows)
                yield pa.Table.from_pylist(rows, schema=WORK)
                rows = []
        sent += len(rows)
        rows.append({"kind": KIND_END, "dataset": shard.dataset.value, "shard": shard.name, "count": sent})
        yield pa.Table.from_pylist(rows, schema=WORK)

    def _row(self, shard: ShardRef, item: Failure | ImageSample) -> dict[str, Any]:
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
            "k": 0,
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
            )
        return row


def failure_row(failure: Failure) -> dict[str, Any]:
    return {
        "kind": KIND_FAILURE, "dataset": failure.dataset, "shard": failure.shard, "member": failure.member,
        "reason": failure.reason,
    }
