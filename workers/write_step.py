"""Cache steps 3 and 4 (CPU): encode the targets with the run's codecs, then write Lance fragments (not committed).

Encoding runs per teacher block (``EncodeImages`` / ``EncodeFrames``: TARGETS -> ENCODED rows, 4-5x smaller);
writing (``WriteFragments``) runs on bundles of ``--fragment-rows`` encoded rows, so fragments hold many teacher
blocks. The writer returns one WRITTEN row per shard in its bundle: the fragments' metadata, the failures seen, and
the shard's end marker if it passed. Only the driver commits, so a writer that dies or is retried leaves at most
an orphan data file, never a visible row.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from lance.fragment import write_fragments

from esam3.pipeline.object_store import ACCESS_HINT, access_refused, storage_failed
from esam3.schemas.codecs import Basis, CodecError, Encoded, FeatureCodec, encode_features, encode_logits
from esam3.schemas.store import FRAMES, IMAGES, LANCE_FILE_VERSION, StoreError, raw_tensor, tensor_value
from esam3.schemas.errors import first_line
from esam3.schemas.work import KIND_ABORT, KIND_END, KIND_FAILURE, KIND_SAMPLE, WRITTEN
from esam3.workers.heads import Geometry

log = logging.getLogger(__name__)
#: Low-rank bases read from stores, per worker process.
_BASES: dict[tuple[str, str, Any], Basis] = {}
#: A basis file is final once it has been in place this long (see ``Store.read_basis``).
BASIS_SETTLE_SECONDS = 5.0


@dataclass(frozen=True)
class _EncodeTable:
    """Shared: turn a batch's samples into store rows with the run's codecs; control rows pass through."""

    geometry: Geometry
    codec: FeatureCodec
    teacher: str  # checksum
    run_id: str
    prompt_seed: int
    store_trunk: bool = True
    basis_source: tuple[str, str, Any] | None = None  # (store URI, dataset, S3 settings) of the low-rank basis

    schema: Any = None  # the store table's schema, set by each subclass

    @property
    def map_codec(self) -> FeatureCodec:
        """Codec of the per-object feature maps: low-rank applies to the trunk only, the rest go int8."""
        return FeatureCodec.INT8 if self.codec == FeatureCodec.LOWRANK else self.codec

    def basis(self) -> Basis | None:
        if self.codec != FeatureCodec.LOWRANK or self.basis_source is None:
            return None
        if self.basis_source not in _BASES:
            from esam3.pipeline.store import Store

            uri, dataset, s3 = self.basis_source
            found = Store(uri, s3).read_basis(dataset, settle=BASIS_SETTLE_SECONDS)
            if found is None:
                raise CodecError("the low-rank basis is not in the store yet (the teacher step writes it first)")
            _BASES[self.basis_source] = found
        return _BASES[self.basis_source]

    def store_row(self, row: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def provenance(self, row: dict[str, Any]) -> dict[str, Any]:
        out = {name: row[name] for name in ("key", "shard", "member", "height", "width", "precision")}
        out.update(run_id=self.run_id, teacher=self.teacher, codec=self.codec.value, preprocess=row["transform"],
                   prompt_seed=self.prompt_seed, gt_masks=json.loads(row["gt_masks"]))
        if self.store_trunk:
            g = self.geometry
            trunk = np.frombuffer(row["trunk"], dtype=np.float32).reshape(g.trunk_width, g.grid, g.grid)
            out["trunk"] = tensor_value(*encode_features(trunk, self.codec, self.basis()))
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
                out.append({**control, "end_count": row["count"], "end_samples": row["samples"]})
            elif kind == KIND_ABORT:
                out.append(control)
        return pa.Table.from_pylist(out, schema=encoded_schema(self.schema))


#: What the encode step adds to a store row, or holds alone in a control row (failure / end / abort of a shard).
CONTROL = [("kind", pa.string()), ("reason", pa.string()), ("weight", pa.int64()), ("end_count", pa.int64()),
           ("end_samples", pa.int64()), ("stored_bytes", pa.int64())]


def encoded_schema(table_schema: pa.Schema) -> pa.Schema:
    """ENCODED blocks: the store table's columns (null in control rows) + the control columns."""
    return pa.schema([*table_schema, *CONTROL])


