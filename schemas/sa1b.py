"""The SA-1B per-image JSON (``sa_N.json``), as published with the dataset.

Field names and nesting follow the release exactly, so a real SA-1B file validates unchanged; the demo writer
produces the same models. Coordinates are in original image pixels; boxes are COCO ``[x, y, w, h]``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RLE(BaseModel):
    """A COCO compressed RLE; ``size`` is ``[height, width]``."""

    model_config = ConfigDict(extra="forbid")
    size: tuple[int, int]
    counts: str


class ImageInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    image_id: int = Field(ge=0)
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    file_name: str


class Annotation(BaseModel):
    """One mask of an SA-1B image."""

    model_config = ConfigDict(extra="allow")
    id: int
    bbox: tuple[float, float, float, float]
    area: int = Field(ge=0)
    segmentation: RLE
    point_coords: list[tuple[float, float]]
    predicted_iou: float
    stability_score: float
    crop_box: tuple[float, float, float, float]


class SA1BRecord(BaseModel):
    """The whole ``sa_N.json``: one image and its masks."""

    model_config = ConfigDict(extra="allow")
    image: ImageInfo
    annotations: list[Annotation]

    @model_validator(mode="after")
    def _masks_match_image(self) -> SA1BRecord:
        want = (self.image.height, self.image.width)
        for i, ann in enumerate(self.annotations):
            if tuple(ann.segmentation.size) != want:
                raise ValueError(
                    f"annotations[{i}] (id {ann.id}): segmentation size {list(ann.segmentation.size)} "
                    f"does not match the image's [height, width] {list(want)}"
                )
        return self
