"""Which mask logits of an image's prompts the store keeps, at which size, and what storing them costs the masks.

The tracker gives 4 outputs per prompt (3 multimask + 1 single) at m x m (288 at full size); stage 1 is judged by
one of them, the one the tracker uses (``TeacherHeads.picked_output``). ``--mask-outputs chosen`` (the default)
keeps that one and its index, ``all`` keeps the 4; ``--mask-size`` stores them smaller (bilinear, antialiased), and
the loss brings them back to m x m (bilinear) before comparing. Each image row records the mean IoU between the
teacher's masks (logits > 0) and the masks of what a trainer reads back (decoded, at m x m): the whole cost of
the logit codec and the resize, measured on the device where the logits were made.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from esam3.schemas.prompts import MaskOutputs
from esam3.workers.device_codecs import Quantised, dequantise
from esam3.workers.task_error import mask_iou


def resize_logits(x: torch.Tensor, size: int) -> torch.Tensor:
    """Mask logits (..., h, w) -> (..., size, size): bilinear, antialiased when shrinking (no aliasing of thin
    parts); the same tensor when the size is already right."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    lead = x.shape[:-2]
    flat = x.reshape(-1, 1, *x.shape[-2:]).float()
    if not flat.shape[0]:
        return x.new_zeros((*lead, size, size))
    out = F.interpolate(flat, size=(size, size), mode="bilinear", align_corners=False, antialias=size < x.shape[-1])
    return out.reshape(*lead, size, size)


def picked_logits(single: torch.Tensor, multi: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
    """The logits (K, m, m) of output ``pick`` (K,) (0 = single, 1..3 = multimask) of each prompt."""
    logits = torch.cat([single, multi], dim=1)
    return logits[torch.arange(len(pick), device=logits.device), pick.to(logits.device)]


def stored_logits(
    single: torch.Tensor, multi: torch.Tensor, pick: torch.Tensor, outputs: MaskOutputs, size: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """What the store keeps of the prompts' logits, as (teacher's logits, what is stored): ``chosen_logits``
    (K, size, size), or ``multi_logits`` (K, 3, ...) and ``single_logits`` (K, 1, ...)."""
    if MaskOutputs(outputs) == MaskOutputs.CHOSEN:
        chosen = picked_logits(single, multi, pick)
        return {"chosen_logits": (chosen, resize_logits(chosen, size))}
    return {"multi_logits": (multi, resize_logits(multi, size)), "single_logits": (single, resize_logits(single, size))}


def logits_mask_iou(pairs: list[tuple[torch.Tensor, Quantised]]) -> torch.Tensor:
    """Mean IoU (a 0-d float64 tensor on the logits' device) of the masks of each teacher's logits (..., m, m) and of
    the logits a reader decodes from what is stored of them (maybe smaller), brought back to m x m."""
    ious = [mask_iou(resize_logits(dequantise(q), original.shape[-1]) > 0, original > 0).flatten() for original, q in pairs]
    values = torch.cat(ious)
    return values.mean().double() if values.numel() else values.new_ones((), dtype=torch.float64)
