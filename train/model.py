"""A trained student as a promptable segmenter: the student encoder + the teacher's tracker heads, in one file.

``esam3 export`` writes a model folder: ``model.safetensors`` (``student.*`` and ``heads.*`` tensors: the tracker
neck, prompt encoder and mask decoder; no trunk, no text encoder, no detector) and ``config.json`` (the student spec,
the teacher config the heads are built from, where it was trained). ``StudentModel.load`` rebuilds it from those
two files alone; ``segment`` takes an RGB image and point / box prompts in its own pixel coordinates (COCO's
convention: continuous, (0, 0) the top-left corner of the image) and returns one mask per prompt at the image's
size, chosen as SAM3's tracker chooses (best multimask output for one click, the single-mask output otherwise).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from esam3.schemas.errors import first_line
from esam3.schemas.train import TrainingInputError
from esam3.train.checkpoint import checkpoint_dir, load_student_weights, read_config
from esam3.train.frozen_heads import trim
from esam3.train.students import Student, StudentSpec
from esam3.workers.heads import TRACKER_PREFIXES, TeacherHeads, check_sizes, save_weights_and_config
from esam3.workers.preprocess import resize_uint8

MODEL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "config.json"
MODEL_FORMAT = 1
#: Export kinds and the class that loads each.
KINDS = {"esam3-student": "StudentModel", "esam3-video-student": "VideoStudentModel"}


class ModelLoadError(TrainingInputError):
    """A model folder that is not an ``esam3 export`` output, or does not load."""


@dataclass
class Segmentation:
    masks: np.ndarray  # bool (K, H, W) at the image's size
    scores: np.ndarray  # (K,) the heads' predicted IoU of each chosen mask
    logits: torch.Tensor  # (K, m, m) low-res logits of the chosen outputs


@dataclass(frozen=True)
class ExportReport:
    out: Path
    bytes: int
    parameters: int
    student_parameters: int
    heads_parameters: int


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def load_part(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str, path: Path) -> None:
    """Load the ``prefix``ed tensors into ``module``: exactly its keys, or a one-line error."""
    part = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        missing, unexpected = module.load_state_dict(part, strict=False)
    except RuntimeError as exc:
        raise ModelLoadError(f"model {path}: weights do not match config.json ({first_line(exc)})") from None
    if missing or unexpected:
        raise ModelLoadError(f"model {path}: weights do not match config.json ({len(missing)} missing, {len(unexpected)} unexpected)")


class StudentModel(nn.Module):
    """Student encoder + frozen tracker heads: pixels and prompts in, masks out."""

    KIND = "esam3-student"
    MEMORY_ATTENTION = True  # whether the export keeps SAM3's memory attention (a video student has its own)

    def __init__(self, student: Student, heads: TeacherHeads, provenance: dict[str, Any]) -> None:
        super().__init__()
        self.student = student
        self.heads = heads
        self.provenance = provenance

    @property
    def image_size(self) -> int:
        """The teacher frame S that prompts are mapped into (the student may see another input size)."""
        return self.heads.geometry.image_size

    @classmethod
    def from_checkpoint(
        cls,
        path: Path,
        heads: TeacherHeads | None = None,
        device: str | torch.device = "cpu",
        s3_endpoint: str | None = None,
    ) -> StudentModel:
        """A training checkpoint (or run folder) + its store's heads (read from the store unless given; ``s3_endpoint``
        overrides the run's own for an s3:// store)."""
        from esam3.pipeline.object_store import S3Settings
        from esam3.pipeline.store import Store
        from esam3.train.frozen_heads import load_store_heads

        checkpoint = checkpoint_dir(path)
        document = read_config(checkpoint)
        student = Student(StudentSpec.from_dict(document["student"]))
        load_student_weights(checkpoint, student)
        if heads is None:
            store = Store(document["store"]["uri"], S3Settings.from_environment(s3_endpoint or document["config"].get("s3_endpoint")))
            heads = load_store_heads(store, device)
        provenance = {
            "checkpoint": str(checkpoint),
            "store": document["store"],
            "config": document["config"],
            "versions": document.get("versions", {}),
        }
        return cls(student, heads, provenance).to(device).eval()

    # ---- files ------------------------------------------------------------------------------------------

    def save(self, out: Path) -> ExportReport:
        """``model.safetensors`` + ``config.json`` under ``out`` (each written atomically)."""
        return self._save(out, {}, {})

    def _save(self, out: Path, tensors: dict[str, torch.Tensor], document: dict[str, Any]) -> ExportReport:
        """Write the student and the tracker heads, plus a subclass's ``tensors`` and ``document`` entries."""
        out.mkdir(parents=True, exist_ok=True)
        tensors = {
            **{f"student.{k}": v for k, v in self.student.state_dict().items()},
            **{f"heads.{k}": v for k, v in self.heads.state_dict().items() if k.startswith(TRACKER_PREFIXES)},
            **tensors,
        }
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        heads_parameters = _count(self.heads.tracker_model) + _count(self.heads.tracker_neck)
        extra = {k: v for k, v in document.items() if k != "parameters"}
        document = {
            "format": MODEL_FORMAT,
            "kind": self.KIND,
            "student": self.student.spec.to_dict(),
            "teacher_config": self.heads.config.to_dict(),
            "provenance": self.provenance,
            "parameters": {"student": _count(self.student), "heads": heads_parameters, **document.get("parameters", {})},
            **extra,
        }
        save_weights_and_config(out / MODEL_WEIGHTS, tensors, out / MODEL_CONFIG, document)
        size = (out / MODEL_WEIGHTS).stat().st_size + (out / MODEL_CONFIG).stat().st_size
        return ExportReport(out, size, sum(document["parameters"].values()), _count(self.student), heads_parameters)

    @classmethod
    def load(cls, directory: Path, device: str | torch.device = "cpu") -> StudentModel:
        document, student, heads, _ = cls._read(directory)
        return cls(student, heads, document.get("provenance", {})).to(device).eval()

    @classmethod
    def _read(cls, directory: Path) -> tuple[dict[str, Any], Student, TeacherHeads, dict[str, torch.Tensor]]:
        """An export folder of this class's kind: its document, the student and the frozen heads, the other tensors."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        from transformers import Sam3VideoConfig

        config_path, weights_path = directory / MODEL_CONFIG, directory / MODEL_WEIGHTS
        for path in (config_path, weights_path):
            if not path.is_file():
                raise ModelLoadError(f"model {directory}: {path.name} is missing; expected the output of 'esam3 export'")
        try:
            document = json.loads(config_path.read_text())
            if not isinstance(document, dict) or document.get("kind") not in KINDS:
                raise ModelLoadError(f"model {config_path}: not an esam3 student model config")
            if document["kind"] != cls.KIND:
                raise ModelLoadError(f"model {directory}: a {document['kind']}, not a {cls.KIND} (use {KINDS[document['kind']]})")
            if document.get("format") != MODEL_FORMAT:
                raise ModelLoadError(f"model {config_path}: format {document.get('format')!r}, this esam3 reads {MODEL_FORMAT}")
            config = Sam3VideoConfig.from_dict(document["teacher_config"])
            check_sizes(config, "teacher_config")
            spec = StudentSpec.from_dict(document["student"])
        except ModelLoadError:
            raise
        except Exception as exc:  # JSON, config and spec errors come in many types
            raise ModelLoadError(f"model {config_path}: unreadable ({first_line(exc)})") from None
        try:
            tensors = load_file(str(weights_path))
        except (OSError, SafetensorError) as exc:
            raise ModelLoadError(f"model {weights_path}: unreadable ({exc}); export it again") from None
        student = Student(spec)
        heads = trim(TeacherHeads.build(config, detector=False), detector=False, memory_attention=cls.MEMORY_ATTENTION)
        load_part(student, tensors, "student.", weights_path)
        load_part(heads, tensors, "heads.", weights_path)
        heads.requires_grad_(False)
        rest = {k: v for k, v in tensors.items() if not k.startswith(("student.", "heads."))}
        return document, student, heads, rest

    # ---- inference ----------------------------------------------------------------------------------------

    def trunk(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, s, s) at the student's input size -> trunk-shaped features (B, C, g, g)."""
        return self.student(pixels)

    def pixels(self, image: np.ndarray) -> torch.Tensor:
        """RGB uint8 (H, W, 3) -> uint8 (1, 3, s, s): SAM3's squash resize to the student's input size."""
        return resize_uint8(image, self.student.spec.image_size)[None].to(next(self.parameters()).device)

    @torch.no_grad()
    def segment(self, image: np.ndarray, points: np.ndarray | None = None, boxes: np.ndarray | None = None) -> Segmentation:
        """One mask per prompt: ``points`` (K1, 2) single positive clicks and ``boxes`` (K2, 4) XYXY, both in the
        image's pixel coordinates; masks come back in that order (points first)."""
        points = np.zeros((0, 2), np.float32) if points is None else np.asarray(points, np.float32).reshape(-1, 2)
        boxes = np.zeros((0, 4), np.float32) if boxes is None else np.asarray(boxes, np.float32).reshape(-1, 4)
        height, width = image.shape[:2]
        if len(points) + len(boxes) == 0:
            raise ValueError("give at least one point or box prompt")
        trunk = self.trunk(self.pixels(image))
        return self.decode(trunk, (height, width), points, boxes)

    @torch.no_grad()
    def decode(self, trunk: torch.Tensor, size: tuple[int, int], points: np.ndarray, boxes: np.ndarray) -> Segmentation:
        """Decode prompts (image pixel coordinates) against one image's features (1, C, g, g)."""
        height, width = size
        s, device = self.image_size, trunk.device
        scale = np.array([s / width, s / height], np.float32)
        k1, k2 = len(points), len(boxes)
        model_points = np.zeros((k1 + k2, 1, 2), np.float32)
        model_points[:k1, 0] = points * scale - 0.5  # SAM's pixel-index convention (the encoder adds 0.5)
        labels = np.full((k1 + k2, 1), -1, np.int64)
        labels[:k1] = 1
        model_boxes = np.full((k1 + k2, 4), np.nan, np.float32)
        model_boxes[k1:] = boxes * np.tile(scale, 2) - 0.5
        args = [torch.from_numpy(a).to(device) for a in (model_points, labels, model_boxes)]
        out = self.heads.decode_prompts(self.heads.image_embeddings(trunk), *args)
        logits = torch.cat([out["single"], out["multi"]], dim=1)
        pick = self.heads.picked_output(args[1], args[2], out["iou"])
        rows = torch.arange(len(pick), device=device)
        chosen = logits[rows, pick]
        full = F.interpolate(chosen[:, None].float(), size=(height, width), mode="bilinear", align_corners=False)[:, 0]
        return Segmentation((full > 0).cpu().numpy(), out["iou"][rows, pick].float().cpu().numpy(), chosen.float().cpu())
