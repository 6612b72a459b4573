"""A trained stage-2 student as a video object tracker: encoder + SAM3's tracker heads + the student memory, one file.

``esam3 export`` of a stage-2 checkpoint writes a model folder of kind ``esam3-video-student``: ``model.safetensors``
(``student.*``, ``heads.*`` (tracker neck, prompt encoder, mask decoder, memory encoder), ``memory.*``) and
``config.json`` (student spec, memory spec, teacher config, provenance). It is also an image segmenter
(:class:`esam3.train.model.StudentModel`'s ``segment``).

:meth:`VideoStudentModel.track` runs the same ``StudentTracker`` that trained it, over a whole video with the
student's own memory only: each object starts on its prompt frame (a mask, one positive click, or a box, in the
teacher frame's coordinates) and is tracked to the end of the video.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from esam3.schemas.train import TrainingInputError
from esam3.train.checkpoint import checkpoint_dir, load_student_weights, read_config
from esam3.train.clips import prompt_tensors
from esam3.train.frozen_heads import trim
from esam3.train.memory import MemorySpec, StudentMemory
from esam3.train.model import ExportReport, ModelLoadError, StudentModel, load_part
from esam3.train.students import Student, StudentSpec
from esam3.train.tracker import StudentTracker
from esam3.workers.heads import TeacherHeads
from esam3.workers.video_targets import ObjectPrompt

#: Logits the tracker gives a mask prompt's own frame (SAM3's _use_mask_as_output: +10 inside, -10 outside).
MASK_LOGIT = 10.0


@dataclass
class Tracks:
    """What :meth:`VideoStudentModel.track` gives: per frame and object, in the order of the prompts."""

    object_ids: list[int]
    logits: torch.Tensor  # (T, N, m, m) low-res logits (float16) of the output the tracker uses; NaN before the object's prompt frame
    scores: torch.Tensor  # (T, N) object score logits (NaN before the prompt frame)

    def frame_masks(self, t: int, height: int, width: int) -> np.ndarray:
        """bool (N, H, W) of frame ``t`` at the video's size: each object's picked mask where it is judged present, one
        object per pixel (where masks overlap, the one of the highest logit), as video segmentation results are."""
        logits = F.interpolate(
            torch.nan_to_num(self.logits[t].float(), nan=-1.0)[None], size=(height, width), mode="bilinear", align_corners=False
        )[0]
        present = torch.nan_to_num(self.scores[t], nan=-1.0) > 0
        logits = torch.where((logits > 0) & present[:, None, None], logits, torch.full_like(logits, -torch.inf))
        best = logits.argmax(dim=0)
        owned = torch.arange(len(logits), device=logits.device)[:, None, None] == best
        return (owned & torch.isfinite(logits)).cpu().numpy()


def is_video_checkpoint(path: Path) -> bool:
    """Whether a run or checkpoint folder is stage 2's (it has a memory); unreadable ones are left to the loader."""
    try:
        return "memory" in read_config(checkpoint_dir(path))
    except TrainingInputError:
        return False


def is_video_export(directory: Path) -> bool:
    """Whether an export folder holds a video student (unreadable ones are left to the loader)."""
    import json

    try:
        return json.loads((directory / "config.json").read_text()).get("kind") == VideoStudentModel.KIND
    except (OSError, ValueError, AttributeError):
        return False


