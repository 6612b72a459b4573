"""Cache step 2 (the GPU, or CPU threads): the teacher actor. One trunk pass per image, prompts from it.

Loaded once per actor. It checks that the weights it loaded are the ones the driver fingerprinted (same
checksum), so a worker with another copy of the checkpoint cannot write rows under the wrong teacher id.
Failure and end rows pass through untouched.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from esam3.schemas.teacher import TeacherConfig, TeacherLoadError
from esam3.schemas.work import KIND_SAMPLE, TARGETS
from esam3.workers.preprocess import normalize
from esam3.workers.prompts import PromptSet
from esam3.workers.teacher import Sam3Teacher

log = logging.getLogger(__name__)


class TeacherImages:
    """Ray Data actor: WORK batch (pyarrow) -> TARGETS batch with raw float32 trunk / prompt targets."""

    def __init__(self, config: TeacherConfig, checksum: str, with_prompts: bool, threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)  # Ray reuses workers: set it explicitly, every time
        self.teacher = Sam3Teacher.load(config)
        if self.teacher.card.checksum != checksum:
            raise TeacherLoadError(
                f"teacher {config.source} loaded on this worker has checksum {self.teacher.card.checksum}, "
                f"the run expects {checksum}: every worker must see the same checkpoint"
            )
        self.with_prompts = with_prompts

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        samples = [i for i, row in enumerate(rows) if row["kind"] == KIND_SAMPLE]
        if samples:
            self._targets(rows, samples)
        return pa.Table.from_pylist(rows, schema=TARGETS)

    def _targets(self, rows: list[dict[str, Any]], samples: list[int]) -> None:
        teacher = self.teacher
        size = teacher.geometry.image_size
        pixels = torch.stack(
            [torch.frombuffer(bytearray(rows[i]["pixels"]), dtype=torch.uint8).reshape(3, size, size) for i in samples]
        )
        trunk = teacher.trunk_features(normalize(pixels.to(teacher.device)))
        for position, index in enumerate(samples):
            row = rows[index]
            row["pixels"] = None  # not needed downstream: keep the object store small
            row["trunk"] = _raw(trunk[position])
            if self.with_prompts and row["k"]:
                out = teacher.prompt_targets(trunk[position], prompt_set(row, size))
                for name in ("multi", "single"):
                    row[f"{name}_logits"] = _raw(getattr(out, name))
                for name in ("iou", "object_score", "object_pointer"):
                    row[name] = _raw(getattr(out, name))


def _raw(tensor: torch.Tensor) -> bytes:
    return tensor.detach().to(torch.float32).cpu().numpy().tobytes()


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
