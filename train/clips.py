"""Stage 2's reader: batches of clips, each with what the frames before it leave in the teacher's memory.

A clip is ``clip_length`` consecutive annotated frames of one video (``esam3.train.sampler.ClipSampler``). The
teacher's targets on a clip frame were made with the memory of the frames before it (the object's conditioning
frame, the 6 frames before, object pointers from the 15 before), so a clip that starts mid-video also carries that
context, read from the cached rows: ``bank`` rows (object pointers + ``maskmem_features``) for the conditioning
frames and the ``memory_frames - 1`` frames before the clip, ``pointers`` rows (object pointers only) for the
frames further back that still give pointers. The student then starts each clip with the teacher's memory
(teacher-forced context) and builds its own from there.

A batch (B clips of T frames) is the frames table's batch of B x T rows (``StoreDataset``: fields ``input``,
``memory``, ``gt``) plus:

* ``clip_video`` (B,) video codes and ``frame_number`` (B x T,) each row's frame number;
* ``bank`` / ``pointers``: the context rows' batches, with ``bank_clip`` / ``pointers_clip`` (which clip) and
  ``bank_frame`` / ``pointers_frame`` (frame numbers);
* the conditioning prompts of the clip's rows, rebuilt exactly as the cache made them from the ground truth and the
  store's prompt settings: ``cond_row``, ``cond_slot`` (K,), ``cond_masks`` (K, S, S) float 0/1 for mask prompts,
  ``cond_points`` (K, P, 2) / ``cond_labels`` (K, P) (SAM's pixel-index convention, -10 pads) for point / box prompts.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from esam3.schemas.rle import parse_counts
from esam3.schemas.teacher import VideoPrompt, VideoTargetConfig
from esam3.train.reader import StoreDataset
from esam3.workers.video_targets import ObjectPrompt, object_prompts

#: Label of an empty point slot in the tracker's prompt encoder.
PAD_LABEL = -10


def prompt_tensors(prompts: Sequence[ObjectPrompt], size: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Conditioning prompts as the tracker reads them: ``cond_masks`` (K, S, S) for mask prompts, ``cond_points``
    (K, 2, 2) / ``cond_labels`` (K, 2; ``PAD_LABEL`` for an empty slot) for clicks and boxes."""
    k = len(prompts)
    out = {
        "cond_masks": torch.zeros(k, size, size, device=device),
        "cond_points": torch.zeros(k, 2, 2, device=device),
        "cond_labels": torch.full((k, 2), PAD_LABEL, dtype=torch.long, device=device),
    }
    for j, prompt in enumerate(prompts):
        if prompt.mask is not None:
            out["cond_masks"][j] = torch.as_tensor(prompt.mask, dtype=torch.float32, device=device)
        else:
            n = len(prompt.labels)
            out["cond_points"][j, :n] = torch.as_tensor(prompt.points, dtype=torch.float32, device=device)
            out["cond_labels"][j, :n] = torch.as_tensor(prompt.labels, dtype=torch.long, device=device)
    return out


def with_fields(dataset: StoreDataset, fields: Sequence[str]) -> StoreDataset:
    """The same rows, read with other fields (shares the reader; no new scan)."""
    view = copy.copy(dataset)
    view.fields = tuple(fields)
    return view


