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

from esam3.schemas.codecs import Basis, FeatureCodec
from esam3.schemas.errors import first_line
from esam3.schemas.teacher import TeacherConfig, TeacherLoadError, VideoPrompt
from esam3.schemas.work import FRAME_TARGET_COLUMNS, FRAME_TARGETS, KIND_FAILURE, KIND_SAMPLE, TARGETS
from esam3.workers.preprocess import normalize
from esam3.workers.prompts import PromptSet
from esam3.workers.task_error import roundtrip, task_error
from esam3.workers.teacher import Sam3Teacher
from esam3.workers.video_targets import ObjectPrompt, VideoWork, run_video

log = logging.getLogger(__name__)
#: Samples in a row the teacher may fail on before the actor itself fails (see ``TeacherImages.poisoned``).
POISON_STREAK = 8


class TeacherImages:
    """Ray Data actor: WORK batch (pyarrow) -> TARGETS batch with raw float32 trunk / prompt targets.

    With the low-rank codec (``basis`` = (store URI, dataset, rank, S3 settings)), the first actor to compute trunks fits the
    basis on its first batch and stores it before emitting any row; writers encode with the stored basis.
    """

    def __init__(
        self,
        config: TeacherConfig,
        checksum: str,
        with_prompts: bool,
        threads: int | None = None,
        basis: tuple[str, str, int, Any] | None = None,
        codec: FeatureCodec | None = None,
    ) -> None:
        if threads:
            torch.set_num_threads(threads)  # Ray reuses workers: set it explicitly, every time
        self.teacher = Sam3Teacher.load(config)
        if self.teacher.card.checksum != checksum:
            raise TeacherLoadError(
                f"teacher {config.source} loaded on this worker has checksum {self.teacher.card.checksum}, "
                f"the run expects {checksum}: every worker must see the same checkpoint"
            )
        self.with_prompts = with_prompts
        self.basis = basis
        self.basis_ready = basis is None
        self.codec = codec  # the run's trunk codec: its task-level error is measured per row (None: not measured)
        self._stored_basis: Basis | None = None
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

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        samples = [i for i, row in enumerate(rows) if row["kind"] == KIND_SAMPLE]
        if samples:
            self._targets(rows, samples)
        return pa.Table.from_pylist(rows, schema=TARGETS)

    def _targets(self, rows: list[dict[str, Any]], samples: list[int]) -> None:
        teacher = self.teacher
        size = teacher.geometry.image_size
        pixels = torch.stack([torch.frombuffer(bytearray(rows[i]["pixels"]), dtype=torch.uint8).reshape(3, size, size) for i in samples])
        trunks = self._trunks(rows, samples, pixels)
        if trunks:
            self.ensure_basis(torch.stack(list(trunks.values())))
        for index, trunk in trunks.items():
            row = rows[index]
            row["pixels"] = None  # not needed downstream: keep the object store small
            row["precision"] = teacher.card.precision
            row["trunk"] = target_bytes(trunk)
            if self.with_prompts and row["k"]:
                try:
                    out = teacher.prompt_targets(trunk, prompt_set(row, size))
                    if self.codec is not None:
                        decoded = roundtrip(trunk, self.codec, self.trunk_basis())
                        cost = task_error(out, teacher.prompt_targets(decoded, prompt_set(row, size)))
                        row["codec_mask_iou"], row["codec_iou_error"] = cost.mask_iou, cost.iou_error
                except Exception as exc:  # noqa: BLE001 - a bad prompt set, or one that exhausts the device: this sample only
                    rows[index] = as_failure(row, f"prompt targets failed: {self.poisoned(exc)}")
                    continue
                for name in ("multi", "single"):
                    row[f"{name}_logits"] = target_bytes(getattr(out, name))
                for name in ("iou", "object_score", "object_pointer"):
                    row[name] = target_bytes(getattr(out, name))
            self.streak = 0

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

    def trunk_basis(self) -> Basis | None:
        """The store's low-rank basis (after ``ensure_basis``), for the task-level error of the lowrank codec."""
        if self.codec != FeatureCodec.LOWRANK or self._stored_basis is not None:
            return self._stored_basis
        from esam3.pipeline.store import Store

        uri, dataset, _, s3 = self.basis
        self._stored_basis = Store(uri, s3).read_basis(dataset)
        return self._stored_basis


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


