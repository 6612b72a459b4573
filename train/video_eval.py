"""Evaluation of a stage-2 student: J&F (``esam3.train.jf``) on a store's videos and on a DAVIS-format folder.

Store eval (``esam3 eval --checkpoint STAGE2 [--store ...]``): every video of the split is tracked as one clip with
the student's own memory only, each object from its cached prompt (the conditioning frame, as the cache prompted
the teacher). Each object's masks (the output the tracker uses, and absent where its object score says so) are
scored in the teacher's mask frame (m x m, 288 x 288 at full size: the frame of the cached logits) against the ground
truth and against the teacher's cached masks, from its prompt frame (not scored) to the last cached frame (not
scored); the teacher's own J&F against the ground truth is given for scale. Also: the cosine of the student's
memory-conditioned map with the teacher's on the same frames (a measure of the memory itself, under the student's
own memory rather than teacher forcing).

DAVIS eval (``esam3 eval --model DIR --davis DIR``): ``JPEGImages/<video>/*.jpg`` + ``Annotations/<video>/*.png``
(palette PNGs: index k = object k, 0 background, 255 void and ignored); each object is prompted with its mask on
the first frame it appears in, tracked to the end, and scored at the video's own resolution, with one object per
pixel (where masks overlap, the object of the highest logit), as DAVIS results are label maps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from esam3.schemas.teacher import VideoPrompt
from esam3.train.clips import ClipDataset
from esam3.train.evaluate import EvalError, eval_source, load_image
from esam3.train.jf import JFSummary, ObjectScore, score_object, summarize
from esam3.train.reader import StoreDataset
from esam3.train.video_model import VideoStudentModel
from esam3.workers.preprocess import resize_uint8
from esam3.workers.video_targets import ObjectPrompt, model_frame_mask


@dataclass
class VideoEval:
    split: str
    videos: int
    objects: int
    frames: int  # frames tracked
    jf_gt: dict[str, float]  # student vs ground truth: J, F, J&F, objects, frames scored
    jf_teacher: dict[str, float]  # student vs the teacher's masks
    teacher_jf_gt: dict[str, float]  # the teacher vs ground truth, for scale
    memory_cosine: float  # student's memory-conditioned map vs the teacher's, on frames that have one
    ms_per_frame: float  # encoder + every object's tracking step, on this device
    store_version: int = 0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def evaluate_video_store(
    model: VideoStudentModel,
    store_uri: str | None = None,
    version: int | None = None,
    split: str = "val",
    val_percent: float | None = None,
    s3_endpoint: str | None = None,
    limit: int | None = None,
) -> VideoEval:
    """J&F on a store split's videos (by default the store and held-out share the model was trained with)."""
    store, uri, version, percent = eval_source(model, store_uri, version, val_percent, s3_endpoint)
    device = next(model.parameters()).device
    geometry = model.heads.geometry
    frames = StoreDataset(
        store,
        "frames",
        version=version,
        split=split,
        val_percent=percent,
        fields=("input", "memory", "gt"),
        decode_on="device" if device.type == "cuda" else "cpu",
        input_size=model.student.spec.image_size if model.student.spec.image_size != geometry.image_size else None,
    )
    if len(frames) == 0:
        raise EvalError(
            f"the {split} split of {uri} holds no video frames (--val-percent {percent:g}); pass --split all, or a --val-percent that holds videos out"
        )
    clips = ClipDataset(frames, clip_length=1, memory_frames=model.memory.spec.memory_frames, max_pointers=model.memory.spec.max_pointers)
    videos = clips.video_indices()[:limit]
    scores: dict[str, list[ObjectScore]] = {"gt": [], "teacher": [], "teacher_gt": []}
    cosines: list[float] = []
    seconds, tracked = 0.0, 0
    model.tracker.eval()
    for indices in videos:
        batch = clips.to_device(clips.take(indices.tolist(), len(indices)), device)
        started = time.perf_counter()
        with torch.no_grad():
            outputs = model.tracker(batch, clip_length=len(indices), objects=frames.spec["video"]["max_objects"], forcing=0.0)
        seconds += elapsed(started, device)
        tracked += len(indices)
        _score_video(batch, outputs, scores, cosines)
    return VideoEval(
        split=split,
        videos=len(videos),
        objects=len(scores["gt"]),
        frames=tracked,
        jf_gt=summarize(scores["gt"]).to_dict(),
        jf_teacher=summarize(scores["teacher"]).to_dict(),
        teacher_jf_gt=summarize(scores["teacher_gt"]).to_dict(),
        memory_cosine=float(np.mean(cosines)) if cosines else float("nan"),
        ms_per_frame=1000 * seconds / max(1, tracked),
        store_version=frames.version,
    )


