"""Configuration of ``esam3 demo-data``: small SA-1B / SA-V shards generated in the released formats."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator


class DemoDataConfig(BaseModel):
    """What to generate. The same config and seed always give byte-identical shards."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    out: Path
    seed: int = Field(0, ge=0, description="Random seed; the same seed gives the same bytes.")
    sa1b_shards: int = Field(2, ge=0, le=1000, description="SA-1B tar shards to write (sa_000000.tar ...).")
    images_per_shard: int = Field(8, ge=1, le=20000, description="Images per SA-1B shard.")
    sav_shards: int = Field(1, ge=0, le=1000, description="SA-V tar shards to write (sav_000.tar ...).")
    videos_per_shard: int = Field(2, ge=1, le=5000, description="Videos per SA-V shard.")
    image_short_side: int = Field(
        1500, ge=64, le=4000, description="Short side of the largest images (SA-1B's is 1500); others are smaller."
    )
    video_width: int = Field(640, ge=64, le=4096, description="Video width in pixels (even).")
    video_height: int = Field(480, ge=64, le=4096, description="Video height in pixels (even).")
    video_seconds: float = Field(3.0, gt=0, le=60, description="Video length in seconds, at 24 fps.")

    @model_validator(mode="after")
    def _check(self) -> DemoDataConfig:
        if self.sa1b_shards == 0 and self.sav_shards == 0:
            raise ValueError("nothing to write: sa1b_shards and sav_shards are both 0")
        for name in ("video_width", "video_height"):
            if getattr(self, name) % 2:
                raise ValueError(f"{name} must be even (H.264 4:2:0), got {getattr(self, name)}")
        return self

    @property
    def video_frames(self) -> int:
        return max(1, round(self.video_seconds * 24))