@dataclass(frozen=True)
class WriteFragments:
    """Cache step 4 (CPU): ENCODED rows, many teacher blocks bundled -> Lance fragments per shard -> WRITTEN rows.

    Bundling is what keeps fragments big: one fragment per teacher block of 8 rows would make ~1.4M fragments for
    SA-1B (every commit rereads a manifest listing them all); the plan hands this step ``fragment_rows`` rows at a
    time. Nothing is committed here: the driver commits each shard once all of its rows are written.
    """

    table_uri: str
    schema: Any  # the store table's schema
    storage_options: dict[str, str] | None = field(default=None, repr=False)  # may hold credentials

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        small = batch.select(["shard", "kind", "member", "reason", *_ENDS, "weight"]).to_pylist()
        for shard in dict.fromkeys(r["shard"] for r in small):
            positions = [i for i, r in enumerate(small) if r["shard"] == shard and r["kind"] == KIND_SAMPLE]
            samples = _rows_at(batch, positions)
            control = [r for r in small if r["shard"] == shard and r["kind"] != KIND_SAMPLE]
            aborted = next((c["reason"] for c in control if c["kind"] == KIND_ABORT), None)
            end = next((c for c in control if c["kind"] == KIND_END), {"end_count": -1, "end_samples": -1})
            failures = [{"member": c["member"], "reason": c["reason"], "weight": c["weight"]} for c in control if c["kind"] == KIND_FAILURE]
            fragments: list[dict[str, Any]] = []
            if samples.num_rows and not aborted:
                try:
                    written = write_fragments(
                        samples.select(self.schema.names), self.table_uri, schema=self.schema,
                        data_storage_version=LANCE_FILE_VERSION, storage_options=self.storage_options or None,
                    )
                except (OSError, ValueError) as exc:  # storage trouble: this shard is left for a rerun, the others go on
                    if access_refused(exc):  # no shard will fare better: stop the run with the credentials hint
                        raise StoreError(f"store table {self.table_uri}: writing refused (403); {ACCESS_HINT}") from None
                    if not storage_failed(exc):
                        raise
                    log.warning("%s: writing fragments failed, the shard stays uncommitted in this run: %s", shard, exc)
                    aborted, written = f"writing its rows failed: {first_line(exc)}", []
                fragments = [f.to_json() for f in written]
            out.append({
                "shard": shard, "fragments": json.dumps(fragments), "rows": samples.num_rows,
                "keys": json.dumps(samples.column("key").to_pylist()),
                "bytes": sum(samples.column("stored_bytes").to_pylist()) if fragments else 0,
                "failures": json.dumps(failures), "end_count": end["end_count"], "end_samples": end["end_samples"],
                "aborted": aborted,
            })
        return pa.Table.from_pylist(out, schema=WRITTEN)


_ENDS = ("end_count", "end_samples")


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
    """SA-1B: TARGETS batch -> ENCODED ``images`` rows."""

    schema: Any = IMAGES

    def store_row(self, row: dict[str, Any]) -> dict[str, Any]:
        g = self.geometry
        k = row["k"]
        out = self.provenance(row)
        out["image_id"] = row["image_id"]
        out["codec_mask_iou"], out["codec_iou_error"] = row.get("codec_mask_iou"), row.get("codec_iou_error")
        if row["jpeg"] is not None:  # the original file: decoded through the transform record it is the teacher's input
            out["input"] = tensor_value(Encoded("jpeg", (row["height"], row["width"], 3), row["jpeg"]), 0.0)
        if k:
            out["prompt_mask_index"] = raw_tensor(np.frombuffer(row["prompt_mask_index"], dtype=np.int32))
            out["prompt_kinds"] = raw_tensor(np.frombuffer(row["prompt_kinds"], dtype=np.int8))
            out["prompt_points"] = raw_tensor(np.frombuffer(row["prompt_points"], dtype=np.float32).reshape(k, -1, 2))
            out["prompt_labels"] = raw_tensor(np.frombuffer(row["prompt_labels"], dtype=np.int8).reshape(k, -1))
            out["prompt_boxes"] = raw_tensor(np.frombuffer(row["prompt_boxes"], dtype=np.float32).reshape(k, 4))
            for name, shape in (("multi_logits", (k, 3, g.mask_size, g.mask_size)), ("single_logits", (k, 1, g.mask_size, g.mask_size))):
                out[name] = tensor_value(*encode_logits(np.frombuffer(row[name], dtype=np.float32).reshape(shape)))
            out["iou"] = target_tensor("iou", np.frombuffer(row["iou"], dtype=np.float32).reshape(k, 4))
            out["object_score"] = target_tensor("object_score", np.frombuffer(row["object_score"], dtype=np.float32))
            out["object_pointer"] = target_tensor("object_pointer", np.frombuffer(row["object_pointer"], dtype=np.float32).reshape(k, g.hidden))
        return out


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
        out["mask_logits"] = tensor_value(*encode_logits(_array(row["mask_logits"], (n, g.mask_size, g.mask_size))))
        out["object_score"] = target_tensor("object_score", _array(row["object_score"], (n,)))
        out["object_pointer"] = target_tensor("object_pointer", _array(row["object_pointer"], (n, g.hidden)))
        for name, channels in (("maskmem_features", g.memory_channels), ("pix_feat_with_mem", g.hidden)):
            maps = _array(row[name], (n, channels, g.grid, g.grid))
            out[name] = tensor_value(*encode_features(maps, self.map_codec))
        return out


def _array(blob: bytes, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(blob, dtype=np.float32).reshape(shape)
