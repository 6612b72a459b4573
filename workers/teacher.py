"""The SAM3 teacher runner: one trunk pass per image, then every target from the trunk output in hand.

``Sam3Teacher.load(TeacherConfig(...))`` gives a teacher on CUDA with bf16 autocast when a GPU is present
(CPU fp32 otherwise). Its targets:

* :meth:`Sam3Teacher.trunk_features` — the ViT trunk output (B, 1024, 72, 72 at full size), batched;
* :meth:`Sam3Teacher.image_targets` — preprocessing + trunk (+ tracker neck levels) for a list of images;
* :meth:`Sam3Teacher.prompt_targets` — the tracker's outputs for K sampled prompts, from the trunk in hand;
* :meth:`Sam3Teacher.video_targets` — SA-V memory targets (``esam3.workers.video_targets``);
* :meth:`Sam3Teacher.concept_targets` — text features and detector outputs per noun phrase
  (``esam3.workers.concepts``).

Everything after the trunk runs on :class:`~esam3.workers.heads.TeacherHeads`, the same code a student uses
with the exported heads file.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from esam3.schemas.teacher import ConceptTargetConfig, Device, Precision, TeacherConfig, TeacherLoadError, VideoTargetConfig
from esam3.workers.heads import Geometry, TeacherHeads
from esam3.workers.preprocess import preprocess_images, transform_record
from esam3.workers.prompts import PromptSet
from esam3.workers.teacher_loading import load_model, weights_checksum

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherCard:
    """What identifies a teacher in the store: source, weights checksum, sizes, where and how it ran."""

    source: str
    checkpoint_dir: str | None
    checksum: str
    geometry: Geometry
    device: str
    precision: str
    parameters: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "checkpoint_dir": self.checkpoint_dir,
            "checksum": self.checksum,
            "geometry": self.geometry.__dict__,
            "device": self.device,
            "precision": self.precision,
            "parameters": self.parameters,
        }


@dataclass
class ImageTargets:
    """Per image batch: ``trunk`` (B, C, g, g) float32 on CPU, optional tracker ``neck`` levels, transforms."""

    trunk: torch.Tensor
    transforms: list[dict[str, Any]]
    neck: list[torch.Tensor] = field(default_factory=list)


@dataclass
class PromptTargets:
    """Tracker outputs for K prompts of one image (float32; on the host unless asked on the device). See
    ``TeacherHeads.decode_prompts``."""

    multi: torch.Tensor  # (K, 3, m, m) low-res mask logits, multimask outputs
    single: torch.Tensor  # (K, 1, m, m) single-mask output
    iou: torch.Tensor  # (K, 4) predicted IoU: single, then the 3 multimask outputs
    object_score: torch.Tensor  # (K,) object-presence logit
    object_pointer: torch.Tensor  # (K, hidden)


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameters of the full teacher and of its parts (trunk, text encoder, heads)."""
    det = model.detector_model
    heads = TeacherHeads.from_teacher(model)
    return {
        "total": _count(model),
        "trunk": _count(det.vision_encoder.backbone),
        "text_encoder": _count(det.text_encoder) + _count(det.text_projection),
        "heads": _count(heads),
        "tracker_heads": _count(heads.tracker_model) + _count(heads.tracker_neck),
    }


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def resolve_device(device: Device) -> torch.device:
    if device == Device.CUDA and not torch.cuda.is_available():
        raise TeacherLoadError("device cuda was asked for but torch sees no CUDA device (torch.cuda.is_available() is False)")
    if device == Device.CPU or (device == Device.AUTO and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda")


def resolve_precision(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision == Precision.FP32 or (precision == Precision.AUTO and device.type == "cpu"):
        return None
    return torch.bfloat16


class Sam3Teacher:
    """A loaded SAM3 teacher: trunk + heads on one device, with its card (checksum, sizes)."""

    def __init__(self, model: Any, config: TeacherConfig, checkpoint_dir: str | None) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.amp_dtype = resolve_precision(config.precision, self.device)
        checksum = weights_checksum(model)
        counts = parameter_counts(model)
        self.model = model.to(self.device).eval()
        self.heads = TeacherHeads.from_teacher(self.model)
        self.trunk = self.model.detector_model.vision_encoder.backbone
        self.geometry = self.heads.geometry
        self.card = TeacherCard(
            source=config.source,
            checkpoint_dir=checkpoint_dir,
            checksum=checksum,
            geometry=self.geometry,
            device=self.device.type,
            precision="bf16-autocast" if self.amp_dtype is not None else "fp32",
            parameters=counts,
        )

    @classmethod
    def load(cls, config: TeacherConfig) -> Sam3Teacher:
        model, checkpoint_dir = load_model(config.source, seed=config.seed)
        return cls(model, config, checkpoint_dir)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    # ---- trunk ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def trunk_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixel values (B, 3, S, S) -> trunk output (B, C, g, g) on the teacher's device, in chunks of batch_size."""
        size = self.geometry.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"pixel values must be (B, 3, {size}, {size}) for this teacher, got {tuple(pixels.shape)}")
        chunks = []
        for start in range(0, len(pixels), self.config.batch_size):
            batch = pixels[start : start + self.config.batch_size].to(self.device, non_blocking=True)
            with self.autocast():
                tokens = self.trunk(batch).last_hidden_state
            grid = self.geometry.grid
            chunks.append(tokens.transpose(1, 2).reshape(len(batch), -1, grid, grid))
        return torch.cat(chunks)

    @torch.inference_mode()
    def image_targets(self, images: Sequence[np.ndarray], neck: bool = False) -> ImageTargets:
        """Preprocess RGB uint8 images, run the trunk (and optionally the tracker neck); results on CPU, float32."""
        size = self.geometry.image_size
        trunk = self.trunk_features(preprocess_images(images, size))
        levels: list[torch.Tensor] = []
        if neck:
            with self.autocast():
                levels = [level.float().cpu() for level in self.heads.neck_levels(trunk)]
        transforms = [transform_record(image.shape[:2], size) for image in images]
        return ImageTargets(trunk=trunk.float().cpu(), transforms=transforms, neck=levels)

    # ---- prompts ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def prompt_targets(self, trunk: torch.Tensor, prompts: PromptSet, on_device: bool = False) -> PromptTargets:
        """Tracker outputs for one image's prompts, from its trunk output (1, C, g, g) or (C, g, g); on the host, or
        left on the teacher's device with ``on_device`` (the cache's actor quantises them there)."""
        return prompt_targets(self.heads, trunk, prompts, self.device, self.autocast, on_device)

    # ---- video / concepts ---------------------------------------------------------------------------------

    def video_targets(self, sample: Any, config: VideoTargetConfig) -> Iterator[Any]:
        from esam3.workers.video_targets import iter_video_targets

        return iter_video_targets(self, sample, config)

    def concept_targets(self, trunk: torch.Tensor, phrases: Sequence[str], config: ConceptTargetConfig) -> Any:
        from esam3.workers.concepts import concept_targets

        return concept_targets(self, trunk, phrases, config)


def one_trunk(trunk: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """One image's trunk output as (1, C, g, g), from (C, g, g) or (1, C, g, g); anything else is an error."""
    expected = (geometry.trunk_width, geometry.grid, geometry.grid)
    if trunk.ndim == 3:
        trunk = trunk[None]
    if trunk.ndim != 4 or trunk.shape[0] != 1 or tuple(trunk.shape[1:]) != expected:
        raise ValueError(f"expected one image's trunk output {expected} (or with a leading 1), got {tuple(trunk.shape)}")
    return trunk


def prompt_tensors(prompts: PromptSet, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PromptSet (continuous coordinates in the S x S frame) -> SAM's pixel-index convention (minus 0.5)."""
    points = torch.from_numpy(prompts.points_model - 0.5).to(device)
    labels = torch.from_numpy(prompts.labels.astype(np.int32)).to(device)
    boxes = torch.from_numpy(prompts.boxes_model - 0.5).to(device)
    return points, labels, boxes


def prompt_targets(
    heads: TeacherHeads,
    trunk: torch.Tensor,
    prompts: PromptSet,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    on_device: bool = False,
) -> PromptTargets:
    """Shared by the teacher and by exported heads: decode a PromptSet against one image's trunk output; float32 on
    the host, or on ``device`` with ``on_device``."""
    if prompts.model_size != heads.geometry.image_size:
        raise ValueError(f"prompts were mapped to a {prompts.model_size} px frame, the teacher's is {heads.geometry.image_size}")
    trunk = one_trunk(trunk, heads.geometry)
    if len(prompts) == 0:
        m, hidden = heads.geometry.mask_size, heads.geometry.hidden
        at = device if on_device else None
        return PromptTargets(*(torch.zeros(shape, device=at) for shape in ((0, 3, m, m), (0, 1, m, m), (0, 4), (0,), (0, hidden))))
    with torch.inference_mode(), autocast():
        embeddings = heads.image_embeddings(trunk.to(device))
        out = heads.decode_prompts(embeddings, *prompt_tensors(prompts, device))
    return PromptTargets(**{name: value.float() if on_device else value.float().cpu() for name, value in out.items()})


@dataclass(frozen=True)
class HeadsExport:
    """What ``export_heads`` wrote, with the heads' size next to the full teacher's."""

    out: str
    teacher: TeacherCard
    detector: bool
    heads_parameters: int
    heads_bytes: int  # size of heads.safetensors
    teacher_parameters: int
    teacher_bytes: int  # the full teacher's weights as loaded: fp32, the precision the heads file is saved in

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "teacher": self.teacher.to_dict()}


def export_heads(config: TeacherConfig, out: Path, detector: bool = True) -> HeadsExport:
    """Write the teacher's heads (``heads.safetensors`` + ``heads.json``) to ``out``; the teacher loads on CPU."""
    return save_heads(Sam3Teacher.load(config.model_copy(update={"device": Device.CPU})), out, detector)


def save_heads(teacher: Sam3Teacher, out: Path, detector: bool = True) -> HeadsExport:
    """The heads of a loaded teacher, saved to ``out``."""
    from esam3 import __version__
    from esam3.workers.heads import HEADS_WEIGHTS

    heads = teacher.heads
    if not detector:
        heads = TeacherHeads(teacher.model.config, heads.tracker_neck, heads.tracker_model, None)
    card = teacher.card
    heads.save(out, {"teacher": card.to_dict(), "detector": detector, "esam3_version": __version__})
    return HeadsExport(
        out=str(out),
        teacher=card,
        detector=detector,
        heads_parameters=_count(heads),
        heads_bytes=(out / HEADS_WEIGHTS).stat().st_size,
        teacher_parameters=card.parameters["total"],
        teacher_bytes=sum(t.numel() * t.element_size() for t in teacher.model.state_dict().values()),
    )