class VideoStudentModel(StudentModel):
    """Student encoder + frozen tracker heads + trained memory."""

    KIND = "esam3-video-student"
    MEMORY_ATTENTION = False

    def __init__(self, student: Student, heads: TeacherHeads, memory: StudentMemory, provenance: dict[str, Any]) -> None:
        heads = trim(heads, detector=False, memory_attention=False)  # neither is used nor exported: the memory is the student's
        super().__init__(student, heads, provenance)
        self.memory = memory
        self.tracker = StudentTracker(student, heads, memory)

    @classmethod
    def from_checkpoint(
        cls,
        path: Path,
        heads: TeacherHeads | None = None,
        device: str | torch.device = "cpu",
        s3_endpoint: str | None = None,
    ) -> VideoStudentModel:
        """A stage-2 checkpoint (or run folder) + its store's heads."""
        from esam3.pipeline.object_store import S3Settings
        from esam3.pipeline.store import Store
        from esam3.train.frozen_heads import load_store_heads

        checkpoint = checkpoint_dir(path)
        document = read_config(checkpoint)
        if "memory" not in document:
            raise TrainingInputError(f"{path}: a stage-1 checkpoint (no memory); video tracking needs a stage-2 run (esam3 train stage2)")
        student = Student(StudentSpec.from_dict(document["student"]))
        memory = StudentMemory(MemorySpec.from_dict(document["memory"]))
        load_student_weights(checkpoint, torch.nn.ModuleDict({"encoder": student, "memory": memory}))
        if heads is None:
            store = Store(document["store"]["uri"], S3Settings.from_environment(s3_endpoint or document["config"].get("s3_endpoint")))
            heads = load_store_heads(store, device, memory_attention=False)
        provenance = {
            "checkpoint": str(checkpoint),
            "store": document["store"],
            "config": document["config"],
            "versions": document.get("versions", {}),
            "init": document.get("init"),
        }
        return cls(student, heads, memory, provenance).to(device).eval()

    def save(self, out: Path) -> ExportReport:
        tensors = {f"memory.{k}": v for k, v in self.memory.state_dict().items()}
        parameters = sum(p.numel() for p in self.memory.parameters())
        return self._save(out, tensors, {"memory": self.memory.spec.to_dict(), "parameters": {"memory": parameters}})

    @classmethod
    def load(cls, directory: Path, device: str | torch.device = "cpu") -> VideoStudentModel:
        document, student, heads, rest = cls._read(directory)
        try:
            memory = StudentMemory(MemorySpec.from_dict(document["memory"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"model {directory}: its memory spec does not build ({exc})") from None
        load_part(memory, rest, "memory.", directory / "model.safetensors")
        return cls(student, heads, memory, document.get("provenance", {})).to(device).eval()

    # ---- tracking -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def track(self, pixels: torch.Tensor, prompts: Sequence[ObjectPrompt]) -> Tracks:
        """Track each prompted object through ``pixels`` (T, 3, s, s) uint8 at the student's input size.

        ``prompts``: one per object, on its first frame; points / boxes in the teacher frame (SAM's pixel-index
        convention, as ``esam3.workers.video_targets.object_prompts`` makes them), masks (S, S) 0/1 in the teacher frame.
        """
        if not prompts:
            raise ValueError("give at least one object prompt")
        t_len, n = len(pixels), len(prompts)
        device = next(self.parameters()).device
        batch = self._batch(pixels.to(device), prompts)
        self.tracker.eval()
        outputs = self.tracker(batch, clip_length=t_len, objects=n, forcing=0.0, light=True)
        m = self.heads.geometry.mask_size
        logits = torch.full((t_len, n, m, m), float("nan"), device=device, dtype=torch.float16)
        scores = torch.full((t_len, n), float("nan"), device=device)
        for out in outputs:
            logits[out.row, out.slot] = out.picked.half()
            scores[out.row, out.slot] = out.score.float()
        for k, (row, slot) in enumerate(zip(batch["cond_row"].tolist(), batch["cond_slot"].tolist())):
            if prompts[slot].mask is not None:  # the prompt mask is the output on its own frame
                low = F.interpolate(batch["cond_masks"][k][None, None], size=(m, m), mode="bilinear", align_corners=False, antialias=True)[
                    0, 0
                ]
                logits[row, slot] = torch.where(low >= 0.5, MASK_LOGIT, -MASK_LOGIT).half()
                scores[row, slot] = MASK_LOGIT if bool(low.max() >= 0.5) else -MASK_LOGIT
        return Tracks([p.object_id for p in prompts], logits, scores)

    def _batch(self, pixels: torch.Tensor, prompts: Sequence[ObjectPrompt]) -> dict[str, Any]:
        """The batch ``StudentTracker`` reads for one clip: the video, objects joining on their prompt frames."""
        t_len, n, device = len(pixels), len(prompts), pixels.device
        start = torch.tensor([p.frame for p in prompts], device=device)
        if bool((start < 0).any() or (start >= t_len).any()):
            raise ValueError(f"a prompt frame is outside the video's {t_len} frames")
        frames = torch.arange(t_len, device=device)[:, None]
        ids = torch.tensor([p.object_id for p in prompts], device=device)
        return {
            "key": [f"frame/{t}" for t in range(t_len)],
            "input": pixels,
            "object_ids": torch.where(frames >= start, ids, torch.full_like(ids, -1)),
            "object_valid": frames >= start,
            "is_conditioning": frames == start,
            "frame_number": frames[:, 0],
            "cond_row": start,
            "cond_slot": torch.arange(n, device=device),
            **prompt_tensors(prompts, self.heads.geometry.image_size, device),
            "bank": None,
            "pointers": None,
        }


def video_frames(path: Path, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """RGB uint8 (H, W, 3) frames of a video file, one at a time (the first ``max_frames``)."""
    import av

    if not path.is_file():
        raise TrainingInputError(f"--video {path}: no such file")
    count = 0
    try:
        with av.open(str(path), mode="r") as container:
            if not container.streams.video:
                raise TrainingInputError(f"--video {path}: no video stream")
            for frame in container.decode(container.streams.video[0]):
                yield frame.to_ndarray(format="rgb24")
                count += 1
                if max_frames is not None and count == max_frames:
                    return
    except av.FFmpegError as exc:
        raise TrainingInputError(f"--video {path}: not a readable video ({exc})") from None
    if not count:
        raise TrainingInputError(f"--video {path}: no decodable frames")


def read_video(
    path: Path,
    size: int,
    max_frames: int | None = None,
    keep: Callable[[int], bool] | None = None,
) -> tuple[torch.Tensor, tuple[int, int], dict[int, np.ndarray]]:
    """A video as the tracker's input: uint8 (T, 3, size, size), squashed frame by frame (the full-size frames are
    not held), its (height, width), and the full-size frames whose index ``keep`` accepts (a strip's)."""
    from esam3.workers.preprocess import resize_uint8

    pixels, kept, shape = [], {}, (0, 0)
    for t, frame in enumerate(video_frames(path, max_frames)):
        shape = frame.shape[:2]
        pixels.append(resize_uint8(frame, size))
        if keep is not None and keep(t):
            kept[t] = frame
    return torch.stack(pixels), shape, kept


def first_frame_prompts(
    size: tuple[int, int],
    model_size: int,
    points: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray | None,
) -> tuple[list[ObjectPrompt], list[str]]:
    """Prompts on frame 0 in image pixels -> tracker prompts in the S x S teacher frame, and a name for each object:
    one per click (x, y), per box (x0, y0, x1, y1), and per value of a label image (0 background, 255 ignored)."""
    from esam3.schemas.teacher import VideoPrompt
    from esam3.workers.prompts import to_model_frame
    from esam3.workers.video_targets import model_frame_mask

    prompts, names = [], []
    for p in np.asarray(points, np.float64).reshape(-1, 2):
        model = to_model_frame(p[None], size, model_size) - 0.5
        prompts.append(ObjectPrompt(len(prompts) + 1, 0, VideoPrompt.POINT, model, np.array([1], np.int32), None))
        names.append(f"point {p[0]:g},{p[1]:g}")
    for b in np.asarray(boxes, np.float64).reshape(-1, 4):
        model = to_model_frame(b, size, model_size).reshape(2, 2) - 0.5
        prompts.append(ObjectPrompt(len(prompts) + 1, 0, VideoPrompt.BOX, model, np.array([2, 3], np.int32), None))
        names.append(f"box {','.join(f'{v:g}' for v in b)}")
    if labels is not None:
        for k in (int(v) for v in np.unique(labels) if v not in (0, 255)):
            mask = model_frame_mask((labels == k).astype(np.float32), model_size)
            prompts.append(ObjectPrompt(len(prompts) + 1, 0, VideoPrompt.MASK, None, None, mask))
            names.append(f"mask {k}")
    return prompts, names
