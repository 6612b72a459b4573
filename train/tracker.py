"""The stage-2 student tracker: stage-1 student encoder -> SAM3's frozen tracker heads, with a learned compact memory.

Per frame: the student encoder's trunk-shaped map -> the frozen tracker neck (``TeacherHeads.tracker_features``) ->
for each tracked object either

* its conditioning frame: the prompt as the cache gave it (a mask prompt is the output itself, as SAM3's
  ``_use_mask_as_output``; a point or box goes through the frozen decoder on the features + the no-memory embedding),
* or a tracked frame: :class:`esam3.train.memory.StudentMemory` conditions the top-level features on the object's
  memory bank (its conditioning frames up to this one, the ``memory_frames - 1`` frames before, object pointers of up
  to ``max_pointers - 1`` frames before: SAM3's selection for objects prompted once, as the cache prompts them; SAM3
  would keep only the 4 nearest of several conditioning frames) -> the frozen mask decoder without a prompt;

and the frame's new memory: the frozen memory encoder on the student's features and mask (its "own" memory), or the
teacher's cached ``maskmem_features`` and pointer (teacher forcing, with probability ``forcing`` per memory, drawn
from the step's generator), compressed by the Perceiver. Frames before the clip always give the teacher's memory
(``esam3.train.clips``). Gradients run through the whole clip (memory of earlier frames included) into the memory
module, and into the student encoder when it is trained. No teacher trunk or teacher memory attention is used.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from esam3.train.clips import PAD_LABEL
from esam3.train.memory import MemorySpec, StudentMemory
from esam3.workers.heads import TeacherHeads

#: SAM3's mask logit where an object is judged absent (what the memory encoder then sees).
NO_OBJECT_LOGIT = -1024.0


@dataclass
class Decoded:
    """Decoder outputs of K (object, frame) pairs of a batch that ran the mask decoder together."""

    row: torch.Tensor  # (K,) frame row of the batch (clip * T + t)
    slot: torch.Tensor  # (K,) object slot in that row
    clip: torch.Tensor  # (K,)
    logits: torch.Tensor  # (K, M, m, m) raw mask logits (M = 3 multimask outputs or 1)
    iou: torch.Tensor  # (K, M) predicted IoU
    score: torch.Tensor  # (K,) object score logits
    pick: torch.Tensor  # (K,) the output the tracker uses (best predicted IoU of the multimask ones)
    conditioned: torch.Tensor | None  # (K, hidden, g, g): the student's pix_feat_with_mem (tracked frames only)

    @property
    def picked(self) -> torch.Tensor:
        return self.logits[torch.arange(len(self.pick), device=self.pick.device), self.pick]

    def lightened(self) -> Decoded:
        """Only what inference keeps: the picked logits (float16), its IoU and the scores."""
        rows = torch.arange(len(self.pick), device=self.pick.device)
        return Decoded(
            self.row,
            self.slot,
            self.clip,
            self.picked[:, None].half(),
            self.iou[rows, self.pick][:, None],
            self.score,
            torch.zeros_like(self.pick),
            None,
        )


@dataclass
class _Memory:
    latents: torch.Tensor | None  # (tokens, d): the compressed spatial memory (None: a pointer-only context frame)
    pointer: torch.Tensor  # (hidden,)
    conditioning: bool


@dataclass
class _Level:
    """The frozen neck's output for the batch's frame rows: mask-decoder inputs and the memory-attention input."""

    high_res: list[torch.Tensor]  # [(R, C/8, 4g, 4g), (R, C/4, 2g, 2g)]
    top: torch.Tensor  # (R, hidden, g, g) without any memory
    position: torch.Tensor  # (R, hidden, g, g)


def memory_spec(teacher: Any, config: Any) -> MemorySpec:
    """The memory's sizes: the config's choices resolved against the teacher's (``Sam3VideoConfig``) geometry and tracker."""
    from esam3.train.memory import default_window_grid
    from esam3.workers.heads import Geometry

    g, tracker = Geometry.from_config(teacher), teacher.tracker_config
    return MemorySpec(
        grid=g.grid,
        hidden=g.hidden,
        memory_dim=g.memory_channels,
        memory_frames=tracker.num_maskmem,
        max_pointers=tracker.max_object_pointers_in_encoder,
        global_latents=config.global_latents,
        window_grid=config.window_grid or default_window_grid(g.grid),
        perceiver_depth=config.perceiver_depth,
        perceiver_heads=config.perceiver_heads,
        attention_layers=config.memory_layers,
        attention_heads=config.memory_heads,
        attention_ffn=config.memory_ffn,
    )


