"""Arrow schemas of the batches that flow between the cache's steps (never stored).

read -> teacher: ``WORK`` rows. ``kind`` is ``sample`` (an image's decoded, resized pixels + sampled prompts, or a
video's resized annotated frames + object prompts), ``failure`` (a bad sample: member + reason) or ``end`` (the
shard is fully read; ``count`` = the store rows + failure rows the shard will make: one per image, one per
frame of each video) or ``abort`` (the shard could not be read to its end, e.g. a network error: ``reason``
says why; the driver leaves the shard uncommitted and goes on with the others).
Arrays travel as raw little-endian bytes; their shapes follow from the teacher's geometry and ``k``.

teacher -> writer: the same rows, samples with their targets added as the teacher quantised them on its device
(``esam3.workers.device_codecs``): the codes in the target's column, one fp32 scale per map / component in
``<name>_scale`` and the relative RMS error measured there in ``<name>_error``; small targets as raw float32.

writer -> driver: ``WRITTEN`` rows, one per shard per batch: progress (rows written), and once per shard its totals
(``final``): the fragment metadata (JSON) of all its rows, its failures, its end marker's count. The driver commits
a shard from its final entry.
"""

from __future__ import annotations

import pyarrow as pa

KIND_SAMPLE, KIND_FAILURE, KIND_END, KIND_ABORT = "sample", "failure", "end", "abort"

WORK = pa.schema(
    [
        ("kind", pa.string()),
        ("dataset", pa.string()),
        ("shard", pa.string()),
        ("key", pa.string()),
        ("member", pa.string()),
        ("reason", pa.string()),
        ("count", pa.int64()),  # end row: store rows + failure weight of the shard; failure row: its weight (1, or a video's frames)
        ("samples", pa.int64()),  # end row: images / videos read (good or failed)
        ("retries", pa.int64()),  # end row: times the shard was read again after a transient I/O error
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
        ("jpeg", pa.large_binary()),  # SA-1B: the original file (null with --inputs none)
        ("gt_masks", pa.string()),  # SA-1B: JSON [{height, width, counts}] of the prompted masks, in prompt order
        # SA-V only: one row per video
        ("frames", pa.int32()),  # T annotated frames used (= store rows this video will make)
        ("video_frames", pa.int32()),  # annotated frames in the whole video: the tracker session's length
        ("frame_indices", pa.binary()),  # int64 (T,)
        ("video_prompts", pa.string()),  # JSON: [{object_id, frame, kind, points, labels, mask_index}]
        ("prompt_masks", pa.large_binary()),  # float32 (M, S, S): the mask prompts, in video_prompts' mask_index order
        ("frame_inputs", pa.list_(pa.large_binary())),  # PNG of each used frame at S x S (null with --inputs none)
        ("frame_masks", pa.string()),  # JSON per used frame: {object_id: {height, width, counts}} of the prompted objects
    ]
)


def _targets(quantised: tuple[str, ...], raw: tuple[str, ...]) -> list[tuple[str, pa.DataType]]:
    """Columns of targets the teacher quantised (codes, scales, measured error) and of raw float32 ones."""
    fields = [
        (f"{name}{part}", kind)
        for name in quantised
        for part, kind in (("", pa.large_binary()), ("_scale", pa.binary()), ("_error", pa.float64()))
    ]
    return fields + [(name, pa.large_binary()) for name in raw]


#: Targets quantised on the teacher's device (trunk: the run's codec; logits: logit8) and those sent as float32
#: (``chosen_output``: the index of the output kept in ``chosen_logits``, as float32). With ``--mask-outputs chosen``
#: the logits travel as ``chosen_logits``, with ``all`` as ``multi_logits`` + ``single_logits``.
QUANTISED_TARGETS = ("trunk", "chosen_logits", "multi_logits", "single_logits")
RAW_TARGETS = ("iou", "object_score", "object_pointer", "chosen_output")
#: What the codecs cost the heads' masks on this row, null when not measured: the trunk codec's
#: (``esam3.workers.task_error``) and the stored logits' (``esam3.workers.mask_targets``).
TASK_ERROR = [("codec_mask_iou", pa.float32()), ("codec_iou_error", pa.float32()), ("logits_mask_iou", pa.float32())]
TARGETS = pa.schema([*WORK, ("precision", pa.string()), *_targets(QUANTISED_TARGETS, RAW_TARGETS), *TASK_ERROR])

#: teacher -> writer for SA-V: one row per frame (or a failure / end row passed through).
#: SA-V targets: the trunk (the run's codec), the per-object maps (``codecs.map_codec``), the logits (logit8) quantised.
QUANTISED_FRAME_TARGETS = ("trunk", "mask_logits", "maskmem_features", "pix_feat_with_mem")
RAW_FRAME_TARGETS = ("object_score", "object_pointer")
FRAME_TARGETS = pa.schema(
    [
        *[
            WORK.field(name)
            for name in (
                "kind",
                "dataset",
                "shard",
                "key",
                "member",
                "reason",
                "count",
                "samples",
                "retries",
                "height",
                "width",
                "transform",
            )
        ],
        ("video_id", pa.string()),
        ("frame", pa.int32()),
        ("frame_index", pa.int32()),
        ("prompt_kind", pa.string()),
        ("precision", pa.string()),
        ("object_ids", pa.list_(pa.int32())),
        ("is_conditioning", pa.list_(pa.bool_())),
        ("has_memory_conditioned", pa.list_(pa.bool_())),
        ("input", pa.large_binary()),  # PNG of the frame (null with --inputs none)
        ("gt_masks", pa.string()),  # JSON [{height, width, counts}] in object_ids order
        *_targets(QUANTISED_FRAME_TARGETS, RAW_FRAME_TARGETS),
    ]
)

WRITTEN = pa.schema(
    [
        ("shard", pa.string()),
        ("final", pa.bool_()),  # true: the shard's totals (it is written, or aborted); false: a piece's progress only
        ("fragments", pa.string()),  # JSON list of Lance FragmentMetadata
        ("rows", pa.int64()),  # sample rows in those fragments
        ("keys", pa.string()),  # JSON list of their keys
        ("bytes", pa.int64()),  # encoded target bytes
        ("failures", pa.string()),  # JSON list of {member, reason, weight}: weight = store rows the failure stands for
        ("end_count", pa.int64()),  # -1, or the shard's total row count when its end marker passed
        ("end_samples", pa.int64()),  # -1, or the images / videos the shard held
        ("read_retries", pa.int64()),  # reads of the shard again after transient I/O errors (with its totals)
        ("aborted", pa.string()),  # null, or why the shard cannot be committed in this run (read or write I/O error)
    ]
)
