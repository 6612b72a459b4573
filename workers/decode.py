"""JPEG decode for the teacher, and the same decode for a trainer from a row's transform record.

By default an image is decoded in full and squashed to S x S with SAM3's antialiased filter: exactly what
``Sam3ImageProcessor`` computes on the same file, so the cached trunk is the teacher's trunk of that file.
``--fast-decode`` (``dct_scaling``) instead asks libjpeg for the smallest DCT scale that still covers the teacher
frame (a 2250x1500 SA-1B image at half size); that saves CPU but is its own low-pass filter, so the teacher sees
a slightly different image (``benchmarks/fast_decode.py``: its CPU saving and feature error). ``transform_record`` stores the decoded size,
and :func:`teacher_input` redoes either decode from the row alone, bit for bit.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import simplejpeg
import torch

from esam3.workers.preprocess import resize_uint8


def decode_for_teacher(jpeg: bytes, size: int, dct_scaling: bool = False) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """JPEG bytes -> (uint8 (3, S, S), original (H, W), decoded (H, W))."""
    height, width, _, _ = simplejpeg.decode_jpeg_header(jpeg)
    if dct_scaling:
        image = simplejpeg.decode_jpeg(jpeg, colorspace="RGB", min_height=min(size, height), min_width=min(size, width))
    else:
        image = simplejpeg.decode_jpeg(jpeg, colorspace="RGB")
    return resize_uint8(np.asarray(image), size), (height, width), image.shape[:2]


def teacher_input(codec: str, data: bytes | memoryview, transform: dict[str, Any], size: int | None = None) -> torch.Tensor:
    """A row's stored ``input`` -> the uint8 (3, S, S) image the teacher saw (``size``: another square size for a
    student that trains smaller: the same squash from the same JPEG decode; a video frame is resized from its S x S).

    ``jpeg`` rows are decoded at the size the transform record says (full, or the DCT scale of ``--fast-decode``);
    ``png`` rows (SA-V frames) hold the S x S frame itself.
    """
    target = int(transform["size"]) if size is None else size
    if codec == "png":
        from esam3.schemas.codecs import decode_image

        frame = decode_image(codec, data, (int(transform["size"]), int(transform["size"]), 3))
        return resize_uint8(frame, target) if target != frame.shape[0] else torch.from_numpy(frame).permute(2, 0, 1).contiguous()
    if codec != "jpeg":
        raise ValueError(f"unknown input codec {codec!r}")
    decoded = (int(transform["decoded_height"]), int(transform["decoded_width"]))
    jpeg = bytes(data)
    if decoded == (int(transform["original_height"]), int(transform["original_width"])):
        image = simplejpeg.decode_jpeg(jpeg, colorspace="RGB")
    else:
        image = simplejpeg.decode_jpeg(jpeg, colorspace="RGB", min_height=decoded[0], min_width=decoded[1])
    if image.shape[:2] != decoded:
        raise ValueError(f"the JPEG decodes to {image.shape[:2]}, its transform record says {decoded}")
    return resize_uint8(np.asarray(image), target)
