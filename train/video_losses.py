"""Stage-2 losses: the student tracker's outputs against SAM3's cached memory targets and against the ground truth.

Per (object, frame) the tracker decoded (tracked frames, and point / box conditioning frames):

* memory: the student's memory-conditioned map vs the cached ``pix_feat_with_mem`` (per-pixel MSE summed over
  channels + 1 - cosine, as stage 1 does for the trunk), on tracked frames that have one;
* teacher: BCE + Dice of the output the tracker uses vs the teacher's cached logits (sigmoid as soft targets), and
  BCE of the object score vs the teacher's (sigmoid);
* ground truth (SAM2's video losses): sigmoid focal (alpha 0.25, gamma 2) x 20 + Dice x 1 on the output of lowest
  such loss (the others get no mask gradient), IoU-head L1 x 1 against each output's true IoU, both only where the
  object is in the frame; object-score BCE x 1 against its presence.

Each term is averaged within each clip, then over the batch's clips (so a batch split over ranks averages to the
whole batch, as stage 1 does per image).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from esam3.train.losses import mask_terms, per_image_mean
from esam3.train.tracker import Decoded

#: SAM2's video loss weights (``training/loss_fns.py`` defaults of its configs).
FOCAL_WEIGHT, DICE_WEIGHT, IOU_WEIGHT, SCORE_WEIGHT = 20.0, 1.0, 1.0, 1.0


@dataclass(frozen=True)
class VideoLossWeights:
    feature: float = 1.0  # MSE (summed over channels) of pix_feat_with_mem
    cosine: float = 1.0  # 1 - cosine of pix_feat_with_mem
    mask: float = 1.0  # BCE + Dice vs the teacher's mask
    score: float = 1.0  # object-score BCE vs the teacher's
    gt: float = 1.0  # SAM2's ground-truth combination, as a whole


def focal(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss per mask (mean over pixels) of logits (..., h, w) against 0/1 targets."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    weight = alpha * targets + (1 - alpha) * (1 - targets)
    return (weight * ce * (1 - p_t) ** gamma).flatten(-2).mean(-1)


def true_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU of (logits > 0) with the target masks, per mask."""
    pred = logits > 0
    inter = (pred & targets.bool()).flatten(-2).sum(-1).float()
    union = (pred | targets.bool()).flatten(-2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def _group_terms(batch: dict[str, Any], out: Decoded, with_gt: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-output values (and the clips they belong to) of every term, for one decoder group."""
    terms: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    row, slot, clip = out.row, out.slot, out.clip
    if out.conditioned is not None:
        has = batch["has_memory_conditioned"][row, slot]
        if bool(has.any()):
            s, t = out.conditioned[has].float(), batch["pix_feat_with_mem"][row, slot][has].float()
            terms["memory_mse"] = ((s - t).pow(2).sum(1).flatten(1).mean(1), clip[has])
            terms["memory_cosine"] = ((1 - F.cosine_similarity(s, t, dim=1, eps=1e-6)).flatten(1).mean(1), clip[has])
    picked = out.picked.float()
    bce, dice = mask_terms(picked, batch["mask_logits"][row, slot].float().sigmoid())
    terms["mask_bce"], terms["mask_dice"] = (bce, clip), (dice, clip)
    score = out.score.float()
    terms["score_bce"] = (
        F.binary_cross_entropy_with_logits(score, batch["object_score"][row, slot].float().sigmoid(), reduction="none"),
        clip,
    )
    if with_gt:
        gt = batch["gt_masks"][row, slot].float()
        present = gt.flatten(1).any(1)
        logits = out.logits.float()
        targets = gt[:, None].expand_as(logits)
        combined = FOCAL_WEIGHT * focal(logits, targets) + DICE_WEIGHT * mask_terms(logits.flatten(0, 1), targets.flatten(0, 1))[1].view(
            logits.shape[:2]
        )
        best = combined.argmin(dim=1)  # SAM2: only the output of lowest loss learns its mask
        rows = torch.arange(len(best), device=best.device)
        iou_error = (out.iou.float() - true_iou(logits, targets)).abs().mean(1)
        terms["gt_mask"] = (combined[rows, best][present], clip[present])
        terms["gt_iou"] = (iou_error[present], clip[present])
        terms["gt_score"] = (F.binary_cross_entropy_with_logits(score, present.float(), reduction="none"), clip)
    return terms


def stage2_terms(batch: dict[str, Any], outputs: list[Decoded], weights: VideoLossWeights, clips: int) -> dict[str, torch.Tensor]:
    """Every stage-2 term of a batch of ``clips`` clips and their weighted ``total``."""
    collected: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
    for out in outputs:
        for name, value in _group_terms(batch, out, weights.gt > 0).items():
            collected[name].append(value)
    names = ["memory_mse", "memory_cosine", "mask_bce", "mask_dice", "score_bce"] + (
        ["gt_mask", "gt_iou", "gt_score"] if weights.gt > 0 else []
    )
    device = batch["input"].device
    terms = {}
    for name in names:
        parts = collected.get(name, [])
        if not parts:
            terms[name] = torch.zeros((), device=device)
            continue
        values, where = torch.cat([v for v, _ in parts]), torch.cat([c for _, c in parts])
        terms[name] = per_image_mean(values, where, clips) if len(values) else torch.zeros((), device=device)
    total = weights.feature * terms["memory_mse"] + weights.cosine * terms["memory_cosine"]
    total = total + weights.mask * (terms["mask_bce"] + terms["mask_dice"]) + weights.score * terms["score_bce"]
    if weights.gt > 0:
        total = total + weights.gt * (terms["gt_mask"] + IOU_WEIGHT * terms["gt_iou"] + SCORE_WEIGHT * terms["gt_score"])
    terms["total"] = total
    return terms
