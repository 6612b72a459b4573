"""Prompt sampling: K prompts per image from its ground-truth masks, deterministic for (image key, seed).

Rules (``PromptConfig`` holds the numbers):

* **Eligible masks.** A mask is skipped when its area, mapped to the teacher's square frame, is below
  ``min_area_model_px`` (default 64 px, i.e. about 2x2 cells of the teacher's 288x288 low-res mask at full
  size): smaller objects cannot be prompted or supervised meaningfully. Empty masks are always skipped.
* **Which masks.** ``min(num_prompts, eligible)`` distinct masks, drawn uniformly without replacement.
* **Kinds.** Each prompt's kind is drawn from ``mix`` (point, box, point+box).
* **Positive point.** A foreground pixel drawn uniformly; the point is that pixel's centre (col + 0.5, row + 0.5).
* **Negative points.** On point kinds, 0..``max_negative_points`` (uniform) distinct background pixels, drawn
  from the mask's box grown by 10% per side, then from the whole image; fewer only if the mask covers
  every other pixel.
* **Box.** The mask's tight box (pixel edges, XYXY) with per-coordinate Gaussian noise of std
  ``box_jitter`` x side length, clipped to ``box_jitter_max_px`` and to the image.

Everything is in original pixels and also mapped to the teacher frame by the same squash resize the teacher's
preprocessing uses: ``x' = x * S / W``, ``y' = y * S / H`` for an ``S`` x ``S`` frame (S = 1008 for SAM3; it is
a parameter read from the teacher's config, never assumed here).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from esam3.schemas.prompts import PromptConfig, PromptKind
from esam3.schemas.rle import Runs

#: Label of a padding slot in ``PromptSet.labels`` (SAM's convention for "no point").
PAD = -1
_NEGATIVE_TRIES = 32


@dataclass(frozen=True)
class PromptSet:
    """K prompts for one image. Shapes: K prompts, P = 1 + max_negative_points point slots.

    ``points`` (K, P, 2) float32 XY, ``labels`` (K, P) int8 (1 positive, 0 negative, -1 padding),
    ``boxes`` (K, 4) float32 XYXY (NaN for point-only prompts); ``*_model`` are the same in the teacher frame.
    ``mask_index`` (K,) int32 indexes the masks the sampler was given.
    """

    mask_index: np.ndarray
    kinds: np.ndarray
    points: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray
    points_model: np.ndarray
    boxes_model: np.ndarray
    image_size: tuple[int, int]  # (height, width) of the original image
    model_size: int

    def __len__(self) -> int:
        return len(self.mask_index)


def prompt_rng(key: str, seed: int) -> np.random.Generator:
    """A generator that depends only on (key, seed): stable across processes and Python versions."""
    digest = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")
    return np.random.default_rng([seed, digest])


def to_model_frame(xy: np.ndarray, image_size: tuple[int, int], model_size: int) -> np.ndarray:
    """Map XY coordinates (..., 2k) from the original (height, width) image to the squashed S x S frame."""
    height, width = image_size
    scale = np.tile(np.array([model_size / width, model_size / height], dtype=np.float64), xy.shape[-1] // 2)
    return (xy * scale).astype(np.float32)


def jittered_box(runs: Runs, rng: np.random.Generator, jitter: float, max_px: float) -> np.ndarray:
    """The mask's tight XYXY box with bounded Gaussian noise per coordinate, clipped to the image."""
    box = np.asarray(runs.bbox_xyxy(), dtype=np.float64)
    side = np.array([box[2] - box[0], box[3] - box[1]] * 2)
    noise = np.clip(rng.normal(0.0, 1.0, 4) * jitter * side, -max_px, max_px)
    out = box + noise
    out[[0, 2]] = np.clip(out[[0, 2]], 0, runs.width)
    out[[1, 3]] = np.clip(out[[1, 3]], 0, runs.height)
    # Noise may fold a tiny box over itself; keep the corners ordered.
    return np.concatenate([np.minimum(out[:2], out[2:]), np.maximum(out[:2], out[2:])])


def positive_point(runs: Runs, rng: np.random.Generator) -> np.ndarray:
    """The centre (x, y) of a foreground pixel drawn uniformly."""
    row, col = runs.sample_foreground(rng, 1)[0]
    return np.array([col + 0.5, row + 0.5])


