"""What a trunk codec costs where it matters: the frozen heads' masks from the decoded trunk against the exact one.

A relative RMS error of 1% says little about the masks a student is trained to reproduce. On the teacher actor,
where the exact trunk and the heads already are, each image's trunk is quantised on the trunk's device
(``esam3.workers.device_codecs``, whose codes the store keeps) and decoded again there, the row's prompts are decoded
again from it, and the row keeps the mean IoU between the two sets of masks (logits > 0; the 3 multimask and the
single-mask output of every prompt) and the mean absolute error of the predicted IoU scores.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from esam3.workers.teacher import PromptTargets


def task_error(exact: PromptTargets, approx: PromptTargets) -> torch.Tensor:
    """Compare the heads' outputs for the same prompts from the exact and from the decoded trunk: float64 (2,) on
    their device, the mean IoU of the masks (1 = the same masks) and the mean |predicted IoU difference| (kept on
    the device: the actor reads it with the row's other targets, without a synchronisation of its own)."""
    iou = mask_iou(torch.cat([exact.multi, exact.single], dim=1) > 0, torch.cat([approx.multi, approx.single], dim=1) > 0)
    return torch.stack([iou.mean(), (exact.iou - approx.iou).abs().mean()]).double()


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of boolean masks (..., h, w) -> (...); two empty masks are the same mask (IoU 1)."""
    inter = (a & b).sum(dim=(-2, -1)).float()
    union = (a | b).sum(dim=(-2, -1)).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
