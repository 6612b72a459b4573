"""The stage-2 student tracker's plumbing, checked against the teacher's cached video targets.

With the teacher's own trunk as the "student" encoder ("oracle"), every frozen step the tracker takes must give back
what the cache stored: the memory of a mask-prompted conditioning frame, and, fed the teacher's memory-conditioned
map, the mask, object score, pointer and new memory of a tracked frame. Only the memory module is the student's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from esam3.pipeline.store import Store
from esam3.train.clips import ClipDataset
from esam3.train.frozen_heads import load_store_heads
from esam3.train.memory import StudentMemory
from esam3.train.reader import StoreDataset
from esam3.train.sampler import ClipSampler
from esam3.train.tracker import StudentTracker, memory_spec
from esam3.workers.preprocess import normalize
from tests import sam3_reference as ref


class Oracle(nn.Module):
    def __init__(self, teacher) -> None:
        super().__init__()
        self.teacher = teacher

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.teacher.trunk_features(normalize(pixels)).float()


class MemoryOptions:
    global_latents, window_grid, perceiver_depth, perceiver_heads = 4, None, 1, 1
    memory_layers, memory_heads, memory_ffn = 1, 1, 128


@pytest.fixture(scope="module")
def clips(sav_store: Path) -> ClipDataset:
    frames = StoreDataset(str(sav_store), table="frames", fields=("input", "memory", "gt"), split="all")
    return ClipDataset(frames, clip_length=3, memory_frames=7, max_pointers=16)


@pytest.fixture(scope="module")
def oracle_tracker(sav_store: Path, tiny_teacher) -> StudentTracker:
    heads = load_store_heads(Store(str(sav_store)))
    return StudentTracker(Oracle(tiny_teacher), heads, StudentMemory(memory_spec(heads.config, MemoryOptions))).eval()


def test_frozen_steps_give_back_the_cached_targets(clips: ClipDataset, oracle_tracker: StudentTracker) -> None:
    sampler = ClipSampler(clips.frames.video_ids, clips.frames.frames, clip_length=9, batch_size=2, shuffle=False)
    indices = next(iter(sampler))
    batch = clips[indices]
    tracker = oracle_tracker
    with torch.no_grad():
        level = tracker.levels(batch["input"])
        # conditioning frames: the mask prompt rebuilt from the ground truth -> the cached memory
        rows, slots = batch["cond_row"], batch["cond_slot"]
        assert len(rows) >= 3
        out = tracker.heads.tracker_model._use_mask_as_output(
            level.top[rows], [h[rows] for h in level.high_res], batch["cond_masks"][:, None]
        )
        memory = tracker.encode_memory(level, rows, out.high_res_masks, out.object_score_logits.reshape(-1), tracker.binarized(batch, rows))
        assert ref.close(memory, batch["maskmem_features"][rows, slots], rel=2e-2)
        # tracked frames: the teacher's memory-conditioned map through the frozen decoder -> the cached outputs
        rows, slots = torch.nonzero(batch["has_memory_conditioned"] & ~batch["is_conditioning"], as_tuple=True)
        assert len(rows) >= 8
        conditioned = batch["pix_feat_with_mem"][rows, slots]
        logits, iou, score, pick, pointer = tracker.decode(level, rows, conditioned, None, None, multimask=True)
        picked = logits[torch.arange(len(pick)), pick]
        present = score > 0
        assert ref.close(score, batch["object_score"][rows, slots], rel=1e-2)
        assert ref.close(pointer, batch["object_pointer"][rows, slots], rel=1e-2)
        assert ref.close(picked[present], batch["mask_logits"][rows, slots][present], rel=1e-2)
        binarized = tracker.binarized(batch, rows)
        assert binarized.any() and not binarized.all()  # frames where another object got its prompt
        cached = batch["maskmem_features"][rows, slots]
        memory = tracker.encode_memory(level, rows, tracker.high_res(picked, score), score, binarized)
        assert ref.close(memory[~binarized], cached[~binarized], rel=2e-2)
        # thresholded masks: the tiny teacher's logits hover near 0, so float-level differences flip a few pixels
        cosine = torch.nn.functional.cosine_similarity(memory[binarized].flatten(1), cached[binarized].flatten(1))
        assert bool((cosine > 0.998).all())


@pytest.fixture(scope="module")
def student_tracker(sav_store: Path) -> StudentTracker:
    from esam3.train.students import Student, StudentSpec

    heads = load_store_heads(Store(str(sav_store)))
    g = heads.geometry
    torch.manual_seed(0)
    return StudentTracker(
        Student(StudentSpec("es-ev-s", g.trunk_width, g.grid, g.image_size)), heads, StudentMemory(memory_spec(heads.config, MemoryOptions))
    )


def test_a_clip_starting_mid_video_reads_the_teachers_memory_before_it(clips: ClipDataset) -> None:
    sampler = ClipSampler(clips.frames.video_ids, clips.frames.frames, clip_length=3, batch_size=3, shuffle=False)
    batch = clips[list(sampler)[0]]  # clips at frames 0-2, 3-5, 6-8 of the first video
    assert batch["frame_number"].tolist() == list(range(9))
    # clip 0 has no past; clip 1 reads frames 0-2 (memory and the prompts on frame 0), clip 2 frames 0-5
    assert batch["bank_clip"].tolist() == [1, 1, 1, 2, 2, 2, 2, 2, 2]
    assert batch["bank_frame"].tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5]
    assert batch["pointers"] is None  # no frame is further back than the 6 that give memory
    assert batch["bank"]["maskmem_features"].shape[0] == 9 and "pix_feat_with_mem" not in batch["bank"]
    assert batch["cond_row"].tolist() == torch.nonzero(batch["is_conditioning"], as_tuple=True)[0].tolist()


@pytest.mark.parametrize("forcing", [1.0, 0.0])
def test_stage2_terms_train_the_memory(clips: ClipDataset, student_tracker: StudentTracker, forcing: float) -> None:
    from esam3.train.video_losses import VideoLossWeights, stage2_terms

    sampler = ClipSampler(clips.frames.video_ids, clips.frames.frames, clip_length=3, batch_size=2, stride=3, shuffle=False)
    indices = list(sampler)[1]  # a clip of the first video from frame 6, one of the second from frame 0
    batch = clips[indices]
    tracker = student_tracker.train()
    tracker.zero_grad()
    outputs = tracker(batch, clip_length=3, objects=2, forcing=forcing, generator=torch.Generator().manual_seed(0))
    assert outputs and sum(len(o.row) for o in outputs) >= 6
    assert all(o.conditioned is not None and o.logits.shape[1] == 3 for o in outputs)  # tracked frames, multimask
    terms = stage2_terms(batch, outputs, VideoLossWeights(), clips=2)
    assert all(torch.isfinite(v).all() for v in terms.values())
    assert float(terms["memory_mse"].detach()) > 0 and float(terms["gt_mask"].detach()) > 0
    terms["total"].backward()
    grads = {name: p.grad for name, p in tracker.memory.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert all(p.grad is None for p in tracker.encoder.parameters())  # frozen stage-1 encoder
    assert all(p.grad is None for p in tracker.heads.parameters())


def test_tracked_objects_batched_together_each_read_their_own_memories(clips: ClipDataset, student_tracker: StudentTracker) -> None:
    """Two objects whose banks have the same shape (slots, pointer distances) but different frames — one prompted
    on frame 0 and seen on frame 8, one prompted on 8 and seen on 16 — decoded together equal each decoded alone."""
    from esam3.train.tracker import _Frame, _Memory

    batch = clips.take([0, 1], 1)  # two one-frame clips
    batch["frame_number"] = torch.tensor([8, 16])
    tracker = student_tracker.eval()
    d = tracker.spec.memory_dim
    torch.manual_seed(3)

    def memory(start: int) -> dict[int, _Memory]:
        return {
            start: _Memory(torch.randn(tracker.spec.tokens_per_frame, d), torch.randn(128), True),
            start + 7: _Memory(torch.randn(tracker.spec.tokens_per_frame, d), torch.randn(128), False),
        }

    memories = {0: memory(0), 1: memory(8)}
    assert tracker._selection(memories[0], 8)[2] == tracker._selection(memories[1], 16)[2]
    with torch.no_grad():
        level = tracker.levels(batch["input"])
        frame = _Frame(batch, level, 0, 1, {0: True, 1: True}, {})
        selections = [tracker._selection(memories[0], 8), tracker._selection(memories[1], 16)]
        together = tracker._track(frame, [(0, 0, 0), (1, 1, 0)], selections, memories, True)
        alone = [
            tracker._track(frame, [entry], [selection], memories, True) for entry, selection in zip([(0, 0, 0), (1, 1, 0)], selections)
        ]
    for k, one in enumerate(alone):
        assert torch.allclose(together.conditioned[k], one.conditioned[0], atol=1e-5)
