"""Stage-1 losses: the student's trunk against the cached teacher trunk, and prompt-in-the-loop through the frozen heads.

Feature terms (the public EfficientSAM3 stage 1): per-pixel MSE summed over channels and averaged over the g x g
tokens, and (1 - cosine over channels) averaged over tokens.

Prompt-in-the-loop: the student's trunk goes through the store's frozen heads (tracker neck, prompt encoder, mask
decoder) with each image's cached prompts; the output the teacher would use for that prompt (its best multimask
output for a single click, the single-mask output otherwise: ``TeacherHeads.picked_output``) is the only one decoded
and is matched to the teacher's cached logits of the same output with BCE (sigmoid targets) + Dice, and the IoU
head's scores of that decoder pass (3 for multimask, 1 single) with L1. The store keeps that output alone
(``chosen_logits``, the default) or all 4; logits stored smaller than the decoder's (``--mask-size``) are brought
back to its size (bilinear) before the comparison.
An optional ground-truth term does BCE + Dice against the stored GT mask of each prompted object.

How the defaults weigh the terms (``LossWeights``): the MSE summed over C channels grows with C (SAM3: 1024), so
it dominates at the start and the mask terms take over once the features are close; the public prompt-in-the-loop
fine-tune scales the MSE by 0.0015 instead, from a student already trained on features (``--feature-weight
0.0015`` reproduces it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from esam3.workers.heads import TeacherHeads
from esam3.workers.mask_targets import picked_logits, resize_logits


@dataclass(frozen=True)
class LossWeights:
    feature: float = 1.0  # per-pixel MSE (summed over channels)
    cosine: float = 1.0  # 1 - cosine over channels
    prompt: float = 1.0  # BCE + Dice of the picked mask against the teacher's
    iou: float = 1.0  # L1 of the 4 predicted IoU scores against the teacher's
    gt: float = 0.0  # BCE + Dice against the stored ground-truth mask

    @property
    def needs_prompts(self) -> bool:
        return self.prompt > 0 or self.iou > 0 or self.gt > 0


def feature_terms(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, torch.Tensor]:
    """``mse`` and ``cosine`` of (B, C, g, g) maps, in float32."""
    s, t = student.float(), teacher.float()
    return {
        "mse": (s - t).pow(2).sum(dim=1).mean(),
        "cosine": (1 - F.cosine_similarity(s, t, dim=1, eps=1e-6)).mean(),
    }


def mask_terms(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-mask BCE (mean over pixels) and 1 - soft Dice (N,) of logits (N, h, w) against soft targets in 0..1."""
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").flatten(1).mean(1)
    p, t = logits.sigmoid().flatten(1), targets.flatten(1)
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return bce, dice


