"""The store's layout and Arrow schemas: what a trainer finds under one store root.

```
<root>/store.json          the store card: format, teacher card (id, checksum, sizes), created
<root>/targets-<dataset>.json  the target settings of that dataset's rows (and their fingerprint)
<root>/heads/              heads.safetensors + heads.json from ``esam3 teacher export-heads`` (students need nothing else)
<root>/images.lance        SA-1B: one row per image (key ``sa1b/<image_id>``)
<root>/frames.lance        SA-V: one row per annotated frame (key ``sav/<video_id>/<frame:05d>``), objects inside the row
<root>/failures.lance      one row per bad sample: shard, member, reason
<root>/ledger.lance        one row per finished shard, written after its rows are committed
```

Every tensor is a ``tensor`` struct: codec, shape, data, scale, and the relative RMS error the codec measured on
that row (see ``esam3.schemas.codecs``). Big tensors (trunk, mask logits, memory maps: hundreds of KB to MBs per
row) keep their ``data`` in a Lance blob field (``BLOB_TENSOR``): a scan returns only a small descriptor for it and
the bytes come from Lance's planned blob reader (``esam3.pipeline.store.rows``), which reads shuffled rows ~15x
faster than the same bytes inline in a struct (``benchmarks/store_read.py``). Small tensors stay inline. Every
target row records how it was made: teacher checksum, the preprocessing transform (JSON), prompt seed and codec.

Every row also holds what a trainer needs besides the targets (format 3), so nothing after caching reads the
source: ``input``, the student's input as a ``tensor`` whose codec is an image format (``jpeg``: SA-1B's original
file, bit for bit, shape (H, W, 3); ``png``: an SA-V frame exactly as the teacher saw it, (S, S, 3), lossless), and
``gt_masks``, the ground-truth COCO RLE of each prompted object (images, in prompt order, at the image's size) or of
each tracked object on that frame (frames, in ``object_ids`` order, at the video's size). ``input`` is null in
stores cached with ``--inputs none``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from esam3.schemas.codecs import Encoded
from esam3.schemas.errors import Esam3Error

#: 1: every tensor inline; 2: big tensors' bytes in Lance blob fields (blob v2, Lance file format 2.2);
#: 3: the student's input and the ground-truth masks in every row, exact (non-DCT) decode by default;
#: 4: image rows keep the output the tracker uses per prompt (``chosen_logits`` + ``chosen_output``, the default) or
#: all 4, at a chosen size, with the mask IoU storing them costs (``logits_mask_iou``).
STORE_FORMAT = 4
#: Lance file format of every table: 2.2 is the first with blob v2 (blobs as their own files, nested fields too).
LANCE_FILE_VERSION = "2.2"
STORE_CARD = "store.json"
HEADS_DIR = "heads"
TABLES = ("images", "frames", "failures", "ledger")
#: The table holding each dataset's target rows.
TABLE_OF = {"sa-1b": "images", "sa-v": "frames"}


def dataset_of(table: str) -> str:
    """The dataset whose rows a target table holds (``images`` -> ``sa-1b``)."""
    return next(name for name, t in TABLE_OF.items() if t == table)


#: Columns of each target table with a scalar (BTREE) index, kept up by the commits.
KEY_COLUMNS = {"images": ("key",), "frames": ("key", "video_id", "frame")}


def _tensor(blob: bool) -> pa.StructType:
    data = pa.field("data", pa.large_binary(), metadata={"lance-encoding:blob": "true"} if blob else None)
    return pa.struct(
        [
            pa.field("codec", pa.string()),
            pa.field("shape", pa.list_(pa.int32())),
            data,
            pa.field("scale", pa.binary()),
            pa.field("error", pa.float32()),
        ]
    )


#: A COCO RLE (``counts`` compressed string, column-major, as SA-1B / SA-V ship it) of a (height, width) mask.
RLE = pa.struct([pa.field("height", pa.int32()), pa.field("width", pa.int32()), pa.field("counts", pa.string())])
#: Codecs of ``input`` (the student's input image); the bytes are the file, decoded by ``decode_tensor``.
IMAGE_CODECS = ("jpeg", "png")

#: A small tensor: every field inline.
TENSOR = _tensor(blob=False)
#: A big tensor: the same fields, ``data`` a Lance blob (read back with ``esam3.pipeline.store.rows``).
BLOB_TENSOR = _tensor(blob=True)

_PROVENANCE = [
    ("key", pa.string()),
    ("shard", pa.string()),
    ("member", pa.string()),
    ("run_id", pa.string()),
    ("teacher", pa.string()),  # weights checksum
    ("precision", pa.string()),  # how the teacher ran: fp32, or bf16-autocast
    ("codec", pa.string()),  # feature codec
    ("preprocess", pa.string()),  # transform record, JSON
]

IMAGES = pa.schema(
    [
        *_PROVENANCE,
        ("image_id", pa.int64()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("prompt_seed", pa.int64()),
        ("input", BLOB_TENSOR),  # jpeg: the original file; null with --inputs none
        ("trunk", BLOB_TENSOR),
        # K sampled prompts (see esam3.workers.prompts) and the tracker's outputs for them
        ("prompt_mask_index", TENSOR),
        ("prompt_kinds", TENSOR),
        ("prompt_points", TENSOR),  # (K, P, 2) in the teacher frame, continuous coordinates
        ("prompt_labels", TENSOR),  # (K, P) 1 / 0 / -1 padding
        ("prompt_boxes", TENSOR),  # (K, 4) XYXY in the teacher frame, NaN = none
        # the mask logits kept (see esam3.workers.mask_targets), m = the store's mask size: --mask-outputs chosen
        # fills chosen_logits, all fills multi_logits + single_logits; chosen_output is filled either way
        ("chosen_logits", BLOB_TENSOR),  # (K, m, m) the output the tracker uses for each prompt
        ("chosen_output", TENSOR),  # (K,) int8: which one, 0 = single, 1..3 = multimask (as in iou)
        ("multi_logits", BLOB_TENSOR),  # (K, 3, m, m)
        ("single_logits", BLOB_TENSOR),  # (K, 1, m, m)
        ("iou", TENSOR),  # (K, 4)
        ("object_score", TENSOR),  # (K,)
        ("object_pointer", TENSOR),  # (K, hidden)
        ("gt_masks", pa.list_(RLE)),  # (K,) the prompted objects' masks at the image's size
        # what the trunk codec costs the heads: mean IoU of their masks for these prompts from the decoded vs the
        # exact trunk, and the mean error of their predicted IoU (esam3.workers.task_error); null: not measured
        ("codec_mask_iou", pa.float32()),
        ("codec_iou_error", pa.float32()),
        # mean IoU of the teacher's masks and of the stored logits' (decoded, back at the decoder's size): what the
        # logit codec and --mask-size cost; null: no prompts
        ("logits_mask_iou", pa.float32()),
    ]
)

FRAMES = pa.schema(
    [
        *_PROVENANCE,
        ("video_id", pa.string()),
        ("frame", pa.int32()),  # position among the annotated frames used
        ("frame_index", pa.int32()),  # index in the 24 fps video
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("prompt_seed", pa.int64()),
        ("prompt_kind", pa.string()),
        ("input", BLOB_TENSOR),  # png: the S x S frame the teacher saw; null with --inputs none
        ("trunk", BLOB_TENSOR),
        ("object_ids", pa.list_(pa.int32())),
        ("is_conditioning", pa.list_(pa.bool_())),
        ("has_memory_conditioned", pa.list_(pa.bool_())),
        ("mask_logits", BLOB_TENSOR),  # (N, m, m)
        ("object_score", TENSOR),  # (N,)
        ("object_pointer", TENSOR),  # (N, hidden)
        ("maskmem_features", BLOB_TENSOR),  # (N, 64, g, g)
        ("pix_feat_with_mem", BLOB_TENSOR),  # (N, hidden, g, g)
        ("gt_masks", pa.list_(RLE)),  # (N,) each tracked object's mask on this frame, at the video's size
    ]
)

FAILURES = pa.schema(
    [
        ("dataset", pa.string()),
        ("shard", pa.string()),
        ("member", pa.string()),
        ("reason", pa.string()),
        ("run_id", pa.string()),
    ]
)

LEDGER = pa.schema(
    [
        ("dataset", pa.string()),
        ("shard", pa.string()),
        ("source", pa.string()),  # where the shard was read from (its URL or path)
        ("samples", pa.int64()),  # images / videos in the shard, good or failed
        ("rows", pa.int64()),
        ("failures", pa.int64()),  # failed samples (distinct members of the shard's failure rows)
        ("bytes", pa.int64()),
        ("run_id", pa.string()),
        ("fingerprint", pa.string()),  # hash of the target config: a shard is done only for the same config
        ("committed_at", pa.timestamp("us", tz="UTC")),
    ]
)


class StoreError(Esam3Error):
    """A store that cannot be used for this run (another teacher or config, unreadable card, not a store)."""


SCHEMAS = {"images": IMAGES, "frames": FRAMES, "failures": FAILURES, "ledger": LEDGER}
#: Raw (exact) codecs for small arrays, next to the feature / logit codecs (names must not collide with them).
RAW_DTYPES = {"raw-float32": np.float32, "raw-int8": np.int8, "raw-int32": np.int32, "raw-bool": np.bool_}


def tensor_columns(table: str) -> list[str]:
    """The columns of ``table`` holding ``tensor`` structs (inline or blob)."""
    return [f.name for f in SCHEMAS[table] if isinstance(f.type, pa.StructType) and f.type.names == TENSOR.names]


def blob_columns(table: str) -> list[str]:
    """The tensor columns of ``table`` whose bytes are a Lance blob (``BLOB_TENSOR``)."""
    return [name for name in tensor_columns(table) if _is_blob(SCHEMAS[table].field(name).type.field("data"))]


def _is_blob(field: pa.Field) -> bool:
    return (field.metadata or {}).get(b"lance-encoding:blob") == b"true"


def tensor_value(encoded: Encoded, error: float) -> dict[str, Any]:
    """An encoded tensor as a ``TENSOR`` struct value."""
    return {
        "codec": encoded.codec,
        "shape": [int(s) for s in encoded.shape],
        "data": encoded.data,
        "scale": encoded.scale,
        "error": float(error),
    }


def raw_tensor(array: np.ndarray) -> dict[str, Any]:
    """A small array stored exactly (codec ``raw-<dtype>``)."""
    array = np.ascontiguousarray(array)
    codec = f"raw-{array.dtype.name}"
    if codec not in RAW_DTYPES:
        raise ValueError(f"no raw codec for dtype {codec}; use one of {', '.join(RAW_DTYPES)}")
    return tensor_value(Encoded(codec, array.shape, array.tobytes()), 0.0)


def encoded_of(value: dict[str, Any]) -> Encoded:
    """A stored ``tensor`` struct value as the codecs' ``Encoded`` record."""
    return Encoded(value["codec"], tuple(value["shape"]), value["data"], value.get("scale") or b"")


def decode_tensor(value: dict[str, Any], basis: Any = None) -> np.ndarray:
    """Any stored ``tensor`` struct back to a numpy array (raw dtypes exactly, others up to their codec; images as
    uint8 (H, W, 3), decoded in full: ``esam3.workers.decode.teacher_input`` redoes the teacher's preprocessing)."""
    from esam3.schemas.codecs import LOGIT_CODECS, CodecError, decode_features, decode_image, decode_logits

    if value["codec"] in IMAGE_CODECS:
        return decode_image(value["codec"], value["data"], tuple(value["shape"]))
    encoded = encoded_of(value)
    if encoded.codec in RAW_DTYPES:
        dtype = np.dtype(RAW_DTYPES[encoded.codec])
        expected = int(np.prod(encoded.shape)) * dtype.itemsize
        if len(encoded.data) != expected:
            raise CodecError(f"{encoded.codec} data has {len(encoded.data)} bytes, expected {expected}")
        return np.frombuffer(encoded.data, dtype=dtype).reshape(encoded.shape)
    if encoded.codec in LOGIT_CODECS:
        return decode_logits(encoded)
    return decode_features(encoded, basis)