def target_bytes(tensor: torch.Tensor) -> memoryview:
    """A target as float32 bytes on the host, the form the write step encodes from.

    A view, not a ``bytes`` copy: Arrow copies it once into the block the actor sends. The extra copy cost the
    actor's thread, the one that feeds the GPU, 58 instead of 17 ms per full-size SA-V frame with 8 objects
    (``benchmarks/cpu_per_row.py``).
    """
    return memoryview(np.ascontiguousarray(tensor.detach().to(torch.float32).cpu().numpy())).cast("B")


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
    """Ray Data actor: WORK rows (one per video) -> FRAME_TARGETS rows (one per annotated frame)."""

    def __init__(
        self, config: TeacherConfig, checksum: str, threads: int | None = None, basis: tuple[str, str, int, Any] | None = None
    ) -> None:
        self.images = TeacherImages(config, checksum, with_prompts=False, threads=threads, basis=basis)

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        for row in batch.to_pylist():
            if row["kind"] != KIND_SAMPLE:
                yield pa.Table.from_pylist([{name: row.get(name) for name in FRAME_TARGETS.names}], schema=FRAME_TARGETS)
                continue
            # Frames leave in blocks of 8 as they are made (one frame is ~77 MB of float32 at full size with 8
            # objects: a whole video would not fit); a video that fails midway keeps the frames already sent, and
            # its failure stands for the rest.
            block: list[dict[str, Any]] = []
            sent = 0
            try:
                for frame in self._frames(row):
                    block.append(frame)
                    if len(block) == 8:
                        yield pa.Table.from_pylist(block, schema=FRAME_TARGETS)
                        sent, block = sent + len(block), []
            except Exception as exc:  # noqa: BLE001 - bad prompts, or a video that exhausts the device: this video only
                if sent == row["frames"]:  # every frame already sent: nothing is missing
                    log.warning("%s: video targets raised after its last frame: %s", row["key"], exc)
                    continue
                reason = self.images.poisoned(exc)
                failure = as_failure(row, f"video targets failed after frame {sent}: {reason}", count=row["frames"] - sent)
                yield pa.Table.from_pylist([{name: failure.get(name) for name in FRAME_TARGETS.names}], schema=FRAME_TARGETS)
                continue
            if block:
                yield pa.Table.from_pylist(block, schema=FRAME_TARGETS)
            self.images.streak = 0

    def _frames(self, row: dict[str, Any]) -> Iterator[dict[str, Any]]:
        teacher = self.images.teacher
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
        first: list[torch.Tensor] = []
        for targets in run_video(teacher, work):
            if not self.images.basis_ready:  # the low-rank basis is fitted on the first 8 frames, before any is sent
                first.append(targets.trunk)
                if len(first) == min(8, len(work.pixels)):
                    self.images.ensure_basis(torch.stack(first))
            yield {
                **{name: row[name] for name in ("kind", "dataset", "shard", "member", "height", "width", "transform")},
                "key": f"{row['key']}/{targets.frame:05d}",
                "video_id": video_id,
                "frame": targets.frame,
                "frame_index": targets.frame_index,
                "prompt_kind": kind,
                "precision": teacher.card.precision,
                "object_ids": targets.object_ids,
                "is_conditioning": targets.is_conditioning.tolist(),
                "has_memory_conditioned": targets.has_memory_conditioned.tolist(),
                "input": inputs[targets.frame] if inputs is not None else None,
                "gt_masks": json.dumps([masks[targets.frame][str(o)] for o in targets.object_ids]),
                **{name: target_bytes(getattr(targets, name)) for name in FRAME_TARGET_COLUMNS},
            }


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