def per_image_mean(values: torch.Tensor, image: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Average per-prompt values within each image, then over the batch's ``batch_size`` images.

    Every image weighs the same whatever its prompt count, so the loss of a batch split over ranks averages
    (as DDP averages gradients) to the loss of the whole batch.
    """
    image = image.to(values.device)
    counts = torch.bincount(image, minlength=batch_size).to(values.dtype)
    return (values / counts[image]).sum() / batch_size


@dataclass
class PromptOutputs:
    """The heads' outputs for every valid prompt of a batch, flattened: N prompts over B images."""

    image: torch.Tensor  # (N,) which image of the batch
    slot: torch.Tensor  # (N,) which prompt slot of that image
    pick: torch.Tensor  # (N,) the output the teacher uses (0 = single, 1..3 = multimask)
    chosen: torch.Tensor  # (N, m, m) the student's logits of the output it is judged by (see decode_batch)
    iou: torch.Tensor  # (N, 4) predicted IoU (single, then multimask); NaN for a decoder pass that did not run


def chosen_prompts(valid: torch.Tensor, max_prompts: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """(N, 2) (image, slot) of the prompts to decode: every valid one, or at most ``max_prompts`` per image drawn
    with ``generator`` (seeded per step by the trainer, so a resumed run draws the same ones)."""
    pairs = []
    valid = valid.cpu()  # one transfer per batch
    for b in range(valid.shape[0]):
        slots = torch.nonzero(valid[b]).flatten()
        if max_prompts is not None and len(slots) > max_prompts:
            slots = slots[torch.randperm(len(slots), generator=generator)[:max_prompts]].sort().values
        pairs += [(b, int(k)) for k in slots]
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


def decode_batch(
    heads: TeacherHeads,
    trunk: torch.Tensor,
    batch: dict[str, Any],
    pairs: torch.Tensor,
    own_pick: bool = False,
) -> PromptOutputs:
    """Run the frozen heads on ``trunk`` (B, C, g, g) for the prompts ``pairs`` (from :func:`chosen_prompts`).

    Training (``own_pick`` False): the student is judged by the output the teacher uses, and only the decoder pass
    that gives it runs (its multimask pass for one click, its single-mask pass otherwise). Eval (``own_pick``): both
    passes run and the student's own scores choose its output, as it will when it is used. Gradients flow through
    the heads into ``trunk``; the heads' own parameters are the caller's to freeze. Prompt coordinates are the
    store's (continuous, in the teacher frame): SAM's pixel-index convention subtracts 0.5.
    """
    embeddings = heads.image_embeddings(trunk)
    m = heads.geometry.mask_size
    image, slot = pairs[:, 0].to(trunk.device), pairs[:, 1].to(trunk.device)
    if len(pairs) == 0:
        return PromptOutputs(image, slot, image, trunk.new_zeros((0, m, m)), trunk.new_zeros((0, 4)))
    points, labels, boxes = batch["prompt_points"][image, slot], batch["prompt_labels"][image, slot], batch["prompt_boxes"][image, slot]
    pick = (
        batch["chosen_output"][image, slot] if "chosen_output" in batch else heads.picked_output(labels, boxes, batch["iou"][image, slot])
    )
    if not own_pick:
        out = heads.decode_prompts(embeddings, points - 0.5, labels, boxes - 0.5, image=image, choose=pick)
        return PromptOutputs(image, slot, pick, out["chosen"], out["iou"])
    out = heads.decode_prompts(embeddings, points - 0.5, labels, boxes - 0.5, image=image)
    logits = torch.cat([out["single"], out["multi"]], dim=1)
    own = heads.picked_output(labels, boxes, out["iou"])
    return PromptOutputs(image, slot, pick, logits[torch.arange(len(own), device=own.device), own], out["iou"])


def teacher_outputs(batch: dict[str, Any], outputs: PromptOutputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached teacher logits of the output each prompt is judged by, at the student's mask size (N, m, m), and
    its IoU scores (N, 4)."""
    image, slot = outputs.image, outputs.slot
    if "chosen_logits" in batch:  # the store kept the picked output only (decode_batch judges by that one)
        logits = batch["chosen_logits"][image, slot]
    else:
        logits = picked_logits(batch["single_logits"][image, slot], batch["multi_logits"][image, slot], outputs.pick)
    return resize_logits(logits, outputs.chosen.shape[-1]), batch["iou"][image, slot]


def prompt_terms(batch: dict[str, Any], outputs: PromptOutputs, with_gt: bool) -> dict[str, torch.Tensor]:
    """BCE / Dice of the student's mask vs the teacher's (the output the teacher uses), the IoU-head L1 over the scores
    of the decoder pass that ran, and (``with_gt``) BCE / Dice vs GT; each averaged per image (:func:`per_image_mean`)."""
    names = ("mask_bce", "mask_dice", "iou_l1") + (("gt_bce", "gt_dice") if with_gt else ())
    if len(outputs.image) == 0:
        zero = torch.zeros((), device=outputs.chosen.device)  # no prompt in this batch: only the feature terms train
        return {name: zero for name in names}
    batch_size = batch["prompt_valid"].shape[0]
    teacher_logits, teacher_iou = teacher_outputs(batch, outputs)
    student = outputs.chosen.float()
    per_prompt = dict(zip(("mask_bce", "mask_dice"), mask_terms(student, teacher_logits.float().sigmoid())))
    ran = ~torch.isnan(outputs.iou)
    errors = (outputs.iou.float() - teacher_iou.float()).abs()
    per_prompt["iou_l1"] = torch.where(ran, errors, torch.zeros_like(errors)).sum(1) / ran.sum(1)
    if with_gt:
        per_prompt["gt_bce"], per_prompt["gt_dice"] = mask_terms(student, batch["gt_masks"][outputs.image, outputs.slot].float())
    return {name: per_image_mean(per_prompt[name], outputs.image, batch_size) for name in names}


def total_loss(terms: dict[str, torch.Tensor], weights: LossWeights) -> torch.Tensor:
    """The weighted sum that is back-propagated."""
    total = weights.feature * terms["mse"] + weights.cosine * terms["cosine"]
    if "mask_bce" in terms:
        total = total + weights.prompt * (terms["mask_bce"] + terms["mask_dice"]) + weights.iou * terms["iou_l1"]
    if "gt_bce" in terms:
        total = total + weights.gt * (terms["gt_bce"] + terms["gt_dice"])
    return total


def stage1_terms(
    heads: TeacherHeads | None,
    student_trunk: torch.Tensor,
    batch: dict[str, Any],
    weights: LossWeights,
    max_prompts: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[dict[str, torch.Tensor], PromptOutputs | None]:
    """Every stage-1 loss term of one batch and their weighted ``total``; the heads' outputs when prompts ran."""
    terms = feature_terms(student_trunk, batch["trunk"])
    outputs = None
    if heads is not None and weights.needs_prompts:
        pairs = chosen_prompts(batch["prompt_valid"], max_prompts, generator)
        outputs = decode_batch(heads, student_trunk, batch, pairs)
        terms.update(prompt_terms(batch, outputs, with_gt=weights.gt > 0))
    terms["total"] = total_loss(terms, weights)
    return terms, outputs
