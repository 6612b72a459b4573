"""The fidelity proof's other arm: training with the live teacher instead of the cache.

:class:`LiveTargets` replaces every cached target of a batch (trunk, and the prompts' mask logits, IoU, object
score and pointer) with what the teacher computes now from the batch's own input and prompts: what a trainer
without a cache does, every epoch. ``run_stage1(config, targets=LiveTargets(teacher))`` then trains on exactly
the images, prompts, order and seed of the cached run, so any difference between the two runs is the cache's.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from esam3.workers.preprocess import normalize


class LiveTargets:
    """Targets from a loaded teacher (``esam3.workers.teacher.Sam3Teacher``), counting what they cost."""

    def __init__(self, teacher: Any) -> None:
        self.teacher = teacher
        self.heads = teacher.heads
        self.trunk_forwards = 0  # images through the 446M-parameter trunk (at full size)
        self.seconds = 0.0

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        size = self.teacher.geometry.image_size
        if batch["input"].shape[-1] != size:
            raise ValueError(f"the live teacher needs the {size}-px input it was built for; train without --image-size")
        device = batch["input"].device
        trunk = self.teacher.trunk_features(normalize(batch["input"])).float().to(device).clone()  # a normal tensor, not an inference one
        out = dict(batch, trunk=trunk)
        valid = batch["prompt_valid"].to(device)
        image, slot = torch.nonzero(valid, as_tuple=True)
        if len(image):
            with self.teacher.autocast():
                decoded = self.heads.decode_prompts(
                    self.heads.image_embeddings(trunk.to(self.teacher.device)), (batch["prompt_points"][image, slot] - 0.5).to(self.teacher.device),
                    batch["prompt_labels"][image, slot].to(self.teacher.device), (batch["prompt_boxes"][image, slot] - 0.5).to(self.teacher.device),
                    image=image.to(self.teacher.device),
                )
            for name, key in (("multi_logits", "multi"), ("single_logits", "single"), ("iou", "iou"),
                              ("object_score", "object_score"), ("object_pointer", "object_pointer")):
                target = torch.zeros_like(batch[name])
                target[image, slot] = decoded[key].float().to(device)
                out[name] = target
        self.trunk_forwards += len(batch["input"])
        self.seconds += time.perf_counter() - started
        return out
