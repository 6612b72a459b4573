"""The SA-V per-video annotation JSON (``sav_XXXXXX_manual.json``), as published with the dataset.

``masklet`` is a list over annotated frames (every 4th frame of the 24 fps video, i.e. 6 fps) of lists over
objects of COCO RLEs (an empty mask where the object is not visible). Per-object fields (``masklet_id``,
``masklet_first_appeared_frame``, ...) are lists with one entry per object. Unknown extra fields are kept.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from esam3.schemas.sa1b import RLE

#: SA-V videos are 24 fps and annotated on every 4th frame (6 fps).
SAV_FPS = 24
SAV_ANNOTATION_STRIDE = 4


class SAVRecord(BaseModel):
    model_config = ConfigDict(extra="allow")
    video_id: str
    video_duration: float = Field(ge=0)
    video_frame_count: int = Field(gt=0)
    video_height: int = Field(gt=0)
    video_width: int = Field(gt=0)
    video_resolution: int = Field(ge=0)
    video_environment: str = ""
    video_split: str = ""
    masklet: list[list[RLE]]
    masklet_id: list[int]
    masklet_size_rel: list[float] = []
    masklet_size_abs: list[float] = []
    masklet_size_bucket: list[str] = []
    masklet_visibility_changes: list[int] = []
    masklet_first_appeared_frame: list[float]
    masklet_frame_count: list[int] = []
    masklet_edited_frame_count: list[int] = []
    masklet_type: list[str] = []
    masklet_stability_score: list[float | None] | None = None
    masklet_num: int = Field(ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> SAVRecord:
        n = self.masklet_num
        for name in ("masklet_id", "masklet_first_appeared_frame"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries but masklet_num is {n}")
        expected = -(-self.video_frame_count // SAV_ANNOTATION_STRIDE)
        if len(self.masklet) != expected:
            raise ValueError(
                f"masklet has {len(self.masklet)} annotated frames but video_frame_count {self.video_frame_count} "
                f"implies {expected} (every {SAV_ANNOTATION_STRIDE}th frame)"
            )
        want = (self.video_height, self.video_width)
        for t, objects in enumerate(self.masklet):
            if len(objects) != n:
                raise ValueError(f"masklet[{t}] has {len(objects)} objects but masklet_num is {n}")
            for j, rle in enumerate(objects):
                if tuple(rle.size) != want:
                    raise ValueError(f"masklet[{t}][{j}] size {list(rle.size)} does not match [video_height, video_width] {list(want)}")
        return self
