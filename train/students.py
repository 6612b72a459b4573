"""The student registry: EfficientSAM3's nine image encoders over timm, each with a head to the teacher trunk's shape.

``es-{ev,rv,tv}-{s,m,l}`` = EfficientViT-B0/B1/B2, RepViT-M0.9/M1.1/M2.3, TinyViT-5M/11M/21M (the public
EfficientSAM3 names). A student is the timm backbone's stride-32 map (``features_only``, last stage) -> the public
recipe's head (Conv1x1 without bias -> BatchNorm -> GELU -> Conv3x3) to the trunk width -> bilinear to the teacher's
token grid, so its output is a drop-in for the cached trunk (B, C, g, g) that the frozen heads take. The trunk width,
grid and input size come from the store's teacher card: nothing assumes SAM3's 1024 / 72 / 1008.

Built without pretrained weights, as the public recipe trains them; ``init`` loads a local timm checkpoint file
(safetensors or a plain state dict) into the backbone. Nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from esam3.schemas.errors import first_line
from esam3.schemas.train import TrainingInputError

#: name -> (timm model, public backbone parameters in millions, as EfficientSAM3 reports them)
REGISTRY: dict[str, tuple[str, float]] = {
    "es-ev-s": ("efficientvit_b0", 0.68),
    "es-ev-m": ("efficientvit_b1", 4.64),
    "es-ev-l": ("efficientvit_b2", 14.98),
    "es-rv-s": ("repvit_m0_9", 4.72),
    "es-rv-m": ("repvit_m1_1", 7.77),
    "es-rv-l": ("repvit_m2_3", 22.40),
    "es-tv-s": ("tiny_vit_5m_224", 5.07),
    "es-tv-m": ("tiny_vit_11m_224", 10.55),
    "es-tv-l": ("tiny_vit_21m_224", 20.62),
}


class StudentError(TrainingInputError):
    """A student that cannot be built as asked (unknown name, bad sizes, unreadable init file)."""


@dataclass(frozen=True)
class StudentSpec:
    """Everything needed to rebuild a student: saved next to its weights (checkpoints, exported models)."""

    name: str  # a REGISTRY key
    trunk_width: int  # C of the teacher trunk it imitates
    grid: int  # g: the teacher's tokens per side
    image_size: int  # the square input the student sees (the teacher's S unless --image-size)
    mean: float = 0.5  # input normalisation: SAM3's (pixels / 255 - mean) / std
    std: float = 0.5

    def __post_init__(self) -> None:
        if self.name not in REGISTRY:
            raise StudentError(f"unknown student {self.name!r}; choose one of {', '.join(REGISTRY)}")
        for field in ("trunk_width", "grid", "image_size"):
            if getattr(self, field) < 1:
                raise StudentError(f"student {field} must be positive, got {getattr(self, field)}")
        if self.image_size < 32:
            raise StudentError(f"student image_size must be at least 32 (one stride-32 cell), got {self.image_size}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> StudentSpec:
        try:
            return cls(**document)
        except TypeError as exc:
            raise StudentError(f"not a student spec ({exc})") from None


class StudentHead(nn.Module):
    """The public stage-1 head: backbone map (B, c, h, w) -> (B, C, g, g)."""

    def __init__(self, in_channels: int, trunk_width: int, grid: int) -> None:
        super().__init__()
        self.grid = grid
        self.proj = nn.Conv2d(in_channels, trunk_width, kernel_size=1, bias=False)
        self.norm = nn.BatchNorm2d(trunk_width)
        self.act = nn.GELU()
        self.out = nn.Conv2d(trunk_width, trunk_width, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.out(self.act(self.norm(self.proj(x))))
        if x.shape[-2:] != (self.grid, self.grid):
            x = F.interpolate(x, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
        return x


class Student(nn.Module):
    """A timm backbone + :class:`StudentHead`; takes uint8 or float pixels (B, 3, S, S) in 0..255.

    ``init``: a local timm checkpoint file (.safetensors, or a torch state dict .pth / .bin, loaded without
    unpickling objects) whose weights start the backbone; timm maps the full model's names onto the features.
    """

    def __init__(self, spec: StudentSpec, init: Path | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = _backbone(spec.name, init)
        self.head = StudentHead(self.backbone.feature_info.channels()[-1], spec.trunk_width, spec.grid)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (or 0..255 float) pixels -> the teacher's input normalisation, at the student's input size."""
        x = pixels.float() / 255.0
        if x.shape[-1] != self.spec.image_size or x.shape[-2] != self.spec.image_size:
            x = F.interpolate(x, size=(self.spec.image_size,) * 2, mode="bilinear", align_corners=False, antialias=True)
        return (x - self.spec.mean) / self.spec.std

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(self.normalise(pixels))[-1])

    def backbone_parameters(self) -> int:
        return sum(p.numel() for p in self.backbone.parameters())


def _backbone(name: str, init: Path | None) -> nn.Module:
    import timm

    model = REGISTRY[name][0]
    if init is None:
        return timm.create_model(model, pretrained=False, features_only=True, out_indices=(-1,))
    if not init.is_file():
        raise StudentError(f"--init {init}: no such file (a {model} checkpoint: .safetensors, or a state dict .pth / .bin)")
    try:
        backbone = timm.create_model(
            model, pretrained=True, pretrained_cfg_overlay={"file": str(init)}, features_only=True, out_indices=(-1,)
        )
        given = _read_state(init)
    except Exception as exc:  # timm / safetensors / torch.load raise many types for a wrong or broken file
        raise StudentError(f"--init {init}: not a {model} checkpoint ({first_line(exc)[:200]})") from None
    # timm loads a features_only model's weights non-strictly: check that the file really filled the backbone
    by_shape: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for tensor in given.values():
        by_shape.setdefault(tuple(tensor.shape), []).append(tensor)
    wanted = [t for k, t in backbone.state_dict().items() if not k.endswith("num_batches_tracked")]
    found = sum(any(torch.equal(t, g) for g in by_shape.get(tuple(t.shape), [])) for t in wanted)
    if found < len(wanted):
        raise StudentError(f"--init {init}: not a {model} checkpoint (only {found} of the backbone's {len(wanted)} tensors are in it)")
    return backbone


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return {k: v for k, v in state.items() if torch.is_tensor(v)}
