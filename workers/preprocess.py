"""SAM3's image preprocessing, done the way ``Sam3ImageProcessor`` does it, on CPU workers.

Squash (no aspect-preserving pad) to S x S with torchvision's antialiased bilinear resize on the uint8 image,
then scale to [0, 1] and normalise with mean = std = 0.5. Equal (to float rounding) to
``Sam3ImageProcessor(size=S)(images).pixel_values`` — a test checks it. Every cached row records the
transform (:func:`transform_record`) so a trainer can redo it exactly, or map coordinates back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

MEAN = 0.5
STD = 0.5


def resize_uint8(image: np.ndarray, size: int) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> uint8 (3, S, S): the squash resize, done where the pixels are (a CPU worker)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected uint8 (H, W, 3) RGB, got {image.dtype} {image.shape}")
    chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    return TF.resize(chw, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float32 pixel values: scale to [0, 1], then (x - mean) / std (on any device)."""
    return pixels.to(torch.float32).div_(255.0).sub_(MEAN).div_(STD)


def preprocess_images(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """RGB uint8 images (H, W, 3), any sizes -> float32 pixel values (B, 3, S, S)."""
    if not images:
        raise ValueError("no images to preprocess")
    batch = []
    for index, image in enumerate(images):
        try:
            batch.append(resize_uint8(image, size))
        except ValueError as exc:
            raise ValueError(f"image {index}: {exc}") from None
    return normalize(torch.stack(batch))


def transform_record(original_hw: tuple[int, int], size: int, decoded_hw: tuple[int, int] | None = None) -> dict[str, Any]:
    """How an image of (height, width) became the teacher's input; stored with every row.

    ``decoded_hw`` is the size the JPEG was decoded at when DCT downscaling was used (else the original size).
    """
    height, width = original_hw
    decoded = decoded_hw or original_hw
    return {
        "resize": "squash",
        "interpolation": "bilinear-antialias-uint8",
        "decoded_height": decoded[0],
        "decoded_width": decoded[1],
        "size": size,
        "original_height": height,
        "original_width": width,
        "scale_x": size / width,
        "scale_y": size / height,
        "mean": MEAN,
        "std": STD,
    }
