"""J&F, the video object segmentation score of DAVIS 2017, written from its definitions.

* J (region similarity): IoU of the predicted and true masks; 1 when both are empty.
* F (contour accuracy): the F-measure of the two masks' boundaries, each boundary pixel counting as matched when the
  other boundary passes within a disk of ``ceil(0.008 * sqrt(H^2 + W^2))`` pixels (8 at 480 x 854). A boundary pixel
  is a foreground or background pixel whose right, lower or lower-right neighbour has the other value (DAVIS's
  convention). Both boundaries empty: 1; one empty: 0.
* Per object: the mean over the video's frames without its first (the prompt) and last; J&F = (mean J + mean F) / 2
  over all objects of all videos.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

BOUNDARY_SHARE = 0.008


def jaccard(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU of two bool masks (1 when both are empty)."""
    union = np.logical_or(pred, gt).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, gt).sum() / union)


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """Pixels whose right, lower or lower-right neighbour differs (the last row / column compare within the image)."""
    mask = np.asarray(mask, dtype=bool)
    east, south, southeast = np.zeros_like(mask), np.zeros_like(mask), np.zeros_like(mask)
    east[:, :-1], south[:-1, :], southeast[:-1, :-1] = mask[:, 1:], mask[1:, :], mask[1:, 1:]
    out = (mask ^ east) | (mask ^ south) | (mask ^ southeast)
    out[-1, :] = mask[-1, :] ^ east[-1, :]
    out[:, -1] = mask[:, -1] ^ south[:, -1]
    out[-1, -1] = False
    return out


def disk_radius(height: int, width: int) -> int:
    return math.ceil(BOUNDARY_SHARE * math.hypot(height, width))


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a disk {x^2 + y^2 <= radius^2}."""
    if radius < 1 or not mask.any():
        return mask.copy()
    r = torch.arange(-radius, radius + 1, dtype=torch.float32)
    disk = ((r[:, None] ** 2 + r[None, :] ** 2) <= radius**2).float()[None, None]
    x = torch.from_numpy(mask.astype(np.float32))[None, None]
    return (F.conv2d(x, disk, padding=radius)[0, 0] > 0.5).numpy()


def boundary_f(pred: np.ndarray, gt: np.ndarray, radius: int | None = None) -> float:
    """F-measure of the boundaries of two bool masks (see the module docstring)."""
    radius = disk_radius(*gt.shape) if radius is None else radius
    pred_b, gt_b = boundary_map(pred), boundary_map(gt)
    n_pred, n_gt = int(pred_b.sum()), int(gt_b.sum())
    if n_pred == 0 and n_gt == 0:
        return 1.0
    if n_pred == 0 or n_gt == 0:
        return 0.0
    precision = float((pred_b & dilate(gt_b, radius)).sum()) / n_pred
    recall = float((gt_b & dilate(pred_b, radius)).sum()) / n_gt
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


@dataclass
class ObjectScore:
    """One object of one video: J and F per scored frame."""

    video: str
    object_id: int
    j: list[float] = field(default_factory=list)
    f: list[float] = field(default_factory=list)

    @property
    def mean_j(self) -> float:
        return float(np.mean(self.j)) if self.j else float("nan")

    @property
    def mean_f(self) -> float:
        return float(np.mean(self.f)) if self.f else float("nan")


def score_object(video: str, object_id: int, preds: Sequence[np.ndarray], gts: Sequence[np.ndarray]) -> ObjectScore:
    """J and F of every frame of one object's track but the first and the last (DAVIS 2017)."""
    if len(preds) != len(gts):
        raise ValueError(f"{video} object {object_id}: {len(preds)} predicted frames for {len(gts)} true ones")
    score = ObjectScore(video, object_id)
    for pred, gt in list(zip(preds, gts))[1:-1]:
        if pred.shape != gt.shape:
            raise ValueError(f"{video} object {object_id}: a predicted mask is {pred.shape}, the true one {gt.shape}")
        score.j.append(jaccard(pred, gt))
        score.f.append(boundary_f(pred, gt))
    return score


@dataclass(frozen=True)
class JFSummary:
    j: float
    f: float
    jf: float
    objects: int
    frames: int

    def to_dict(self) -> dict[str, float | int]:
        return {"J": self.j, "F": self.f, "J&F": self.jf, "objects": self.objects, "frames": self.frames}


def summarize(scores: Sequence[ObjectScore]) -> JFSummary:
    """Means over objects (each object's frames averaged first); objects with no scored frame are left out."""
    kept = [s for s in scores if s.j]
    if not kept:
        return JFSummary(float("nan"), float("nan"), float("nan"), 0, 0)
    j = float(np.mean([s.mean_j for s in kept]))
    f = float(np.mean([s.mean_f for s in kept]))
    return JFSummary(j, f, (j + f) / 2, len(kept), sum(len(s.j) for s in kept))
