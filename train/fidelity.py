"""The fidelity proof's other arm: training with the live teacher instead of the cache.

:class:`LiveTargets` replaces every cached target of a batch (trunk, and the prompts' chosen output and mask logits
as the store keeps them, IoU, object score and pointer) with what the teacher computes now from the batch's own input
and prompts: what a trainer without a cache does, every epoch. ``run_stage1(config, targets=LiveTargets(teacher))`` then trains on exactly
the images, prompts, order and seed of the cached run, so any difference between the two runs is the cache's.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from esam3.schemas.prompts import MaskOutputs
from esam3.workers.mask_targets import stored_logits
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
            at = self.teacher.device
            labels, boxes = batch["prompt_labels"][image, slot].to(at), batch["prompt_boxes"][image, slot].to(at)
            with self.teacher.autocast():
                decoded = self.heads.decode_prompts(
                    self.heads.image_embeddings(trunk.to(at)),
                    (batch["prompt_points"][image, slot] - 0.5).to(at),
                    labels,
                    boxes - 0.5,
                    image=image.to(at),
                )
            pick = self.heads.picked_output(labels, boxes, decoded["iou"])
            outputs = MaskOutputs.CHOSEN if "chosen_logits" in batch else MaskOutputs.ALL  # the layout this store keeps
            m = decoded["single"].shape[-1]  # the decoder's size: what a --mask-size store's resize costs shows
            logits = stored_logits(decoded["single"], decoded["multi"], pick, outputs, m)
            live = {
                "chosen_output": pick,
                **{name: exact for name, (exact, _) in logits.items()},
                **{name: decoded[name] for name in ("iou", "object_score", "object_pointer")},
            }
            for name, value in live.items():
                if name in batch:  # the targets this store has (chosen_logits, or multi_logits + single_logits)
                    target = batch[name].new_zeros((*batch[name].shape[:2], *value.shape[1:]))
                    target[image, slot] = value.to(device, target.dtype)
                    out[name] = target
        self.trunk_forwards += len(batch["input"])
        self.seconds += time.perf_counter() - started
        return out


class LiveVideoTargets:
    """Stage 2's other arm: every memory target of a clip batch from the teacher tracking the clip's video now.

    The teacher runs each clip's video from its first frame (its targets on a frame depend on every frame before),
    on the store's own inputs (the frames it saw when caching) with the prompts the cache gave it (rebuilt from the
    ground truth, as ``esam3.train.clips`` does), and its outputs replace the batch's cached ``maskmem_features``,
    ``pix_feat_with_mem``, ``mask_logits``, ``object_score`` and ``object_pointer``, on the clip's rows and on its
    context rows. The session spans the video's cached frames: exact for videos cached whole (the demo's) or with at
    least 16 frames cached (SAM3 caps pointer positions at 16 frames).
    """

    def __init__(self, teacher: Any, clips: Any) -> None:
        self.teacher, self.clips = teacher, clips
        self.videos = {int(clips.video_code[indices[0]]): indices for indices in clips.video_indices()}
        self.frame_forwards = 0  # frames through the trunk and the tracker
        self.seconds = 0.0

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        out = dict(batch)
        for name in ("maskmem_features", "pix_feat_with_mem", "mask_logits", "object_score", "object_pointer"):
            out[name] = batch[name].clone()
        for name in ("bank", "pointers"):
            out[name] = None if batch[name] is None else {k: (v.clone() if torch.is_tensor(v) else v) for k, v in batch[name].items()}
        t_len = len(batch["key"]) // len(batch["clip_video"])
        for clip, video in enumerate(batch["clip_video"].tolist()):
            frames = self._track(video)
            for row in range(clip * t_len, (clip + 1) * t_len):
                _fill(out, row, frames[int(batch["frame_number"][row])])
            for name in ("bank", "pointers"):
                for r in (batch[f"{name}_clip"] == clip).nonzero().flatten().tolist():
                    _fill(out[name], r, frames[int(batch[f"{name}_frame"][r])])
        self.seconds += time.perf_counter() - started
        return out

    def _track(self, video: int) -> dict[int, Any]:
        """The teacher's targets of every cached frame of ``video``, by frame number."""
        from esam3.train.clips import PAD_LABEL
        from esam3.workers.video_targets import ObjectPrompt, VideoWork, run_video

        indices = self.videos[video]
        full = self.clips.take(indices.tolist(), len(indices))
        size = self.teacher.geometry.image_size
        if full["input"].shape[-1] != size:
            raise ValueError(f"the live teacher needs the {size}-px frames it was built for; train without a smaller student input")
        prompts = []
        for k, (row, slot) in enumerate(zip(full["cond_row"].tolist(), full["cond_slot"].tolist())):
            labels = full["cond_labels"][k]
            count = int((labels != PAD_LABEL).sum())
            kind = self.clips.prompt.prompt
            prompts.append(
                ObjectPrompt(
                    int(full["object_ids"][row, slot]),
                    row,
                    kind,
                    full["cond_points"][k, :count].numpy() if count else None,
                    labels[:count].numpy().astype("int32") if count else None,
                    full["cond_masks"][k].numpy() if not count else None,
                )
            )
        numbers = full["frame_number"].tolist()
        work = VideoWork(str(video), full["input"].numpy(), self.clips.frame[indices].astype("int64"), prompts, len(indices))
        self.frame_forwards += len(indices)
        return {numbers[t.frame]: t for t in run_video(self.teacher, work)}


def _fill(batch: dict[str, Any], row: int, targets: Any) -> None:
    """One row's per-object targets from the teacher's ``FrameTargets`` of that frame, matched by object id."""
    ids = batch["object_ids"][row].tolist()
    for j, object_id in enumerate(targets.object_ids):
        slot = ids.index(object_id)
        for name in ("maskmem_features", "pix_feat_with_mem", "mask_logits", "object_score", "object_pointer"):
            if name in batch:
                batch[name][row, slot] = getattr(targets, name)[j].to(batch[name].device, batch[name].dtype)
