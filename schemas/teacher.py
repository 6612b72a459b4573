"""Configs of the SAM3 teacher runner: which checkpoint, where it runs, and the video / concept target options."""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field
from esam3.schemas.errors import Esam3Error

#: Seeded random teachers that need no download: name -> what it is (see ``esam3.workers.teacher_loading``).
RANDOM_TEACHERS = {
    "tiny-random": "tiny config (112 px frame, 64-wide 2-layer ViT) for tests and the demo; saved and reloaded",
    "small-random": "mid-size config (336 px frame, 384-wide 12-layer ViT) for CPU benchmarks; saved and reloaded",
    "full-random": "the full SAM3 architecture (1008 px, 1024-wide 32-layer ViT) with random weights; built in memory",
}


class TeacherLoadError(Esam3Error):
    """A teacher checkpoint (or device) that cannot be used, with what was expected instead."""


class HeadsLoadError(Esam3Error):
    """A heads directory that cannot be used, with what was expected."""


class Device(str, Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class Precision(str, Enum):
    """``auto`` = bf16 autocast on CUDA, fp32 on CPU."""

    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"


class TeacherConfig(BaseModel):
    """Which SAM3 checkpoint to run and how.

    ``source`` is a local directory holding ``config.json`` + ``model.safetensors`` of a ``sam3_video`` checkpoint
    (the layout of ``facebook/sam3``), or one of ``RANDOM_TEACHERS``. Nothing is fetched from a hub.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field("tiny-random", min_length=1, description="checkpoint directory or a random teacher name")
    device: Device = Device.AUTO
    precision: Precision = Precision.AUTO
    batch_size: int = Field(8, ge=1, le=1024, description="images per trunk forward")
    seed: int = Field(0, ge=0, description="weight seed of the random teachers (ignored for checkpoints)")


class VideoPrompt(str, Enum):
    """How each SA-V object is prompted on its first annotated frame, from its ground-truth mask."""

    POINT = "point"
    BOX = "box"
    MASK = "mask"


class VideoTargetConfig(BaseModel):
    """Options of the video (memory) targets: how objects are prompted and how much of a video is used."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: VideoPrompt = VideoPrompt.MASK
    max_objects: int = Field(8, ge=1, le=256, description="masklets tracked per video (the first ones by id)")
    max_frames: int = Field(64, ge=1, le=100_000, description="annotated frames propagated per video")
    seed: int = Field(0, ge=0, description="seed of the positive point drawn for point prompts")


class ConceptTargetConfig(BaseModel):
    """Options of the concept (noun-phrase) targets for stage 3."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    top_k: int = Field(16, ge=1, le=1000, description="detector queries kept per phrase, by score")
