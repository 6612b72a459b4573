"""SA-V memory targets: prompt each object from its ground truth, propagate with SAM3's tracker, record memory.

For one video (annotated frames only, i.e. every 4th frame = 6 fps, the rate SAM2/SAM3 train the tracker at):

1. the first ``max_objects`` masklets that appear within the first ``max_frames`` annotated frames are
   tracked; each is prompted on its first non-empty annotated frame from its ground-truth mask, as a
   point (a uniform foreground pixel, seeded per video and object), a tight box, or the mask itself;
2. frames go through the trunk in batches (one pass per frame); the tracker's features for a frame are put in
   the session cache, exactly as ``Sam3VideoModel`` shares its detector trunk with the tracker;
3. ``Sam3TrackerVideoModel`` steps through the frames (objects join on their first frame), and per
   (frame, object) we record the low-res mask logits, the object score, the object pointer, the encoded
   memory ``maskmem_features`` (64, g, g) and the memory-conditioned map ``pix_feat_with_mem`` (hidden, g, g).

The tracker's session counts the video's annotated frames (all of them, not only the ``max_frames`` used):
SAM3 scales object-pointer positions by ``min(num_frames, 16) - 1``, so a session sized to the frames used would
give a short prefix other pointers and memory than a run over the whole video does.

A mask-prompted object's first frame has no ``pix_feat_with_mem`` (SAM3 uses the mask as the output there and
skips memory attention): ``has_memory_conditioned`` says which rows hold one. Session memory stays bounded:
outputs older than the tracker's memory window are dropped as propagation goes on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from esam3.schemas.rle import Runs
from esam3.schemas.sav import SAV_ANNOTATION_STRIDE
from esam3.schemas.samples import VideoSample
from esam3.schemas.teacher import VideoPrompt, VideoTargetConfig
from esam3.workers.heads import TeacherHeads, capture_memory_conditioned
from esam3.workers.preprocess import normalize, resize_uint8
from esam3.workers.prompts import positive_point, prompt_rng, to_model_frame


@dataclass(frozen=True)
class ObjectPrompt:
    """How one object is prompted: on session frame ``frame`` (index into the kept frames)."""

    object_id: int  # the masklet's id (record.masklet_id)
    frame: int
    kind: VideoPrompt
    points: np.ndarray | None  # (N, 2) SAM pixel-index convention in the S x S frame
    labels: np.ndarray | None  # (N,) int32: 1 positive, 2/3 box corners
    mask: np.ndarray | None  # (S, S) float32 0/1, already resized to the teacher frame


@dataclass
class FrameTargets:
    """Targets of one annotated frame. N = objects tracked on this frame (those whose first frame has passed)."""

    frame: int  # position among the kept frames
    frame_index: int  # index into the 24 fps video
    trunk: torch.Tensor  # (C, g, g)
    object_ids: list[int]
    is_conditioning: torch.Tensor  # (N,) bool: the object's prompted frame
    mask_logits: torch.Tensor  # (N, m, m) low-res logits (-1024 where the tracker says the object is absent)
    object_score: torch.Tensor  # (N,)
    object_pointer: torch.Tensor  # (N, hidden)
    maskmem_features: torch.Tensor  # (N, memory_channels, g, g)
    pix_feat_with_mem: torch.Tensor  # (N, hidden, g, g), zeros where has_memory_conditioned is False
    has_memory_conditioned: torch.Tensor  # (N,) bool


def annotated_masks(sample: VideoSample, max_frames: int) -> list[tuple[int, Sequence[Runs]]]:
    """(kept frame position, masks of every object) for the first ``max_frames`` annotated frames in hand."""
    out = []
    for position, frame_index in enumerate(sample.frame_indices.tolist()):
        if frame_index % SAV_ANNOTATION_STRIDE:
            continue
        t = frame_index // SAV_ANNOTATION_STRIDE
        if t < len(sample.masks):
            out.append((position, sample.masks[t]))
        if len(out) == max_frames:
            break
    return out


def object_prompts(
    key: str, frames: list[tuple[int, Sequence[Runs]]], object_ids: Sequence[int], size: int, config: VideoTargetConfig
) -> list[ObjectPrompt]:
    """One prompt per object on its first non-empty annotated frame; at most ``max_objects`` objects."""
    prompts: list[ObjectPrompt] = []
    for obj, object_id in enumerate(object_ids):
        if len(prompts) == config.max_objects:
            break
        first = next(((i, masks[obj]) for i, (_, masks) in enumerate(frames) if masks[obj].area > 0), None)
        if first is None:
            continue
        frame, runs = first
        hw = (runs.height, runs.width)
        points = labels = mask = None
        if config.prompt == VideoPrompt.POINT:
            point = positive_point(runs, prompt_rng(f"{key}/{object_id}", config.seed))
            points = to_model_frame(point[None], hw, size) - 0.5
            labels = np.array([1], dtype=np.int32)
        elif config.prompt == VideoPrompt.BOX:
            points = to_model_frame(np.asarray(runs.bbox_xyxy(), dtype=np.float64), hw, size).reshape(2, 2) - 0.5
            labels = np.array([2, 3], dtype=np.int32)
        else:
            mask = model_frame_mask(runs.to_mask().astype(np.float32), size)
        prompts.append(ObjectPrompt(int(object_id), frame, config.prompt, points, labels, mask))
    return prompts


def model_frame_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A 0/1 mask at the video's size -> (S, S) float32 0/1 at the teacher's size, as SAM3's video processor does it."""
    if mask.shape == (size, size):
        return mask.astype(np.float32)
    tensor = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    resized = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (resized >= 0.5).float()[0, 0].numpy()


