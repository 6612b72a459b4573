"""Batch samplers over a store's rows: a seeded row-level shuffle per epoch, sharded over ranks, with exact resume.

Both yield lists of positions into a ``StoreDataset`` (one Lance ``take`` per batch); give the DataLoader
``batch_size=None``. The order depends only on (seed, epoch, rank, world size), so a trainer that restarts at
(epoch, step) gets exactly the batches it would have seen (``start_step``).

Equal counts per rank, as distributed training needs: with ``drop_last`` each rank gets ``n // world`` rows (the
last ``n % world`` of the epoch's permutation are left out, different ones every epoch); otherwise the permutation
is padded by repeating its first ``world - n % world`` rows, so every row is seen and at most ``world - 1`` rows
are seen twice in an epoch. ``drop_last`` also drops a rank's last, partial batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


def _check(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..world_size-1 and world_size >= 1, got rank {rank}, world_size {world_size}")


def shard_order(n: int, seed: int, epoch: int, rank: int, world_size: int, drop_last: bool, shuffle: bool = True) -> np.ndarray:
    """This rank's share of epoch ``epoch``'s order of ``n`` items (see the module docstring)."""
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    if drop_last:
        order = order[: n - n % world_size]
    elif n % world_size:
        order = np.concatenate([order, order[: world_size - n % world_size]]) if n else order
    return order[rank::world_size]


class EpochSampler(Sampler[list[int]]):
    """Batches of row positions for one rank; call :meth:`set_epoch` before each epoch (or pass ``epoch``)."""

    def __init__(
        self,
        num_rows: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        shuffle: bool = True,
        epoch: int = 0,
        start_step: int = 0,
    ) -> None:
        _check(batch_size, rank, world_size)
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed
        self.rank, self.world_size, self.drop_last, self.shuffle = rank, world_size, drop_last, shuffle
        self.set_epoch(epoch, start_step)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """The epoch to iterate next, from batch ``start_step`` on (a resume); later epochs start at 0."""
        if epoch < 0 or start_step < 0:
            raise ValueError(f"epoch and start_step must be >= 0, got {epoch}, {start_step}")
        self.epoch, self.start_step = epoch, start_step

    def _batches(self) -> list[np.ndarray]:
        order = shard_order(self.num_rows, self.seed, self.epoch, self.rank, self.world_size, self.drop_last, self.shuffle)
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    @property
    def steps_per_epoch(self) -> int:
        return len(self._batches())

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch - self.start_step)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._batches()[self.start_step :]:
            yield batch.tolist()

    def state_dict(self, step: int) -> dict[str, int]:
        """Where a trainer that has taken ``step`` batches of this epoch resumes."""
        return {"epoch": self.epoch, "step": step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.set_epoch(int(state["epoch"]), int(state["step"]))


class ClipSampler(EpochSampler):
    """Stage 2: batches of clips, each ``clip_length`` consecutive annotated frames of one video.

    ``videos`` and ``frames`` are the rows' ``video_id`` and ``frame`` (position among the video's annotated
    frames); a clip is a run of consecutive frame numbers of one video, starting every ``stride`` frames; with
    ``keep`` (a flag per row), only clips holding a flagged row. The
    epoch order shuffles clips (not frames); a batch of B clips is B x T positions, clip after clip, in frame order.
    """

    def __init__(
        self,
        videos: Sequence[str],
        frames: Sequence[int],
        clip_length: int,
        batch_size: int,
        stride: int | None = None,
        keep: Sequence[bool] | None = None,
        **options: object,
    ) -> None:
        if clip_length < 1:
            raise ValueError(f"clip_length must be at least 1, got {clip_length}")
        stride = clip_length if stride is None else stride
        if stride < 1:
            raise ValueError(f"stride must be at least 1, got {stride}")
        self.clip_length = clip_length
        self.clips = clips(videos, frames, clip_length, stride)
        if keep is not None:  # only clips with at least one flagged frame (stage 2: a frame with an object being tracked)
            flags = np.asarray(keep, dtype=bool)
            self.clips = self.clips[flags[self.clips].any(axis=1)] if len(self.clips) else self.clips
        super().__init__(len(self.clips), batch_size, **options)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._batches()[self.start_step :]:
            yield [int(p) for clip in batch for p in self.clips[clip]]


def clips(videos: Sequence[str], frames: Sequence[int], length: int, stride: int) -> np.ndarray:
    """(clips, length) positions: windows of ``length`` consecutive frames of one video, every ``stride`` frames."""
    by_video: dict[str, list[tuple[int, int]]] = {}
    for position, (video, frame) in enumerate(zip(videos, frames, strict=True)):
        by_video.setdefault(video, []).append((int(frame), position))
    out = []
    for video in sorted(by_video):
        ordered = sorted(by_video[video])
        numbers = [f for f, _ in ordered]
        for start in range(0, len(ordered) - length + 1, stride):
            if numbers[start + length - 1] - numbers[start] == length - 1:  # no missing frame inside the window
                out.append([p for _, p in ordered[start : start + length]])
    return np.asarray(out, dtype=np.int64).reshape(len(out), length)
