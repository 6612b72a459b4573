"""Cache steps 3 and 4 (CPU): store rows from the targets, then write Lance fragments (not committed).

The teacher actor quantised the targets on its device (``esam3.workers.device_codecs``); ``EncodeImages`` /
``EncodeFrames`` (per teacher block: TARGETS -> ENCODED rows) wrap its codes as stored tensors, zstd-compress the
logits' codes and add the rows' provenance;
``WriteFragments`` hands each shard's rows to the ``ShardWriter`` that streams that shard into its own fragment
(``workers/shard_writer.py``) and returns WRITTEN rows: progress, and a shard's totals (fragments, failures, end
marker) once it is written. Only the driver commits, so a writer that dies or is retried leaves at most an orphan
data file, never a visible row.
"""

from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from esam3.schemas.codecs import LOGIT_CODEC, LOGIT_CODECS, CodecError, Encoded, FeatureCodec, compress_logits, map_codec, payload_bytes
from esam3.schemas.prompts import MaskOutputs
from esam3.schemas.store import FRAMES, IMAGES, raw_tensor, tensor_value
from esam3.schemas.work import KIND_ABORT, KIND_END, KIND_FAILURE, KIND_SAMPLE, WRITTEN
from esam3.workers.heads import Geometry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _EncodeTable:
    """Shared: turn a batch's samples into store rows with the run's codecs; control rows pass through."""

    geometry: Geometry
    codec: FeatureCodec
    teacher: str  # checksum
    run_id: str
    prompt_seed: int
    store_trunk: bool = True

    schema: Any = None  # the store table's schema, set by each subclass

    def store_row(self, row: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def provenance(self, row: dict[str, Any]) -> dict[str, Any]:
        out = {name: row[name] for name in ("key", "shard", "member", "height", "width", "precision")}
        out.update(
            run_id=self.run_id,
            teacher=self.teacher,
            codec=self.codec.value,
            preprocess=row["transform"],
            prompt_seed=self.prompt_seed,
            gt_masks=json.loads(row["gt_masks"]),
        )
        if self.store_trunk:
            g = self.geometry
            out["trunk"] = received_tensor(row, "trunk", self.codec.value, (g.trunk_width, g.grid, g.grid))
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        """TARGETS rows -> ENCODED rows: store rows (``kind`` sample) and the control rows passed on."""
        out = []
        for row in batch.to_pylist():
            kind = row["kind"]
            control = {"kind": kind, "shard": row["shard"], "member": row.get("member"), "reason": row.get("reason")}
            if kind == KIND_SAMPLE:
                try:
                    stored = self.store_row(row)
                except (CodecError, ValueError) as exc:  # e.g. NaN targets: this row fails, the shard goes on
                    log.warning("%s: cannot store %s: %s", row["shard"], row["key"], exc)
                    out.append({**control, "kind": KIND_FAILURE, "reason": f"targets of {row['key']} not stored: {exc}", "weight": 1})
                    continue
                out.append({**stored, "kind": kind, "stored_bytes": stored_bytes(stored)})
            elif kind == KIND_FAILURE:
                out.append({**control, "weight": 1 if row.get("count") is None else row["count"]})
            elif kind == KIND_END:
                out.append({**control, "end_count": row["count"], "end_samples": row["samples"], "end_retries": row.get("retries") or 0})
            elif kind == KIND_ABORT:
                out.append(control)
        return pa.Table.from_pylist(out, schema=encoded_schema(self.schema))


#: What the encode step adds to a store row, or holds alone in a control row (failure / end / abort of a shard).
CONTROL = [
    ("kind", pa.string()),
    ("reason", pa.string()),
    ("weight", pa.int64()),
    ("end_count", pa.int64()),
    ("end_samples", pa.int64()),
    ("end_retries", pa.int64()),
    ("stored_bytes", pa.int64()),
]


def encoded_schema(table_schema: pa.Schema) -> pa.Schema:
    """ENCODED blocks: the store table's columns (null in control rows) + the control columns."""
    return pa.schema([*table_schema, *CONTROL])


@dataclass(frozen=True)
class WriteFragments:
    """Cache step 4 (CPU): ENCODED rows -> each shard's piece to the ``ShardWriter`` that streams that shard ->
    WRITTEN rows (progress, and a shard's totals when its writer finishes it).

    ``writers`` are ``ShardWriter`` actors (Ray) or instances (the in-process loop); a shard always goes to the same
    one (a hash of its name), so each shard is one stream and one fragment. Nothing is committed here.
    """

    writers: tuple[Any, ...]

    def __call__(self, batch: pa.Table) -> pa.Table:
        shards = batch.column("shard").to_pylist()
        out = []
        for shard in dict.fromkeys(shards):
            positions = [i for i, s in enumerate(shards) if s == shard]
            writer = self.writers[zlib.crc32(shard.encode()) % len(self.writers)]
            piece = _rows_at(batch, positions)
            out.append(ray_get(writer.add.remote(shard, piece)) if hasattr(writer.add, "remote") else writer.add(shard, piece))
        return pa.Table.from_pylist(out, schema=WRITTEN)


def ray_get(ref: Any) -> Any:
    import ray

    return ray.get(ref)


def _rows_at(table: pa.Table, positions: list[int]) -> pa.Table:
    """The rows at ``positions``: a zero-copy slice when they are contiguous (the usual case: a bundle holds runs of
    one shard's rows), else a take (copies the multi-MB blobs once)."""
    if not positions:
        return table.slice(0, 0)
    if positions[-1] - positions[0] == len(positions) - 1:
        return table.slice(positions[0], len(positions))
    return table.take(pa.array(positions, type=pa.int64()))


@dataclass(frozen=True)
class EncodeImages(_EncodeTable):
    """SA-1B: TARGETS batch -> ENCODED ``images`` rows; the prompt logits as ``mask_outputs`` kept them, at
    ``mask_size`` (None: the decoder's own)."""

    schema: Any = IMAGES
    mask_outputs: MaskOutputs = MaskOutputs.CHOSEN
    mask_size: int | None = None

    def store_row(self, row: dict[str, Any]) -> dict[str, Any]:
        g = self.geometry
        k = row["k"]
        out = self.provenance(row)
        out["image_id"] = row["image_id"]
        for name in ("codec_mask_iou", "codec_iou_error", "logits_mask_iou"):
            out[name] = row.get(name)
        if row["jpeg"] is not None:  # the original file: decoded through the transform record it is the teacher's input
            out["input"] = tensor_value(Encoded("jpeg", (row["height"], row["width"], 3), row["jpeg"]), 0.0)
        if k:
            out["prompt_mask_index"] = raw_tensor(np.frombuffer(row["prompt_mask_index"], dtype=np.int32))
            out["prompt_kinds"] = raw_tensor(np.frombuffer(row["prompt_kinds"], dtype=np.int8))
            out["prompt_points"] = raw_tensor(np.frombuffer(row["prompt_points"], dtype=np.float32).reshape(k, -1, 2))
            out["prompt_labels"] = raw_tensor(np.frombuffer(row["prompt_labels"], dtype=np.int8).reshape(k, -1))
            out["prompt_boxes"] = raw_tensor(np.frombuffer(row["prompt_boxes"], dtype=np.float32).reshape(k, 4))
            m = self.mask_size or g.mask_size
            if self.mask_outputs == MaskOutputs.CHOSEN:
                out["chosen_logits"] = received_tensor(row, "chosen_logits", LOGIT_CODEC, (k, m, m))
            else:
                for name, maps in (("multi_logits", 3), ("single_logits", 1)):
                    out[name] = received_tensor(row, name, LOGIT_CODEC, (k, maps, m, m))
            out["chosen_output"] = raw_tensor(_array(row["chosen_output"], (k,)).astype(np.int8))
            out["iou"] = target_tensor("iou", np.frombuffer(row["iou"], dtype=np.float32).reshape(k, 4))
            out["object_score"] = target_tensor("object_score", np.frombuffer(row["object_score"], dtype=np.float32))
            out["object_pointer"] = target_tensor(
                "object_pointer", np.frombuffer(row["object_pointer"], dtype=np.float32).reshape(k, g.hidden)
            )
        return out


def received_tensor(row: dict[str, Any], name: str, codec: str, shape: tuple[int, ...]) -> dict[str, Any]:
    """A target the teacher quantised (codes, scales, measured error: ``<name>``, ``<name>_scale``, ``<name>_error``)
    as a stored tensor; mask-logit codes are filtered and zstd-compressed here, on the CPU."""
    data, scale = row[name], row[f"{name}_scale"]
    if (len(data), len(scale)) != payload_bytes(codec, shape, rank=len(scale) // 4):
        raise CodecError(f"{name}: {len(data)} + {len(scale)} bytes of {codec} codes and scales do not hold {shape}")
    if codec in LOGIT_CODECS:
        data = compress_logits(data, shape, codec)
    return tensor_value(Encoded(codec, shape, data, scale), row[f"{name}_error"])


def target_tensor(name: str, array: np.ndarray) -> dict[str, Any]:
    """A small teacher output stored exactly; NaN or Inf fails the row (inputs like prompt boxes may hold NaN)."""
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or Inf; refusing to store it")
    return raw_tensor(array)


def stored_bytes(row: dict[str, Any]) -> int:
    """Bytes of a store row's tensors (data + scales): what the report and the plan count."""
    return sum(len(v["data"]) + len(v["scale"]) for v in row.values() if isinstance(v, dict) and "data" in v)


@dataclass(frozen=True)
class EncodeFrames(_EncodeTable):
    """SA-V: FRAME_TARGETS batch -> ENCODED ``frames`` rows."""

    schema: Any = FRAMES

    def store_row(self, row: dict[str, Any]) -> dict[str, Any]:
        g = self.geometry
        n = len(row["object_ids"])
        out = self.provenance(row)
        for name in ("video_id", "frame", "frame_index", "prompt_kind", "object_ids", "is_conditioning", "has_memory_conditioned"):
            out[name] = row[name]
        if row["input"] is not None:  # lossless: the S x S frame the teacher saw
            out["input"] = tensor_value(Encoded("png", (g.image_size, g.image_size, 3), row["input"]), 0.0)
        out["mask_logits"] = received_tensor(row, "mask_logits", LOGIT_CODEC, (n, g.mask_size, g.mask_size))
        out["object_score"] = target_tensor("object_score", _array(row["object_score"], (n,)))
        out["object_pointer"] = target_tensor("object_pointer", _array(row["object_pointer"], (n, g.hidden)))
        for name, channels in (("maskmem_features", g.memory_channels), ("pix_feat_with_mem", g.hidden)):
            out[name] = received_tensor(row, name, map_codec(self.codec).value, (n, channels, g.grid, g.grid))
        return out


def _array(blob: bytes, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(blob, dtype=np.float32).reshape(shape)
