"""Configs of the student trainers (``esam3 train stage1`` / ``stage2``): validated before a model is built.

Every field is a CLI flag of the same name (``batch_size`` -> ``--batch-size``) and a key of a ``--config`` file
(JSON or TOML); a flag given on the command line wins over the file, the file over these defaults.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from esam3.schemas.cache import check_s3_endpoint
from esam3.schemas.teacher import Device  # auto (cuda when there is one), cpu, cuda: the teacher's choice
from esam3.schemas.errors import Esam3Error

#: The public recipe's learning rate: 1e-3 for 512 images per optimizer step, scaled linearly.
BASE_LR, BASE_BATCH = 1e-3, 512
#: Fields that may change when a run is resumed (the rest must match the checkpoint's config).
RESUMABLE = frozenset(
    {"steps", "epochs", "device", "loader_workers", "address", "resume", "checkpoint_every", "log_every", "keep_checkpoints"}
)


class TrainingInputError(Esam3Error, ValueError):
    """A trainer, eval, export or predict input that cannot be used as given; the message names the fix (exit 2)."""


class ConfigFileError(TrainingInputError):
    """A --config file that cannot be read as a config."""


class TrainerConfig(BaseModel):
    """What every trainer shares: the store, the run folder, the loop, the cluster (``esam3.train.loop``)."""

    model_config = ConfigDict(extra="forbid")

    store: str = Field(..., min_length=1, description="store root (folder or s3://)")
    out: Path = Field(..., description="run folder: checkpoints, TensorBoard logs, the resolved config")
    steps: int | None = Field(None, ge=1, description="optimizer steps (or --epochs)")
    epochs: float | None = Field(None, gt=0, description="passes over the train split (default 1 when --steps is not given)")
    accumulate: int = Field(1, ge=1, description="micro-batches per optimizer step")
    min_lr: float = Field(1e-5, ge=0, description="learning rate at the end of the cosine")
    warmup: float = Field(0.1, ge=0, lt=1, description="share of the steps spent warming up linearly")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (weights only, not norms or biases)")
    clip: float = Field(5.0, ge=0, description="gradient-norm clip (0: off)")
    val_percent: float = Field(1.0, ge=0, le=100, description="share of samples held out by key hash (stable across runs and stores)")
    version: int | None = Field(None, ge=1, description="store table version to read (default: the newest snapshot)")
    tag: str | None = Field(None, min_length=1, description="store snapshot tag to read (esam3 store info lists them)")
    device: Device = Field(Device.AUTO, description="where to train: auto (cuda if present), cpu or cuda")
    loader_workers: int = Field(2, ge=0, description="DataLoader processes (spawned) reading the store")
    workers: int = Field(1, ge=1, description="Ray Train workers (DDP ranks; one GPU each when there are GPUs)")
    address: str | None = Field(
        None, min_length=1, description="Ray to train on: auto or HOST:PORT (default: a local Ray when --workers > 1)"
    )
    seed: int = Field(0, ge=0, description="seed of the initial weights, the data order and every random draw")
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints (and one at the end)")
    keep_checkpoints: int = Field(3, ge=1, description="newest checkpoints kept")
    log_every: int = Field(10, ge=1, description="steps between TensorBoard scalars")
    resume: bool = Field(False, description="continue the run in --out from its newest checkpoint")
    s3_endpoint: str | None = Field(None, description="S3-compatible endpoint (http(s)://HOST:PORT) for an s3:// store")

    _check_endpoint = field_validator("s3_endpoint")(check_s3_endpoint)

    @model_validator(mode="after")
    def _consistent_loop(self) -> TrainerConfig:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give --steps or --epochs, not both")
        if self.version is not None and self.tag is not None:
            raise ValueError("give --version or --tag, not both")
        if self.address is not None and self.address.startswith("ray://"):
            raise ValueError("--address: Ray Client (ray://) cannot run Ray Train here; use auto or HOST:PORT on a cluster node")
        lr = getattr(self, "lr", None)
        if lr is not None and self.min_lr > lr:
            raise ValueError(f"min_lr {self.min_lr} is above lr {lr}")
        if sum(getattr(self, name) for name in self.LOSS_WEIGHTS) == 0:
            raise ValueError("every loss weight is 0: nothing to train")
        return self

    #: The stage's loss-weight fields (not all 0) and its default learning rate: BASE_LR for BASE_SAMPLES samples
    #: (images, clips) per optimizer step, scaled linearly.
    LOSS_WEIGHTS: ClassVar[tuple[str, ...]] = ()
    BASE_LR: ClassVar[float] = 0.0
    BASE_SAMPLES: ClassVar[int] = 1

    def peak_lr(self, world_size: int = 1) -> float:
        lr: float | None = getattr(self, "lr", None)
        batch: int = getattr(self, "batch_size", 1)
        return lr if lr is not None else self.BASE_LR * batch * self.accumulate * world_size / self.BASE_SAMPLES

    @property
    def snapshot(self) -> int | str | None:
        return self.version if self.version is not None else self.tag

    def document(self) -> dict[str, Any]:
        """The resolved config as JSON-able values (written beside every checkpoint)."""
        return json.loads(self.model_dump_json())


class Stage1Config(TrainerConfig):
    """Encoder distillation with prompt-in-the-loop, from a store alone."""

    student: str = Field("es-rv-m", description="student: es-{ev,rv,tv}-{s,m,l} (EfficientViT / RepViT / TinyViT; small, medium, large)")
    batch_size: int = Field(8, ge=1, description="images per micro-batch per worker")
    lr: float | None = Field(
        None, gt=0, description="peak learning rate (default: the public recipe's 1e-3 x images per optimizer step / 512)"
    )
    feature_weight: float = Field(
        1.0,
        ge=0,
        description="weight of the per-pixel feature MSE, summed over channels (the public prompt-in-the-loop fine-tune uses 0.0015)",
    )
    cosine_weight: float = Field(1.0, ge=0, description="weight of 1 - cosine on features")
    prompt_weight: float = Field(
        1.0, ge=0, description="weight of BCE + Dice vs the teacher's masks through the frozen heads (0: no prompt-in-the-loop)"
    )
    iou_weight: float = Field(1.0, ge=0, description="weight of the IoU-head L1 vs the teacher's")
    gt_weight: float = Field(0.0, ge=0, description="weight of BCE + Dice vs the stored ground-truth masks")
    max_prompts: int | None = Field(None, ge=1, description="prompts decoded per image per step, drawn from the cached ones (default: all)")
    image_size: int | None = Field(None, ge=32, description="student input size in pixels (default: the teacher's frame)")
    init: Path | None = Field(
        None, description="local timm checkpoint (.safetensors / .pth) to start the backbone from; nothing is downloaded"
    )

    @field_validator("student")
    @classmethod
    def _known_student(cls, value: str) -> str:
        from esam3.train.students import REGISTRY

        if value not in REGISTRY:
            raise ValueError(f"unknown student {value!r}; choose one of {', '.join(REGISTRY)}")
        return value

    LOSS_WEIGHTS = ("feature_weight", "cosine_weight", "prompt_weight", "iou_weight", "gt_weight")
    BASE_LR, BASE_SAMPLES = BASE_LR, BASE_BATCH


#: Stage 2's default peak learning rate for 8 clips per optimizer step (our choice for a memory trained from scratch
#: on a frozen encoder), scaled linearly with the clips per step.
STAGE2_LR, STAGE2_CLIPS = 1e-4, 8


class Stage2Config(TrainerConfig):
    """Memory distillation: a Perceiver memory and a light memory attention on a frozen stage-1 encoder."""

    init: Path = Field(..., description="the stage-1 run folder (its newest checkpoint) or one checkpoint folder")
    batch_size: int = Field(2, ge=1, description="clips per micro-batch per worker")
    lr: float | None = Field(None, gt=0, description="peak learning rate (default: 1e-4 x clips per optimizer step / 8)")
    clip_length: int = Field(8, ge=2, le=64, description="consecutive annotated frames per clip")
    clip_stride: int | None = Field(None, ge=1, description="frames between clip starts (default: the clip length)")
    objects: int = Field(3, ge=1, le=64, description="objects tracked per clip (drawn from those in it)")
    train_encoder: bool = Field(False, description="also train the stage-1 encoder (default: frozen)")
    global_latents: int = Field(256, ge=0, le=4096, description="Perceiver latents that read the whole memory map")
    window_grid: int | None = Field(
        None,
        ge=1,
        description="window latents per side; must divide the memory grid (default: windows of 6 x 6 tokens, 12 x 12 at SAM3's 72)",
    )
    perceiver_depth: int = Field(2, ge=1, le=12, description="Perceiver layers")
    perceiver_heads: int = Field(1, ge=1, le=16, description="Perceiver attention heads")
    memory_layers: int = Field(2, ge=1, le=12, description="memory-attention layers (SAM3: 4)")
    memory_heads: int = Field(1, ge=1, le=16, description="memory-attention heads")
    memory_ffn: int = Field(2048, ge=16, le=16384, description="memory-attention MLP width")
    forcing_start: float = Field(1.0, ge=0, le=1, description="chance that a frame's memory is the teacher's at the start")
    forcing_end: float = Field(0.0, ge=0, le=1, description="that chance once --forcing-until of the steps have passed")
    forcing_until: float = Field(0.5, ge=0, le=1, description="share of the steps over which the chance moves linearly from start to end")
    feature_weight: float = Field(
        1.0, ge=0, description="weight of the MSE (summed over channels) of the memory-conditioned map vs the teacher's"
    )
    cosine_weight: float = Field(1.0, ge=0, description="weight of 1 - cosine of the memory-conditioned map vs the teacher's")
    mask_weight: float = Field(1.0, ge=0, description="weight of BCE + Dice vs the teacher's masks")
    score_weight: float = Field(1.0, ge=0, description="weight of the object-score BCE vs the teacher's")
    gt_weight: float = Field(1.0, ge=0, description="weight of SAM2's ground-truth loss (focal x 20 + Dice + IoU L1 + object-score BCE)")

    LOSS_WEIGHTS = ("feature_weight", "cosine_weight", "mask_weight", "score_weight", "gt_weight")
    BASE_LR, BASE_SAMPLES = STAGE2_LR, STAGE2_CLIPS

    def forcing_at(self, step: int, total: int) -> float:
        """The chance of teacher forcing at optimizer step ``step`` of ``total``."""
        span = self.forcing_until * total
        progress = 1.0 if span <= 0 else min(1.0, step / span)
        return self.forcing_start + (self.forcing_end - self.forcing_start) * progress


def read_config_file(path: Path) -> dict[str, Any]:
    """A --config file (.json or .toml) as a dict of config fields (dashes in keys accepted)."""
    if not path.is_file():
        raise ConfigFileError(f"--config {path}: no such file")
    try:
        if path.suffix == ".toml":
            document = tomllib.loads(path.read_text())
        elif path.suffix == ".json":
            document = json.loads(path.read_text())
        else:
            raise ConfigFileError(f"--config {path}: expected a .json or .toml file")
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"--config {path}: not valid {path.suffix[1:].upper()} ({exc})") from None
    if not isinstance(document, dict):
        raise ConfigFileError(f"--config {path}: expected a table / object of settings")
    return {str(key).replace("-", "_"): value for key, value in document.items()}