def add_prompts(session: Any, prompts: Sequence[ObjectPrompt], size: int, device: torch.device) -> None:
    """Register the objects whose first frame this is (what the processor's add_inputs_to_inference_session does)."""
    for prompt in prompts:
        obj_idx = session.obj_id_to_idx(prompt.object_id)
        if prompt.mask is not None:
            session.add_mask_inputs(obj_idx, prompt.frame, torch.from_numpy(model_frame_mask(prompt.mask, size))[None, None].to(device))
            session.remove_point_inputs(obj_idx, prompt.frame)
        else:
            inputs = {
                "point_coords": torch.from_numpy(prompt.points.astype(np.float32))[None, None].to(device),
                "point_labels": torch.from_numpy(prompt.labels)[None, None].to(device),
            }
            session.add_point_inputs(obj_idx, prompt.frame, inputs)
            session.remove_mask_inputs(obj_idx, prompt.frame)
    session.obj_with_new_inputs = [p.object_id for p in prompts]


def track(
    heads: TeacherHeads,
    trunk_frames: Iterator[torch.Tensor],
    num_frames: int,
    prompts: Sequence[ObjectPrompt],
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Step SAM3's tracker through the frames of ``trunk_frames`` (each frame's trunk output (1, C, g, g), in order)
    of a video of ``num_frames`` frames (its length sets the object-pointer positions; at most that many are read).

    Yields ``(frame, per-object outputs)``. Works on a loaded teacher and on exported heads alike; inference
    mode and autocast are entered per frame, never held across a ``yield``, and several calls may be in flight.
    """
    from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import Sam3TrackerVideoInferenceSession

    tracker = heads.tracker_model
    size = heads.geometry.image_size
    # A placeholder "video" of empty frames fixes num_frames (which sets the pointer window like a full video);
    # the frames' features always come from the cache filled below, never from pixels.
    session = Sam3TrackerVideoInferenceSession(
        video=torch.empty(num_frames, 0),
        video_height=size,
        video_width=size,
        inference_device=device,
        inference_state_device=device,
        video_storage_device=device,
        dtype=torch.float32,
    )
    by_frame: dict[int, list[ObjectPrompt]] = {}
    for prompt in prompts:
        by_frame.setdefault(prompt.frame, []).append(prompt)
    window = max(tracker.num_maskmem, tracker.config.max_object_pointers_in_encoder)
    with capture_memory_conditioned(tracker, session) as conditioned:
        for frame, trunk in enumerate(trunk_frames):
            if frame == num_frames:
                break
            with torch.inference_mode(), autocast():
                feats, positions = heads.tracker_features(trunk)
                session.cache.cache_vision_features(frame, {"vision_feats": feats, "vision_pos_embeds": positions})
                if frame in by_frame:
                    add_prompts(session, by_frame[frame], size, device)
                outputs: dict[str, Any] = {}
                if session.get_obj_num():
                    tracker(inference_session=session, frame_idx=frame)
                    outputs = _frame_outputs(session, frame, conditioned)
                    _forget_old(session, frame, window)
                conditioned.clear()
            yield frame, outputs


def _frame_outputs(session: Any, frame: int, conditioned: dict[tuple[int, int], torch.Tensor]) -> dict[str, Any]:
    out: dict[str, Any] = {"object_ids": [], "is_conditioning": [], "outputs": [], "conditioned": []}
    for obj_idx in range(session.get_obj_num()):
        per_obj = session.output_dict_per_obj[obj_idx]
        is_cond = frame in per_obj["cond_frame_outputs"]
        stored = per_obj["cond_frame_outputs" if is_cond else "non_cond_frame_outputs"][frame]
        out["object_ids"].append(session.obj_idx_to_id(obj_idx))
        out["is_conditioning"].append(is_cond)
        out["outputs"].append(stored)
        out["conditioned"].append(conditioned.get((frame, obj_idx)))
    return out


def _forget_old(session: Any, frame: int, window: int) -> None:
    """Drop what the tracker will never read again: full-res masks, and non-conditioning outputs out of the window."""
    for per_obj in session.output_dict_per_obj.values():
        for outputs in (per_obj["cond_frame_outputs"], per_obj["non_cond_frame_outputs"]):
            if frame in outputs:
                outputs[frame].pop("high_res_masks", None)
        per_obj["non_cond_frame_outputs"].pop(frame - window, None)


@dataclass(frozen=True)
class VideoWork:
    """What the teacher needs of one video, prepared on a CPU worker: resized frames, their indices, prompts."""

    key: str
    pixels: np.ndarray  # uint8 (T, 3, S, S), the annotated frames used
    frame_indices: np.ndarray  # int64 (T,), into the 24 fps video
    prompts: list[ObjectPrompt]
    video_frames: int  # annotated frames in the whole video (>= T): the tracker session's num_frames


def prepare_video(sample: VideoSample, config: VideoTargetConfig, size: int) -> VideoWork:
    """Resize the first ``max_frames`` annotated frames to S x S and prompt each object (see the module docstring)."""
    frames = annotated_masks(sample, config.max_frames)
    prompts = object_prompts(sample.key, frames, sample.record.masklet_id, size, config) if frames else []
    positions = [position for position, _ in frames]
    pixels = (
        np.stack([resize_uint8(sample.frames[p], size).numpy() for p in positions]) if positions else np.zeros((0, 3, size, size), np.uint8)
    )
    return VideoWork(sample.key, pixels, sample.frame_indices[positions].astype(np.int64), prompts, max(len(sample.masks), len(positions)))


def run_video(teacher: Any, work: VideoWork, on_device: bool = False) -> Iterator[FrameTargets]:
    """Trunk per frame (in batches) + the tracker: targets of each frame of a prepared video, in order; on the host,
    or left on the teacher's device with ``on_device`` (the cache's actor quantises them there)."""
    trunks: list[torch.Tensor | None] = []

    def trunk_stream() -> Iterator[torch.Tensor]:
        for start in range(0, len(work.pixels), teacher.config.batch_size):
            chunk = torch.from_numpy(np.array(work.pixels[start : start + teacher.config.batch_size]))  # writable copy
            for trunk in teacher.trunk_features(normalize(chunk.to(teacher.device))):
                trunks.append(trunk)
                yield trunk[None]

    stream = track(teacher.heads, trunk_stream(), work.video_frames, work.prompts, teacher.device, teacher.autocast)
    for frame, outputs in stream:
        yield frame_targets(
            frame, int(work.frame_indices[frame]), trunks[frame], outputs, teacher.heads, teacher.device if on_device else None
        )
        trunks[frame] = None


def iter_video_targets(teacher: Any, sample: VideoSample, config: VideoTargetConfig) -> Iterator[FrameTargets]:
    """Targets for each of the first ``max_frames`` annotated frames of ``sample`` (see the module docstring)."""
    return run_video(teacher, prepare_video(sample, config, teacher.geometry.image_size))


def frame_targets(
    frame: int, frame_index: int, trunk: torch.Tensor, outputs: dict[str, Any], heads: TeacherHeads, device: torch.device | None = None
) -> FrameTargets:
    """Stack one frame's per-object tracker outputs into float32 tensors on the host, or on ``device``."""
    g, hidden = heads.geometry.grid, heads.geometry.hidden
    m, mem = heads.geometry.mask_size, heads.geometry.memory_channels
    stored = outputs.get("outputs", [])
    n = len(stored)
    conditioned = outputs.get("conditioned", [])

    def stack(values: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        if not values:
            return torch.zeros((0, *shape), device=device)
        return torch.stack([v.detach().float().reshape(shape).to(device or "cpu") for v in values])

    return FrameTargets(
        frame=frame,
        frame_index=frame_index,
        trunk=trunk.float().to(device or "cpu"),
        object_ids=list(outputs.get("object_ids", [])),
        is_conditioning=torch.tensor(outputs.get("is_conditioning", []), dtype=torch.bool),
        mask_logits=stack([s["pred_masks"] for s in stored], (m, m)),
        object_score=stack([s["object_score_logits"] for s in stored], ()),
        object_pointer=stack([s["object_pointer"] for s in stored], (hidden,)),
        maskmem_features=stack([s["maskmem_features"].permute(1, 2, 0) for s in stored], (mem, g, g)),
        pix_feat_with_mem=stack([c if c is not None else torch.zeros(hidden, g, g, device=device) for c in conditioned], (hidden, g, g))
        if n
        else torch.zeros((0, hidden, g, g), device=device),
        has_memory_conditioned=torch.tensor([c is not None for c in conditioned], dtype=torch.bool),
    )
