"""What sources yield: one sample per image / video, or a failure record that says what was wrong and where."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from esam3.schemas.rle import Runs
from esam3.schemas.sa1b import SA1BRecord
from esam3.schemas.sav import SAVRecord


@dataclass(frozen=True)
class Failure:
    """A bad input: which shard and tar member, and why. Becomes a row of the store's failures table."""

    dataset: str
    shard: str
    member: str
    reason: str

    def __str__(self) -> str:
        return f"{self.shard}:{self.member}: {self.reason}"


@dataclass(frozen=True)
class ImageSample:
    """One SA-1B image: the JPEG bytes as stored (not decoded here) and its parsed annotations."""

    key: str  # "sa1b/<image_id>"
    shard: str
    member: str
    jpeg: bytes
    record: SA1BRecord
    masks: tuple[Runs, ...]  # validated runs of record.annotations[i].segmentation, same order


@dataclass(frozen=True)
class VideoSample:
    """One SA-V video: decoded RGB frames (T, H, W, 3) uint8 at ``frame_indices`` and the masklets."""

    key: str  # "sav/<video_id>"
    shard: str
    member: str
    frames: np.ndarray
    frame_indices: np.ndarray  # int64 (T,), indices into the 24 fps video
    record: SAVRecord
    masks: tuple[tuple[Runs, ...], ...]  # validated runs of record.masklet[t][object]