def _score_video(batch: dict[str, Any], outputs: list[Any], scores: dict[str, list[ObjectScore]], cosines: list[float]) -> None:
    """Per object of one video (a clip of all its frames): J and F of student, teacher and ground truth masks."""
    t_len = len(batch["key"])
    n = batch["object_ids"].shape[1]
    m = batch["mask_logits"].shape[-1]
    student = torch.zeros(t_len, n, m, m, dtype=torch.bool, device=batch["mask_logits"].device)
    for out in outputs:
        student[out.row, out.slot] = (out.picked > 0) & (out.score > 0)[:, None, None]
        if out.conditioned is not None:
            has = batch["has_memory_conditioned"][out.row, out.slot]
            if bool(has.any()):
                a, b = out.conditioned[has].float().flatten(2), batch["pix_feat_with_mem"][out.row, out.slot][has].float().flatten(2)
                cosines += torch.nn.functional.cosine_similarity(a, b, dim=1).mean(1).tolist()
    teacher = batch["mask_logits"] > 0
    video = batch["key"][0].rsplit("/", 1)[0]
    for slot in range(n):
        valid = batch["object_valid"][:, slot]
        if not bool(valid.any()):
            continue
        start = int(torch.nonzero(valid)[0])
        object_id = int(batch["object_ids"][start, slot])
        frames = range(start, t_len)
        gt = [batch["gt_masks"][t, slot].cpu().numpy() for t in frames]
        ours = [student[t, slot].cpu().numpy() for t in frames]
        theirs = [teacher[t, slot].cpu().numpy() for t in frames]
        scores["gt"].append(score_object(video, object_id, ours, gt))
        scores["teacher"].append(score_object(video, object_id, ours, theirs))
        scores["teacher_gt"].append(score_object(video, object_id, theirs, gt))


def elapsed(started: float, device: torch.device) -> float:
    """Seconds since ``started``, after the device's queued work is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


# ---- DAVIS ------------------------------------------------------------------------------------------------


@dataclass
class DavisEval:
    videos: int
    objects: int
    frames: int
    jf: dict[str, float]
    per_video: dict[str, float] = field(default_factory=dict)  # J&F per video
    ms_per_frame: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def read_palette_mask(path: Path, what: str = "DAVIS annotations are") -> np.ndarray:
    """An object-index image (a DAVIS annotation, a --mask prompt): the index of every pixel (uint8 (H, W))."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L"):
                raise EvalError(f"{path}: a {image.mode} PNG; {what} palette (P) or grey (L) PNGs of object indices (0 background)")
            return np.array(image)
    except (OSError, UnidentifiedImageError) as exc:
        raise EvalError(f"{path}: not a readable PNG ({exc})") from None


def davis_videos(root: Path) -> list[tuple[str, list[Path], list[Path]]]:
    """(video, frame JPEGs, annotation PNGs) of a DAVIS-format folder, every frame annotated."""
    images, annotations = root / "JPEGImages", root / "Annotations"
    for folder in (images, annotations):
        if not folder.is_dir():
            raise EvalError(f"--davis {root}: no {folder.name}/ folder (expected JPEGImages/<video>/*.jpg and Annotations/<video>/*.png)")
    out = []
    for video in sorted(p for p in images.iterdir() if p.is_dir()):
        frames = sorted(video.glob("*.jpg"))
        masks = [annotations / video.name / f"{f.stem}.png" for f in frames]
        missing = [m for m in masks if not m.is_file()]
        if not frames:
            raise EvalError(f"--davis {root}: {video} holds no .jpg frames")
        if missing:
            raise EvalError(
                f"--davis {root}: {len(missing)} frame(s) of {video.name} have no annotation, e.g. {missing[0]}; J&F needs every frame annotated"
            )
        out.append((video.name, frames, masks))
    if not out:
        raise EvalError(f"--davis {root}: JPEGImages/ holds no video folders")
    return out


def evaluate_davis(model: VideoStudentModel, root: Path, limit: int | None = None) -> DavisEval:
    """J&F of the student on a DAVIS-format folder (see the module docstring)."""
    size, student_size = model.heads.geometry.image_size, model.student.spec.image_size
    scores: list[ObjectScore] = []
    per_video: dict[str, float] = {}
    seconds, tracked = 0.0, 0
    for name, frame_paths, mask_paths in davis_videos(root)[:limit]:
        labels = np.stack([read_palette_mask(p) for p in mask_paths])
        first = load_image(frame_paths[0])
        if labels.shape[1:] != first.shape[:2]:
            raise EvalError(f"{mask_paths[0]}: {labels.shape[2]}x{labels.shape[1]}, but its frame is {first.shape[1]}x{first.shape[0]}")
        objects = [int(k) for k in np.unique(labels) if k not in (0, 255)]
        if not objects:
            continue
        prompts = []
        for k in objects:
            start = int(np.flatnonzero((labels == k).any(axis=(1, 2)))[0])
            prompts.append(
                ObjectPrompt(k, start, VideoPrompt.MASK, None, None, model_frame_mask((labels[start] == k).astype(np.float32), size))
            )
        pixels = torch.stack([resize_uint8(load_image(p), student_size) for p in frame_paths])
        started = time.perf_counter()
        tracks = model.track(pixels, prompts)
        seconds += elapsed(started, next(model.parameters()).device)
        tracked += len(frame_paths)
        # one label per pixel, as DAVIS results are: overlapping masks go to the object of the highest logit
        ours = [tracks.frame_masks(t, *labels.shape[1:]) & (labels[t] != 255) for t in range(len(labels))]
        video_scores = []
        for j, prompt in enumerate(prompts):
            frames = range(prompt.frame, len(labels))
            video_scores.append(
                score_object(name, prompt.object_id, [ours[t][j] for t in frames], [labels[t] == prompt.object_id for t in frames])
            )
        scores += video_scores
        per_video[name] = summarize(video_scores).jf
    summary: JFSummary = summarize(scores)
    return DavisEval(len(per_video), summary.objects, tracked, summary.to_dict(), per_video, 1000 * seconds / max(1, tracked))
