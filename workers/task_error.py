"""What a trunk codec costs where it matters: the frozen heads' masks from the decoded trunk against the exact one.

A relative RMS error of 1% says little about the masks a student is trained to reproduce. On the teacher actor,
where the exact trunk and the heads already are, each image's trunk goes through the run's codec and back (here in
torch, on the trunk's device: the same arithmetic as ``esam3.schemas.codecs``), the row's prompts are decoded
again from it, and the row keeps the mean IoU between the two sets of masks (logits > 0; the 3 multimask and the
single-mask output of every prompt) and the mean absolute error of the predicted IoU scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from esam3.schemas.codecs import Basis, FeatureCodec

if TYPE_CHECKING:
    from esam3.workers.teacher import PromptTargets


def roundtrip(trunk: torch.Tensor, codec: FeatureCodec, basis: Basis | None = None) -> torch.Tensor:
    """``decode(encode(trunk))`` for a (C, g, g) trunk, computed where the trunk is."""
    x = trunk.detach().float()
    if codec == FeatureCodec.FP16:
        return x.half().float()
    if codec == FeatureCodec.BF16:
        return x.bfloat16().float()
    channels = x.shape[0]
    if codec == FeatureCodec.INT8:
        return _int8_rows(x.reshape(channels, -1)).reshape(x.shape)
    if basis is None:
        raise ValueError("the lowrank codec needs the store's basis")
    mean = torch.from_numpy(basis.mean).to(x.device)
    components = torch.from_numpy(basis.components).to(x.device)
    coefficients = _int8_rows(components.T @ (x.reshape(channels, -1) - mean[:, None]))
    return (components @ coefficients + mean[:, None]).reshape(x.shape)


def _int8_rows(rows: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per row, quantised and dequantised (``esam3.schemas.codecs._per_row_int8``)."""
    absmax = rows.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    return torch.round(rows / scale[:, None]).clamp_(-127, 127) * scale[:, None]


@dataclass(frozen=True)
class TaskError:
    mask_iou: float  # mean IoU of the heads' masks (decoded trunk vs exact trunk), 1 = the same masks
    iou_error: float  # mean |predicted IoU (decoded) - predicted IoU (exact)|


def task_error(exact: PromptTargets, approx: PromptTargets) -> TaskError:
    """Compare the heads' outputs for the same prompts from the exact and from the decoded trunk."""
    iou = mask_iou(torch.cat([exact.multi, exact.single], dim=1) > 0, torch.cat([approx.multi, approx.single], dim=1) > 0)
    return TaskError(float(iou.mean()), float((exact.iou - approx.iou).abs().mean()))


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of boolean masks (..., h, w) -> (...); two empty masks are the same mask (IoU 1)."""
    inter = (a & b).sum(dim=(-2, -1)).float()
    union = (a | b).sum(dim=(-2, -1)).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