class StudentTracker(nn.Module):
    """Student encoder + frozen tracker heads + the trained memory."""

    def __init__(self, encoder: nn.Module, heads: TeacherHeads, memory: StudentMemory, train_encoder: bool = False) -> None:
        super().__init__()
        self.encoder, self.heads, self.memory, self.train_encoder = encoder, heads, memory, train_encoder
        heads.requires_grad_(False)
        encoder.requires_grad_(train_encoder)

    @property
    def spec(self) -> MemorySpec:
        return self.memory.spec

    def train(self, mode: bool = True) -> StudentTracker:
        super().train(mode)
        self.heads.eval()  # frozen: SAM3's own eval-mode behaviour (binarised memory masks of prompted frames)
        if not self.train_encoder:
            self.encoder.eval()
        return self

    # ---- per frame ------------------------------------------------------------------------------------------

    def levels(self, pixels: torch.Tensor) -> _Level:
        """uint8 frames (R, 3, s, s) -> the frozen neck's levels of the student's features."""
        with torch.set_grad_enabled(self.train_encoder and torch.is_grad_enabled()):
            trunk = self.encoder(pixels)
        feats, positions = self.heads.tracker_features(trunk)
        rows, sizes = trunk.shape[0], self.heads.geometry.neck_sizes
        maps = [f.permute(1, 2, 0).reshape(rows, -1, s, s) for f, s in zip(feats, sizes)]
        return _Level(maps[:-1], maps[-1], positions[-1].permute(1, 2, 0).reshape(rows, -1, sizes[-1], sizes[-1]))

    def decode(
        self,
        level: _Level,
        local: torch.Tensor,
        top: torch.Tensor,
        points: torch.Tensor | None,
        labels: torch.Tensor | None,
        multimask: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The frozen decoder on ``top`` (K, hidden, g, g) with ``level``'s rows ``local``: logits, IoU, score, pick, pointer."""
        embeddings = [h[local] for h in level.high_res] + [top]
        logits, iou, tokens, score = self.heads.decode_each(embeddings, points, labels, multimask)
        pick = iou.argmax(dim=-1) if multimask else torch.zeros(len(iou), dtype=torch.long, device=iou.device)
        token = tokens[torch.arange(len(pick), device=pick.device), pick]
        return logits, iou, score, pick, self.heads._object_pointer(token, score)

    def high_res(self, logits: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """Low-res logits (K, m, m) -> what SAM3 encodes into memory: (K, 1, S, S), all absent where the score says so."""
        size = self.heads.geometry.image_size
        masked = torch.where(score[:, None, None] > 0, logits, torch.full_like(logits, NO_OBJECT_LOGIT))
        return F.interpolate(masked[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)

    def encode_memory(
        self, level: _Level, local: torch.Tensor, high_res: torch.Tensor, score: torch.Tensor, binarize: torch.Tensor
    ) -> torch.Tensor:
        """The frozen memory encoder on the student's features and a mask (K, 1, S, S) -> (K, memory_dim, g, g).

        ``binarize`` (K,) bool: encode the mask thresholded rather than its sigmoid. SAM3 (transformers) thresholds
        every object's mask on a frame where any object of the video got a prompt (its memory encoding is batched
        over the frame's objects with one flag), so that is what the cached memory holds, and what is done here."""
        tracker, g = self.heads.tracker_model, self.heads.geometry
        out = high_res.new_empty((len(local), g.memory_channels, g.grid, g.grid))
        for flag in (False, True):
            part = torch.nonzero(binarize == flag).flatten()
            if len(part):
                top = level.top[local[part]]
                features, _ = tracker._encode_new_memory(top.flatten(2).permute(2, 0, 1), high_res[part], score[part, None, None], flag)
                out[part] = features.permute(1, 2, 0).reshape(len(part), g.memory_channels, g.grid, g.grid).float()
        return out

    @staticmethod
    def binarized(batch: dict[str, Any], rows: torch.Tensor) -> torch.Tensor:
        """(K,) whether these frame rows' memories are encoded from thresholded masks (see :meth:`encode_memory`)."""
        return (batch["is_conditioning"] & batch["object_valid"])[rows].any(dim=1)

    def memory_position(self, device: torch.device) -> torch.Tensor:
        """The memory encoder's (fixed, sine) position encoding of a (1, memory_dim, g, g) map."""
        g = self.heads.geometry
        return self.heads.tracker_model.memory_encoder.position_encoding((1, g.memory_channels, g.grid, g.grid), device, torch.float32)

    # ---- a batch of clips -----------------------------------------------------------------------------------

    def forward(
        self,
        batch: dict[str, Any],
        clip_length: int,
        objects: int,
        forcing: float,
        generator: torch.Generator | None = None,
        light: bool = False,
    ) -> list[Decoded]:
        """Track up to ``objects`` objects per clip through the batch's clips (see the module docstring).

        ``light`` (inference): each output keeps only the picked mask logits (float16) and scores, not the other
        outputs or the memory-conditioned maps, so a long video's outputs stay small."""
        t_len = clip_length
        clips = len(batch["key"]) // t_len
        device = batch["input"].device
        position = self.memory_position(device)
        window = max(self.spec.memory_frames, self.spec.max_pointers)
        tracks = self._tracks(batch, clips, t_len, objects, generator)
        memory: dict[int, dict[int, _Memory]] = {i: {} for i in range(len(tracks))}
        self._context(batch, tracks, memory, position)
        config = self.heads.tracker_model.config
        tracking_multimask = bool(config.multimask_output_for_tracking) and self.heads.uses_multimask(0)
        cond_index = {(int(r), int(s)): k for k, (r, s) in enumerate(zip(batch["cond_row"].tolist(), batch["cond_slot"].tolist()))}
        outputs: list[Decoded] = []
        for t in range(t_len):
            level = self.levels(batch["input"][torch.arange(clips, device=device) * t_len + t])  # one frame per clip: row = clip
            active = [(i, clip, slot) for i, (clip, _, slots) in enumerate(tracks) if (slot := slots[t]) >= 0]
            # which of this frame's new memories are the teacher's: drawn first, so no own memory is made for them
            forced = {
                i: forcing >= 1.0 or (generator is not None and forcing > 0 and float(torch.rand((), generator=generator)) < forcing)
                for i, _, _ in active
            }
            frame = _Frame(batch, level, t, t_len, forced, {})
            by_prompt: dict[int, list[tuple[int, int, int]]] = defaultdict(list)  # conditioning: mask prompts (0 points), clicks, boxes
            groups: dict[tuple[Any, ...], list[tuple[tuple[int, int, int], Any]]] = defaultdict(
                list
            )  # tracked: by the shape of their banks
            for entry in active:
                i, clip, slot = entry
                row = clip * t_len + t
                if bool(batch["is_conditioning"][row, slot]):
                    by_prompt[int((batch["cond_labels"][cond_index[(row, slot)]] != PAD_LABEL).sum())].append(entry)
                else:
                    selection = self._selection(memory[i], int(batch["frame_number"][row]))
                    groups[selection[2]].append((entry, selection))
            made: list[Decoded] = []
            for group in by_prompt.values():
                made += self._condition(frame, group, cond_index)
            for members in groups.values():
                made.append(self._track(frame, [e for e, _ in members], [sel for _, sel in members], memory, tracking_multimask))
            outputs += [out.lightened() for out in made] if light else made
            maps, pointers = [], []
            for i, clip, slot in active:  # this frame's memory of each object: the teacher's (forced) or the student's own
                row = clip * t_len + t
                if forced[i]:
                    maps.append(batch["maskmem_features"][row, slot][None].float())
                    pointers.append(batch["object_pointer"][row, slot])
                else:
                    maps.append(frame.new[i][0])
                    pointers.append(frame.new[i][1])
            if active:
                latents = self.memory.compress(torch.cat(maps), position.expand(len(maps), -1, -1, -1))  # one Perceiver pass per frame
            for k, (i, clip, slot) in enumerate(active):
                number = int(batch["frame_number"][clip * t_len + t])
                memory[i][number] = _Memory(latents[k], pointers[k], bool(batch["is_conditioning"][clip * t_len + t, slot]))
                for old in [f for f, m in memory[i].items() if f <= number - window and not m.conditioning]:
                    del memory[i][old]  # out of every window: long videos keep a bounded memory
        return outputs

    def _tracks(
        self, batch: dict[str, Any], clips: int, t_len: int, objects: int, generator: torch.Generator | None
    ) -> list[tuple[int, int, list[int]]]:
        """(clip, object id, slot of the object in each frame row or -1) for up to ``objects`` objects per clip."""
        tracks = []
        ids = batch["object_ids"].cpu()
        for clip in range(clips):
            rows = ids[clip * t_len : (clip + 1) * t_len]
            present = [int(o) for o in rows[-1].tolist() if o >= 0]
            if len(present) > objects:
                order = torch.randperm(len(present), generator=generator)[:objects] if generator is not None else torch.arange(objects)
                present = sorted(present[int(k)] for k in order)
            for object_id in present:
                slots = [(r == object_id).nonzero().flatten().tolist() for r in rows]
                tracks.append((clip, object_id, [s[0] if s else -1 for s in slots]))
        return tracks

    def _context(
        self, batch: dict[str, Any], tracks: list[tuple[int, int, list[int]]], memory: dict[int, dict[int, _Memory]], position: torch.Tensor
    ) -> None:
        """The teacher's memory of frames before each clip (bank rows: maps + pointers; pointer rows: pointers)."""
        by_clip: dict[int, list[int]] = defaultdict(list)
        for i, (clip, _, _) in enumerate(tracks):
            by_clip[clip].append(i)
        for name in ("bank", "pointers"):
            rows = batch.get(name)
            if rows is None:
                continue
            pending = []  # (track, frame, context row, slot)
            for r, (clip, frame) in enumerate(zip(batch[f"{name}_clip"].tolist(), batch[f"{name}_frame"].tolist())):
                for i in by_clip.get(clip, []):
                    object_id = tracks[i][1]
                    hits = (rows["object_ids"][r] == object_id).nonzero().flatten()
                    if len(hits):
                        pending.append((i, frame, r, int(hits[0])))
            if not pending:
                continue
            index = torch.tensor([[r, s] for _, _, r, s in pending], device=rows["object_pointer"].device)
            latents = None
            if name == "bank":
                maps = rows["maskmem_features"][index[:, 0], index[:, 1]].float()
                latents = self.memory.compress(maps, position.expand(len(maps), -1, -1, -1))
            for k, (i, frame, r, s) in enumerate(pending):
                memory[i][frame] = _Memory(
                    None if latents is None else latents[k], rows["object_pointer"][r, s], bool(rows["is_conditioning"][r, s])
                )

    def _selection(self, bank: dict[int, _Memory], frame: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]], tuple[Any, ...]]:
        """Which memories a frame reads (SAM3's rule for objects prompted once): (slot, frame) spatial memories,
        (distance, frame) pointers, and their signature (objects with equal signatures are batched)."""
        spec = self.spec
        spatial = [(0, f) for f, m in sorted(bank.items()) if m.conditioning and f <= frame and m.latents is not None]
        spatial += [
            (k, frame - k)
            for k in range(1, spec.memory_frames)
            if (m := bank.get(frame - k)) is not None and not m.conditioning and m.latents is not None
        ]
        pointers = [(frame - f, f) for f, m in sorted(bank.items()) if m.conditioning and f <= frame]
        pointers += [(k, frame - k) for k in range(1, spec.max_pointers) if (m := bank.get(frame - k)) is not None and not m.conditioning]
        return spatial, pointers, (tuple(s for s, _ in spatial), tuple(d for d, _ in pointers))

    def _track(
        self,
        frame: _Frame,
        group: list[tuple[int, int, int]],
        selections: list[Any],
        memory: dict[int, dict[int, _Memory]],
        multimask: bool,
    ) -> Decoded:
        """Tracked frames of objects whose memory banks have the same shape (``selections``: each one's
        :meth:`_selection`): memory attention, decoder, new memory. Each object reads its own memories."""
        batch, level = frame.batch, frame.level
        rows, local = frame.rows(group), frame.local(group)
        if not selections[0][0]:
            raise ValueError(f"{batch['key'][int(rows[0])]}: a tracked object without a conditioning frame in its memory")
        frames = [
            (slot, torch.stack([memory[i][sel[0][p][1]].latents for (i, _, _), sel in zip(group, selections)]))  # type: ignore[misc]
            for p, (slot, _) in enumerate(selections[0][0])
        ]
        pointers = [
            (distance, torch.stack([memory[i][sel[1][p][1]].pointer for (i, _, _), sel in zip(group, selections)]))
            for p, (distance, _) in enumerate(selections[0][1])
        ]
        conditioned = self.memory(level.top[local], level.position[local], self.memory.bank(frames, pointers))
        return self._finish(frame, group, self.decode(level, local, conditioned, None, None, multimask), conditioned)

    def _condition(self, frame: _Frame, group: list[tuple[int, int, int]], cond_index: dict[tuple[int, int], int]) -> list[Decoded]:
        """Conditioning frames: the cached prompt (a mask is the output itself; points / boxes run the decoder)."""
        tracker, batch, level = self.heads.tracker_model, frame.batch, frame.level
        rows, local = frame.rows(group), frame.local(group)
        picks = torch.tensor([cond_index[(int(r), slot)] for r, (_, _, slot) in zip(rows.tolist(), group)], device=rows.device)
        labels = batch["cond_labels"][picks]
        if bool((labels == PAD_LABEL).all()):  # mask prompts
            masks = batch["cond_masks"][picks][:, None]
            # one row at a time: transformers' _use_mask_as_output broadcasts its presence flag wrongly for several rows
            outs = [
                tracker._use_mask_as_output(level.top[r : r + 1], [h[r : r + 1] for h in level.high_res], masks[k : k + 1])
                for k, r in enumerate(local.tolist())
            ]
            high_res = torch.cat([o.high_res_masks for o in outs])
            score = torch.cat([o.object_score_logits.reshape(-1) for o in outs])
            self._remember(frame, group, high_res, score, torch.cat([o.object_pointer.reshape(1, -1) for o in outs]))
            return []
        n_points = int((labels[0] != PAD_LABEL).sum())
        top = level.top[local] + tracker.no_memory_embedding.reshape(1, -1, 1, 1)
        decoded = self.decode(
            level, local, top, batch["cond_points"][picks][:, :n_points], labels[:, :n_points], self.heads.uses_multimask(n_points)
        )
        return [self._finish(frame, group, decoded, None)]

    def _finish(
        self, frame: _Frame, group: list[tuple[int, int, int]], decoded: tuple[torch.Tensor, ...], conditioned: torch.Tensor | None
    ) -> Decoded:
        """A decoder group's outputs, and its objects' own new memories."""
        logits, iou, score, pick, pointer = decoded
        picked = logits[torch.arange(len(pick), device=pick.device), pick]
        self._remember(frame, group, self.high_res(picked, score), score, pointer)
        rows = frame.rows(group)
        slots = torch.tensor([s for _, _, s in group], device=rows.device)
        return Decoded(rows, slots, frame.local(group), logits, iou, score, pick, conditioned)

    def _remember(
        self, frame: _Frame, group: list[tuple[int, int, int]], high_res: torch.Tensor, score: torch.Tensor, pointer: torch.Tensor
    ) -> None:
        """The student's own memory of this frame for the objects not teacher-forced: memory encoder on its mask."""
        own = [k for k, (i, _, _) in enumerate(group) if not frame.forced[i]]
        if not own:
            return
        keep = torch.tensor(own, device=high_res.device)
        rows, local = frame.rows(group)[keep], frame.local(group)[keep]
        maps = self.encode_memory(frame.level, local, high_res[keep], score[keep], self.binarized(frame.batch, rows))
        for j, k in enumerate(own):
            frame.new[group[k][0]] = (maps[j : j + 1], pointer[k])


@dataclass
class _Frame:
    """One time step of a batch of clips: what the per-group steps share."""

    batch: dict[str, Any]
    level: _Level
    t: int
    t_len: int
    forced: dict[int, bool]  # track -> its new memory is the teacher's
    new: dict[int, tuple[torch.Tensor, torch.Tensor]]  # track -> its own new memory map (1, C, g, g) and pointer

    def rows(self, group: list[tuple[int, int, int]]) -> torch.Tensor:
        """The batch rows (clip * T + t) of a group's entries."""
        return torch.tensor([clip * self.t_len + self.t for _, clip, _ in group], device=self.level.top.device)

    def local(self, group: list[tuple[int, int, int]]) -> torch.Tensor:
        """The level's rows (one per clip) of a group's entries."""
        return torch.tensor([clip for _, clip, _ in group], device=self.level.top.device)
