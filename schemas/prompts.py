"""Configuration of the prompt sampler: how many prompts per image, of which kinds, with how much noise."""

from __future__ import annotations

from enum import Enum, IntEnum

from pydantic import BaseModel, ConfigDict, Field, field_validator

from esam3.schemas.errors import ConfigError


class PromptKind(IntEnum):
    """Stored as int8 in the cache. Negative points may be added to the two kinds that carry points."""

    POINT = 0
    BOX = 1
    POINT_BOX = 2

    @property
    def label(self) -> str:
        return {0: "point", 1: "box", 2: "point+box"}[int(self)]

    @classmethod
    def from_label(cls, label: str) -> PromptKind:
        for kind in cls:
            if kind.label == label:
                return kind
        raise ValueError(f"unknown prompt kind {label!r}: use point, box or point+box")


class MaskOutputs(str, Enum):
    """Which of the tracker's 4 mask outputs per prompt the store keeps (``--mask-outputs``)."""

    CHOSEN = "chosen"  # the one the tracker uses (best-scored multimask for one click, else single): what stage 1 trains on
    ALL = "all"  # the 3 multimask outputs and the single-mask one


#: Bounds of ``--mask-size``: the stored logits' side, at most the decoder's own (288 at full size).
MIN_MASK_SIZE, MAX_MASK_SIZE = 8, 1024


def check_mask_size(mask_size: int | None, decoder_size: int) -> None:
    """``--mask-size`` is at most the decoder's own size (larger would only interpolate), known once the teacher is."""
    if mask_size is not None and mask_size > decoder_size:
        raise ConfigError(
            f"--mask-size {mask_size}: this teacher's decoder gives {decoder_size}x{decoder_size} mask logits; use at most {decoder_size}"
        )


class PromptConfig(BaseModel):
    """Sampling rules (see ``workers/prompts.py`` for how each is applied)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    num_prompts: int = Field(16, ge=1, le=1024, description="Prompts per image (fewer if fewer masks qualify).")
    mix: dict[str, float] = Field(
        default_factory=lambda: {"point": 1.0, "box": 1.0, "point+box": 1.0},
        description="Relative frequency of each prompt kind: point, box, point+box.",
    )
    max_negative_points: int = Field(2, ge=0, le=16, description="Up to this many negative points (0..N, uniform) on point prompts.")
    box_jitter: float = Field(0.1, ge=0, le=1, description="Box noise std as a fraction of the box side.")
    box_jitter_max_px: float = Field(20.0, ge=0, description="Box noise bound per coordinate, original pixels.")
    min_area_model_px: float = Field(64.0, ge=0, description="Skip masks whose area in the teacher frame is below this many pixels.")
    seed: int = Field(0, ge=0, description="Prompt seed; with the image key it fixes every prompt.")
    mask_outputs: MaskOutputs = Field(MaskOutputs.CHOSEN, description="Mask outputs kept per prompt: chosen (the tracker's) or all 4.")
    mask_size: int | None = Field(
        None,
        ge=MIN_MASK_SIZE,
        le=MAX_MASK_SIZE,
        description="Side of the stored mask logits (resized with antialiasing); None: the decoder's own (the loss's size).",
    )

    @field_validator("mix")
    @classmethod
    def _check_mix(cls, mix: dict[str, float]) -> dict[str, float]:
        for label, weight in mix.items():
            PromptKind.from_label(label)
            if not weight >= 0 or weight == float("inf"):
                raise ValueError(f"weight of {label!r} must be >= 0, got {weight}")
        if sum(mix.values()) <= 0:
            raise ValueError("at least one prompt kind needs a positive weight")
        return mix
