"""Cache step 2 (the GPU, or CPU threads): the teacher actors. One trunk pass per image or frame; prompt and
memory targets from it.

Loaded once per actor. It checks that the weights it loaded are the ones the driver fingerprinted (same
checksum), so a worker with another copy of the checkpoint cannot write rows under the wrong teacher id.
Failure and end rows pass through untouched.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from esam3.schemas.codecs import CodecError, FeatureCodec, map_codec
from esam3.schemas.errors import first_line
from esam3.schemas.prompts import MaskOutputs, check_mask_size
from esam3.schemas.teacher import TeacherConfig, TeacherLoadError, VideoPrompt
from esam3.schemas.work import FRAME_TARGETS, KIND_FAILURE, KIND_SAMPLE, RAW_FRAME_TARGETS, TARGETS
from esam3.workers.device_codecs import DeviceBasis, HostCopies, Quantised, Sent, dequantise, quantise_features, quantise_logits
from esam3.workers.mask_targets import logits_mask_iou, stored_logits
from esam3.workers.preprocess import normalize
from esam3.workers.prompts import PromptSet
from esam3.workers.task_error import task_error
from esam3.workers.teacher import PromptTargets, Sam3Teacher, prompt_tensors
from esam3.workers.video_targets import FrameTargets, ObjectPrompt, VideoWork, run_video

log = logging.getLogger(__name__)
#: Samples in a row the teacher may fail on before the actor itself fails (see ``TeacherImages.poisoned``).
POISON_STREAK = 8


class TeacherImages:
    """Ray Data actor: WORK batch (pyarrow) -> TARGETS batch: trunk and prompt targets quantised on the teacher's
    device (``esam3.workers.device_codecs``) and sent as codes + scales + measured errors.

    With the low-rank codec (``basis`` = (store URI, dataset, rank, S3 settings)), the first actor to compute trunks
    fits the basis on its first batch and stores it before it encodes any row; every actor encodes with the stored one.
    ``mask_outputs`` / ``mask_size``: which prompt logits are sent, at which side (None: the decoder's own).
    """

    def __init__(
        self,
        config: TeacherConfig,
        checksum: str,
        with_prompts: bool,
        codec: FeatureCodec | str = FeatureCodec.INT8,
        store_trunk: bool = True,
        threads: int | None = None,
        basis: tuple[str, str, int, Any] | None = None,
        loaded: Sam3Teacher | None = None,
        mask_outputs: MaskOutputs | str = MaskOutputs.CHOSEN,
        mask_size: int | None = None,
    ) -> None:
        if threads:
            torch.set_num_threads(threads)  # Ray reuses workers: set it explicitly, every time
        self.teacher = loaded or Sam3Teacher.load(config)  # ``loaded``: a teacher this process holds (benchmarks)
        if self.teacher.card.checksum != checksum:
            raise TeacherLoadError(
                f"teacher {config.source} loaded on this worker has checksum {self.teacher.card.checksum}, "
                f"the run expects {checksum}: every worker must see the same checkpoint"
            )
        self.with_prompts = with_prompts
        self.mask_outputs = MaskOutputs(mask_outputs)
        check_mask_size(mask_size, self.teacher.geometry.mask_size)
        self.mask_size = mask_size or self.teacher.geometry.mask_size
        self.codec = FeatureCodec(codec)  # the run's trunk codec
        self.store_trunk = store_trunk  # else the trunk is neither sent nor measured
        self.basis = basis
        self.basis_ready = basis is None
        self._device_basis: DeviceBasis | None = None
        self.copies = HostCopies(self.teacher.device)
        self.streak = 0  # samples in a row the teacher failed on

    def ensure_basis(self, trunks: torch.Tensor) -> None:
        """Fit and store the run's low-rank basis on these trunk outputs (N, C, g, g) unless the store has one."""
        if self.basis_ready:
            return
        from esam3.pipeline.store import Store
        from esam3.schemas.codecs import fit_basis

        uri, dataset, rank, s3 = self.basis
        store = Store(uri, s3)
        if store.read_basis(dataset) is None:
            features = trunks.detach().float().cpu().numpy()
            stored = store.write_basis_once(dataset, fit_basis(features, min(rank, features.shape[1])))
            log.info("low-rank basis of rank %d fitted on %d rows and stored", stored.rank, len(features))
        self.basis_ready = True

    def device_basis(self) -> DeviceBasis | None:
        """The store's low-rank basis on the teacher's device (after ``ensure_basis``); None for other codecs."""
        if self.codec != FeatureCodec.LOWRANK or self._device_basis is not None:
            return self._device_basis
        from esam3.pipeline.store import Store

        uri, dataset, rank, s3 = self.basis
        found = Store(uri, s3).read_basis(dataset)
        if found is None:
            raise CodecError("the low-rank basis is not in the store (the first teacher batch stores it)")
        width = self.teacher.geometry.trunk_width
        if found.components.shape[0] != width:
            raise CodecError(f"the store's basis has {found.components.shape[0]} channels, the teacher's trunk {width}")
        if found.rank != min(rank, width):  # rows must be what the card says (a basis left by another run's pilot)
            raise CodecError(f"the store's basis has rank {found.rank}, this run's codec rank {min(rank, width)}: use another --store")
        self._device_basis = DeviceBasis.of(found, self.teacher.device)
        return self._device_basis

    def quantise_trunk(self, trunk: torch.Tensor) -> Quantised:
        return quantise_features(trunk, self.codec, self.device_basis())

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        samples = [i for i, row in enumerate(rows) if row["kind"] == KIND_SAMPLE]
        if samples:
            self._targets(rows, samples)
        return pa.Table.from_pylist(rows, schema=TARGETS)

    def _targets(self, rows: list[dict[str, Any]], samples: list[int]) -> None:
        size = self.teacher.geometry.image_size
        pixels = torch.stack([torch.frombuffer(bytearray(rows[i]["pixels"]), dtype=torch.uint8).reshape(3, size, size) for i in samples])
        trunks = self._trunks(rows, samples, pixels)
        if trunks and not self.basis_ready:
            self.ensure_basis(torch.stack(list(trunks.values())))
        if trunks:
            self.device_basis()  # a missing or wrong basis fails the run here, not each sample as a poison one
        sent: dict[int, dict[str, Sent]] = {}
        for index, trunk in trunks.items():
            try:
                sent[index] = self._send(rows[index], trunk)
            except Exception as exc:  # noqa: BLE001 - a bad prompt set, or one that exhausts the device: this sample only
                rows[index] = as_failure(rows[index], f"prompt targets failed: {self.poisoned(exc)}")
                continue
            self.streak = 0
        self.copies.wait()
        for index, parts in sent.items():
            rows[index] = received(rows[index], parts, precision=self.teacher.card.precision)

    def _send(self, row: dict[str, Any], trunk: torch.Tensor) -> dict[str, Sent]:
        """Quantise one image's targets and start their copies to the host: the trunk, and for its prompts the
        heads' outputs plus what the trunk codec costs them (the prompts decoded again from the decoded trunk)."""
        teacher = self.teacher
        quantised = self.quantise_trunk(trunk) if self.store_trunk else None
        if not (self.with_prompts and row["k"]):
            return send_image(self.copies, quantised, None)
        prompts = prompt_set(row, teacher.geometry.image_size)
        _, labels, boxes = prompt_tensors(prompts, teacher.device)  # host -> device before the decoder is queued
        out = teacher.prompt_targets(trunk, prompts, on_device=True)
        pick = teacher.heads.picked_output(labels, boxes, out.iou)
        parts = send_image(self.copies, quantised, out, pick, self.mask_outputs, self.mask_size)
        if quantised is not None:
            decoded = dequantise(quantised, self.device_basis())
            parts[TASK_ERROR_PART] = self.copies.send_raw(task_error(out, teacher.prompt_targets(decoded, prompts, on_device=True)))
        return parts

    def _trunks(self, rows: list[dict[str, Any]], samples: list[int], pixels: torch.Tensor) -> dict[int, torch.Tensor]:
        """Trunk outputs by row index: the batch in one pass, or, if the pass fails (out of memory on a large batch,
        a kernel error on one input), each sample alone; a sample that fails alone becomes a failure row."""
        teacher = self.teacher
        try:
            trunk = teacher.trunk_features(normalize(pixels.to(teacher.device)))
            return dict(zip(samples, trunk))
        except Exception as exc:  # noqa: BLE001 - which sample is to blame is found below
            if len(samples) == 1:
                rows[samples[0]] = as_failure(rows[samples[0]], f"the teacher failed on it: {self.poisoned(exc)}")
                return {}
            log.warning("the teacher failed on a batch of %d (%s); running its samples one at a time", len(samples), first_line(exc))
        trunks = {}
        for position, index in enumerate(samples):
            try:
                trunks[index] = teacher.trunk_features(normalize(pixels[position : position + 1].to(teacher.device)))[0]
            except Exception as exc:  # noqa: BLE001 - this sample alone fails: a poison sample
                rows[index] = as_failure(rows[index], f"the teacher failed on it: {self.poisoned(exc)}")
        return trunks

    def poisoned(self, exc: BaseException) -> str:
        """Count a sample the teacher failed on; after ``POISON_STREAK`` in a row it is the teacher that fails (a
        broken device), and the actor stops so that Ray replaces it. Returns the failure reason."""
        self.streak += 1
        reason = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {first_line(exc)}"
        if self.teacher.device.type == "cuda":
            torch.cuda.empty_cache()  # what an out-of-memory sample left allocated
        if self.streak >= POISON_STREAK:
            raise RuntimeError(
                f"the teacher failed on {self.streak} samples in a row (the last: {reason}): the teacher, not the samples, is failing"
            ) from exc
        log.warning("teacher failed on a sample: %s", reason)
        return reason


def send_image(
    copies: HostCopies,
    trunk: Quantised | None,
    prompts: PromptTargets | None,
    pick: torch.Tensor | None = None,
    mask_outputs: MaskOutputs = MaskOutputs.CHOSEN,
    mask_size: int | None = None,
) -> dict[str, Sent]:
    """Start the copies of one image's targets: its quantised trunk (None: not stored), and the heads' outputs for its
    prompts (None: no prompts): the logits ``mask_outputs`` keeps (the output ``pick`` (K,) of each, or all 4) at
    ``mask_size`` quantised as logit8 with the mask IoU that costs, the small ones as float32."""
    parts = {} if trunk is None else {"trunk": copies.send(trunk)}
    if prompts is not None:
        if pick is None:
            raise ValueError("prompt targets need the output each prompt picks (TeacherHeads.picked_output)")
        logits = stored_logits(prompts.single, prompts.multi, pick, mask_outputs, mask_size or prompts.multi.shape[-1])
        quantised = {name: (original, quantise_logits(stored)) for name, (original, stored) in logits.items()}
        for name, (_, q) in quantised.items():
            parts[name] = copies.send(q)
        parts[LOGITS_ERROR_PART] = copies.send_raw(logits_mask_iou(list(quantised.values()))[None])
        for name in ("iou", "object_score", "object_pointer"):
            parts[name] = copies.send_raw(getattr(prompts, name))
        parts["chosen_output"] = copies.send_raw(pick)
    return parts


def send_frame(copies: HostCopies, trunk: Quantised | None, targets: FrameTargets, codec: FeatureCodec) -> dict[str, Sent]:
    """Start the copies of one video frame's targets: its quantised trunk (None: not stored), the objects' logits
    (logit8) and memory maps (``map_codec(codec)``), the small ones as float32."""
    parts = {} if trunk is None else {"trunk": copies.send(trunk)}
    parts["mask_logits"] = copies.send(quantise_logits(targets.mask_logits))
    for name in ("maskmem_features", "pix_feat_with_mem"):
        parts[name] = copies.send(quantise_features(getattr(targets, name), map_codec(codec)))
    for name in RAW_FRAME_TARGETS:
        parts[name] = copies.send_raw(getattr(targets, name))
    return parts


def as_failure(row: dict[str, Any], reason: str, count: int = 1) -> dict[str, Any]:
    """A sample row turned into a failure row standing for ``count`` store rows."""
    return {
        "kind": KIND_FAILURE,
        "dataset": row["dataset"],
        "shard": row["shard"],
        "member": row["member"],
        "reason": reason,
        "count": count,
    }


#: Where the task-level errors travel among a row's parts, and the row fields each becomes: the trunk codec's
#: (``esam3.workers.task_error``) and the stored logits' (``esam3.workers.mask_targets``).
TASK_ERROR_PART, LOGITS_ERROR_PART = "task_error", "logits_error"
ERROR_FIELDS = {TASK_ERROR_PART: ("codec_mask_iou", "codec_iou_error"), LOGITS_ERROR_PART: ("logits_mask_iou",)}


def received(row: dict[str, Any], parts: dict[str, Sent], **fields: Any) -> dict[str, Any]:
    """A sample row with its targets, once their copies are done (``HostCopies.wait``): the target fields added,
    the pixels dropped (not needed downstream: the object store stays small). A target the codec refuses (NaN,
    fp16 overflow) makes it a failure row."""
    try:
        targets = {key: value for name, part in parts.items() if name not in ERROR_FIELDS for key, value in part.fields(name).items()}
    except CodecError as exc:
        log.warning("%s: cannot store %s: %s", row["shard"], row["key"], exc)
        return as_failure(row, f"targets of {row['key']} not stored: {exc}")
    for part, names in ERROR_FIELDS.items():
        if part in parts:
            targets.update(zip(names, parts[part].codes.tolist()))
    return {**row, **fields, **targets, "pixels": None}


def prompt_set(row: dict[str, Any], size: int) -> PromptSet:
    """A WORK row's prompts (teacher-frame coordinates) as a PromptSet."""
    k = row["k"]
    points = np.frombuffer(row["prompt_points"], dtype=np.float32).reshape(k, -1, 2)
    boxes = np.frombuffer(row["prompt_boxes"], dtype=np.float32).reshape(k, 4)
    return PromptSet(
        mask_index=np.frombuffer(row["prompt_mask_index"], dtype=np.int32),
        kinds=np.frombuffer(row["prompt_kinds"], dtype=np.int8),
        points=points,
        labels=np.frombuffer(row["prompt_labels"], dtype=np.int8).reshape(k, -1),
        boxes=boxes,
        points_model=points,
        boxes_model=boxes,
        image_size=(row["height"], row["width"]),
        model_size=size,
    )


class TeacherVideos:
    """Ray Data actor: WORK rows (one per video) -> FRAME_TARGETS rows (one per annotated frame), quantised on the
    teacher's device like ``TeacherImages``' (the per-object maps with ``codecs.map_codec``)."""

    def __init__(
        self,
        config: TeacherConfig,
        checksum: str,
        codec: FeatureCodec | str = FeatureCodec.INT8,
        store_trunk: bool = True,
        threads: int | None = None,
        basis: tuple[str, str, int, Any] | None = None,
    ) -> None:
        self.images = TeacherImages(config, checksum, False, codec, store_trunk, threads, basis)

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        for row in batch.to_pylist():
            if row["kind"] != KIND_SAMPLE:
                yield frame_table([row])
                continue
            # Frames leave in blocks of 8 as they are made (a whole video of targets would not fit); each frame's
            # copies to the host overlap the next frame's compute. A video that fails midway keeps the frames
            # already sent, and its failure stands for the rest.
            block: list[tuple[dict[str, Any], dict[str, Sent]]] = []
            sent = 0
            try:
                for frame in self._frames(row):
                    block.append(frame)
                    if len(block) == 8:
                        yield self._table(block)
                        sent, block = sent + len(block), []
            except Exception as exc:  # noqa: BLE001 - bad prompts, or a video that exhausts the device: this video only
                self.images.copies.wait()  # the block's copies are dropped, but never while a side stream still writes them
                if sent == row["frames"]:  # every frame already sent: nothing is missing
                    log.warning("%s: video targets raised after its last frame: %s", row["key"], exc)
                    continue
                reason = self.images.poisoned(exc)
                yield frame_table([as_failure(row, f"video targets failed after frame {sent}: {reason}", count=row["frames"] - sent)])
                continue
            if block:
                yield self._table(block)
            self.images.streak = 0

    def _table(self, block: list[tuple[dict[str, Any], dict[str, Sent]]]) -> pa.Table:
        self.images.copies.wait()
        return frame_table([received(row, parts) for row, parts in block])

    def _frames(self, row: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Sent]]]:
        images = self.images
        teacher = images.teacher
        size = teacher.geometry.image_size
        video_id = row["key"].split("/", 1)[1]
        work = VideoWork(
            key=row["key"],
            pixels=np.frombuffer(row["pixels"], dtype=np.uint8).reshape(row["frames"], 3, size, size),
            frame_indices=np.frombuffer(row["frame_indices"], dtype=np.int64),
            prompts=object_prompts_from_json(row["video_prompts"], row["prompt_masks"], size),
            video_frames=row["video_frames"],
        )
        kind = work.prompts[0].kind.value if work.prompts else ""
        inputs, masks = row["frame_inputs"], json.loads(row["frame_masks"])
        held: list[FrameTargets] = []  # frames made before the low-rank basis exists (fitted on the first 8)
        for targets in run_video(teacher, work, on_device=True):
            held.append(targets)
            if not images.basis_ready:
                if len(held) < min(8, len(work.pixels)):
                    continue
                images.ensure_basis(torch.stack([t.trunk for t in held]))
            for frame in held:
                yield self._frame(row, frame, video_id, kind, inputs, masks), self._send(frame)
            held = []
        if held:  # the video gave fewer frames than it has: the basis is fitted on those
            images.ensure_basis(torch.stack([t.trunk for t in held]))
            for frame in held:
                yield self._frame(row, frame, video_id, kind, inputs, masks), self._send(frame)

    def _frame(self, row: dict[str, Any], targets: FrameTargets, video_id: str, kind: str, inputs: Any, masks: Any) -> dict[str, Any]:
        return {
            **{name: row[name] for name in ("kind", "dataset", "shard", "member", "height", "width", "transform")},
            "key": f"{row['key']}/{targets.frame:05d}",
            "video_id": video_id,
            "frame": targets.frame,
            "frame_index": targets.frame_index,
            "prompt_kind": kind,
            "precision": self.images.teacher.card.precision,
            "object_ids": targets.object_ids,
            "is_conditioning": targets.is_conditioning.tolist(),
            "has_memory_conditioned": targets.has_memory_conditioned.tolist(),
            "input": inputs[targets.frame] if inputs is not None else None,
            "gt_masks": json.dumps([masks[targets.frame][str(o)] for o in targets.object_ids]),
        }

    def _send(self, targets: FrameTargets) -> dict[str, Sent]:
        images = self.images
        trunk = images.quantise_trunk(targets.trunk) if images.store_trunk else None
        return send_frame(images.copies, trunk, targets, images.codec)


def frame_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist([{name: row.get(name) for name in FRAME_TARGETS.names} for row in rows], schema=FRAME_TARGETS)


def object_prompts_from_json(text: str, masks: bytes, size: int) -> list[ObjectPrompt]:
    """The read step's JSON prompts (+ mask prompts as float32 (M, S, S)) back to ObjectPrompts."""
    stack = np.frombuffer(masks, dtype=np.float32).reshape(-1, size, size) if masks else None
    prompts = []
    for p in json.loads(text):
        prompts.append(
            ObjectPrompt(
                object_id=p["object_id"],
                frame=p["frame"],
                kind=VideoPrompt(p["kind"]),
                points=None if p["points"] is None else np.asarray(p["points"], dtype=np.float32),
                labels=None if p["labels"] is None else np.asarray(p["labels"], dtype=np.int32),
                mask=None if p["mask_index"] is None else stack[p["mask_index"]],
            )
        )
    return prompts