class ClipDataset(Dataset):
    """``dataset[indices]`` for the indices a ``ClipSampler`` over ``frames`` yields (B clips x ``clip_length``)."""

    def __init__(self, frames: StoreDataset, clip_length: int, memory_frames: int, max_pointers: int) -> None:
        if frames.table != "frames":
            raise ValueError("a ClipDataset reads the frames table")
        if frames.keys is None:
            raise ValueError("build a ClipDataset in the main process, from a StoreDataset that still holds its keys")
        self.frames, self.clip_length = frames, clip_length
        self.memory_back, self.pointer_back = memory_frames - 1, max_pointers - 1
        video = self.frames.spec["video"]
        self.prompt = VideoTargetConfig(prompt=VideoPrompt(video["prompt"]), seed=video["seed"], max_objects=1)
        names, codes = np.unique(np.asarray(frames.video_ids, dtype=object), return_inverse=True)
        self.video_names = [str(n) for n in names]
        self.video_code = codes.astype(np.int64)
        self.frame = np.asarray(frames.frames, dtype=np.int64)
        self.stride = int(self.frame.max(initial=0)) + 1
        lookup = self.video_code * self.stride + self.frame
        self.order = np.argsort(lookup, kind="stable")
        self.sorted_lookup = lookup[self.order]
        self.cond = self._conditioning_frames()

    def _conditioning_frames(self) -> dict[tuple[int, int], int]:
        """(video code, object id) -> the frame where the object was prompted, from one scan of two small columns;
        also sets ``tracked``: per dataset index, whether an object is tracked (past its prompt) on that frame."""
        table = self.frames.store.dataset("frames", self.frames.version).to_table(columns=["object_ids", "is_conditioning"])
        ids, flags = table.column("object_ids").to_pylist(), table.column("is_conditioning").to_pylist()
        out: dict[tuple[int, int], int] = {}
        self.tracked = np.zeros(len(self.frames), dtype=bool)
        for index, position in enumerate(self.frames.positions.tolist()):
            self.tracked[index] = not all(flags[position])  # all([]) is True: a frame with no object tracks nothing
            for object_id, flag in zip(ids[position], flags[position]):
                if flag:
                    out[(int(self.video_code[index]), int(object_id))] = int(self.frame[index])
        return out

    def __len__(self) -> int:
        return len(self.frames)

    def index_of(self, video: int, frame: int) -> int:
        """The dataset index of (video code, frame), or -1 when that frame is not in this split."""
        key = video * self.stride + frame
        at = int(np.searchsorted(self.sorted_lookup, key))
        return int(self.order[at]) if at < len(self.sorted_lookup) and self.sorted_lookup[at] == key else -1

    def __getitem__(self, indices: Sequence[int]) -> dict[str, Any]:
        return self.take(indices, self.clip_length)

    def video_indices(self) -> list[np.ndarray]:
        """Each video's dataset indices in frame order (eval reads a whole video as one clip)."""
        order = self.order  # sorted by (video, frame)
        starts = np.flatnonzero(np.diff(self.video_code[order], prepend=-1))
        return [order[a:b] for a, b in zip(starts, [*starts[1:], len(order)])]

    def take(self, indices: Sequence[int], t: int) -> dict[str, Any]:
        """Clips of ``t`` frames each (``indices`` clip after clip, in frame order)."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) % t:
            raise ValueError(f"{len(indices)} indices are not whole clips of {t} frames")
        batch = self.frames[indices.tolist()]
        clips = len(indices) // t
        batch["clip_video"] = torch.from_numpy(self.video_code[indices[::t]])
        batch["frame_number"] = torch.from_numpy(self.frame[indices])
        bank: list[tuple[int, int, int]] = []  # (clip, frame, index)
        pointers: list[tuple[int, int, int]] = []
        for clip in range(clips):
            first = indices[clip * t]
            video, start = int(self.video_code[first]), int(self.frame[first])
            objects = batch["object_ids"][clip * t + t - 1]
            cond_frames = {self.cond.get((video, int(o))) for o in objects.tolist() if o >= 0}
            for back in range(1, self.pointer_back + 1):
                frame = start - back
                index = self.index_of(video, frame) if frame >= 0 else -1
                if index >= 0 and back > self.memory_back and frame not in cond_frames:
                    pointers.append((clip, frame, index))
            for frame in sorted({start - back for back in range(1, self.memory_back + 1)} | {f for f in cond_frames if f is not None}):
                index = self.index_of(video, frame) if 0 <= frame < start else -1
                if index >= 0:
                    bank.append((clip, frame, index))
        for name, entries, fields in (("bank", bank, ("bank",)), ("pointers", pointers, ("pointers",))):
            batch[name] = with_fields(self.frames, fields)[[i for _, _, i in entries]] if entries else None
            batch[f"{name}_clip"] = torch.tensor([c for c, _, _ in entries], dtype=torch.long)
            batch[f"{name}_frame"] = torch.tensor([f for _, f, _ in entries], dtype=torch.long)
        batch.update(self._cond_prompts(indices, batch))
        return batch

    def _cond_prompts(self, indices: np.ndarray, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Each conditioning (row, object)'s prompt, remade from its ground truth as the cache made it."""
        rows, slots = torch.nonzero(batch["is_conditioning"] & batch["object_valid"], as_tuple=True)
        size = self.frames.geometry["image_size"]
        prompts = []
        if len(rows):
            positions = self.frames.positions[indices[rows.unique().numpy()]].tolist()
            gt = dict(zip(positions, (r["gt_masks"] for r in self.frames.rows.take(positions, columns=["gt_masks"]))))
            for row, slot in zip(rows.tolist(), slots.tolist()):
                rle = gt[int(self.frames.positions[indices[row]])][slot]
                runs = parse_counts(rle["counts"], rle["height"], rle["width"])
                video = self.video_names[int(self.video_code[indices[row]])]
                prompts += object_prompts(f"sav/{video}", [(0, [runs])], [int(batch["object_ids"][row, slot])], size, self.prompt)
        return {"cond_row": rows, "cond_slot": slots, **prompt_tensors(prompts, size)}

    def to_device(self, batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
        out = self.frames.to_device({k: v for k, v in batch.items() if k not in ("bank", "pointers")}, device)
        for name in ("bank", "pointers"):
            out[name] = None if batch[name] is None else self.frames.to_device(batch[name], device)
        return out
