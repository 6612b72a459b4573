"""Arrow schemas of the batches that flow between the cache's steps (never stored).

read -> teacher: ``WORK`` rows. ``kind`` is ``sample`` (decoded, resized pixels + sampled prompts), ``failure``
(a bad sample: member + reason) or ``end`` (the shard is fully read; ``count`` = sample + failure rows it sent).
Arrays travel as raw little-endian bytes; their shapes follow from the teacher's geometry and ``k``.

teacher -> writer: the same rows, samples with the raw float32 targets added.

writer -> driver: ``WRITTEN`` rows, one per shard per batch: fragment metadata (JSON) of the rows written,
failures seen, the end marker's count. The driver commits a shard once it has all of its rows.
"""

from __future__ import annotations

import pyarrow as pa

KIND_SAMPLE, KIND_FAILURE, KIND_END = "sample", "failure", "end"

WORK = pa.schema(
    [
        ("kind", pa.string()),
        ("dataset", pa.string()),
        ("shard", pa.string()),
        ("key", pa.string()),
        ("member", pa.string()),
        ("reason", pa.string()),
        ("count", pa.int64()),
        ("image_id", pa.int64()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("transform", pa.string()),
        ("pixels", pa.large_binary()),  # uint8 (3, S, S)
        ("k", pa.int32()),
        ("prompt_mask_index", pa.binary()),  # int32 (K,)
        ("prompt_kinds", pa.binary()),  # int8 (K,)
        ("prompt_points", pa.binary()),  # float32 (K, P, 2)
        ("prompt_labels", pa.binary()),  # int8 (K, P)
        ("prompt_boxes", pa.binary()),  # float32 (K, 4)
    ]
)

#: Raw float32 targets the teacher step adds for samples.
TARGET_COLUMNS = ("trunk", "multi_logits", "single_logits", "iou", "object_score", "object_pointer")
TARGETS = pa.schema([*WORK, *[(name, pa.large_binary()) for name in TARGET_COLUMNS]])

WRITTEN = pa.schema(
    [
        ("shard", pa.string()),
        ("fragments", pa.string()),  # JSON list of Lance FragmentMetadata
        ("rows", pa.int64()),  # sample rows in those fragments
        ("bytes", pa.int64()),  # encoded target bytes
        ("failures", pa.string()),  # JSON list of {member, reason}
        ("end_count", pa.int64()),  # -1, or the shard's total row count when its end marker passed
    ]
)