def negative_points(runs: Runs, rng: np.random.Generator, n: int) -> np.ndarray:
    """Up to ``n`` distinct background pixel centres (x, y): near the mask first, then anywhere in the image.

    Fewer than ``n`` only when the mask covers every other pixel. Draws by rejection first (cheap) and
    falls back to listing the background pixels of the region when rejection does not find enough.
    """
    if n == 0:
        return np.zeros((0, 2))
    x0, y0, x1, y1 = runs.bbox_xyxy()
    grow_x, grow_y = 0.1 * (x1 - x0), 0.1 * (y1 - y0)
    near = (
        max(0, int(y0 - grow_y)),
        min(runs.height, int(np.ceil(y1 + grow_y))),
        max(0, int(x0 - grow_x)),
        min(runs.width, int(np.ceil(x1 + grow_x))),
    )
    found: list[int] = []  # flat column-major pixel indices, in draw order
    for r0, r1, c0, c1 in (near, (0, runs.height, 0, runs.width)):
        rows = rng.integers(r0, r1, _NEGATIVE_TRIES * n)
        cols = rng.integers(c0, c1, _NEGATIVE_TRIES * n)
        flat = (cols * runs.height + rows)[~runs.contains(rows, cols)]
        _extend_unique(found, flat, n)
        if len(found) < n:  # mostly covered: list what is left and draw without replacement
            region = ~runs.to_mask()[r0:r1, c0:c1]
            rr, cc = np.nonzero(region)
            flat = np.setdiff1d((cc + c0) * runs.height + (rr + r0), found)
            _extend_unique(found, rng.permutation(flat), n)
        if len(found) == n:
            break
    flat = np.asarray(found, dtype=np.int64)
    return np.stack([flat // runs.height + 0.5, flat % runs.height + 0.5], axis=1).astype(np.float64)


def _extend_unique(found: list[int], candidates: np.ndarray, n: int) -> None:
    seen = set(found)
    for value in candidates.tolist():
        if len(found) == n:
            return
        if value not in seen:
            seen.add(value)
            found.append(value)


def sample_prompts(key: str, masks: Sequence[Runs], image_size: tuple[int, int], model_size: int, config: PromptConfig) -> PromptSet:
    """Sample prompts for the image ``key`` from its validated masks (see the module docstring for the rules)."""
    height, width = image_size
    for index, runs in enumerate(masks):
        if (runs.height, runs.width) != (height, width):
            raise ValueError(f"{key}: mask {index} is {runs.height}x{runs.width} but the image is {height}x{width}")
    rng = prompt_rng(key, config.seed)
    area_scale = model_size * model_size / (height * width)
    areas = np.array([m.area for m in masks], dtype=np.float64)
    eligible = np.flatnonzero((areas > 0) & (areas * area_scale >= config.min_area_model_px))
    chosen = rng.choice(eligible, size=min(config.num_prompts, len(eligible)), replace=False)
    # Enum order, not dict order, so the same mix written another way draws the same kinds.
    weights = np.array([config.mix.get(kind.label, 0.0) for kind in PromptKind], dtype=np.float64)
    kinds = rng.choice(np.array(list(PromptKind), dtype=np.int8), size=len(chosen), p=weights / weights.sum())
    slots = 1 + config.max_negative_points
    points = np.zeros((len(chosen), slots, 2), dtype=np.float32)
    labels = np.full((len(chosen), slots), PAD, dtype=np.int8)
    boxes = np.full((len(chosen), 4), np.nan, dtype=np.float32)
    for i, (index, kind) in enumerate(zip(chosen, kinds)):
        runs = masks[index]
        if kind in (PromptKind.POINT, PromptKind.POINT_BOX):
            points[i, 0], labels[i, 0] = positive_point(runs, rng), 1
            negatives = negative_points(runs, rng, int(rng.integers(0, config.max_negative_points + 1)))
            points[i, 1 : 1 + len(negatives)], labels[i, 1 : 1 + len(negatives)] = negatives, 0
        if kind in (PromptKind.BOX, PromptKind.POINT_BOX):
            boxes[i] = jittered_box(runs, rng, config.box_jitter, config.box_jitter_max_px)
    return PromptSet(
        mask_index=chosen.astype(np.int32),
        kinds=kinds,
        points=points,
        labels=labels,
        boxes=boxes,
        points_model=np.where(labels[..., None] == PAD, 0.0, to_model_frame(points, image_size, model_size)).astype(np.float32),
        boxes_model=to_model_frame(boxes, image_size, model_size),
        image_size=(height, width),
        model_size=model_size,
    )
