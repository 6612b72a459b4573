"""Stage 2: memory distillation on clips of the store's SA-V frames, from a stage-1 student.

The stage-1 encoder (frozen by default) feeds SAM3's frozen tracker neck, mask decoder and memory encoder (the
store's heads file); the trained part is the student memory (``esam3.train.memory``: a spatial Perceiver + a light
memory attention). Clips come from ``esam3.train.clips`` (with the teacher's memory of the frames before each clip);
``esam3.train.tracker`` runs the clip with teacher forcing that fades on the ``--forcing-*`` schedule;
``esam3.train.video_losses`` scores it against the cached ``pix_feat_with_mem``, masks and object scores, and the
ground truth. The loop is stage 1's (``esam3.train.loop``): resume, checkpoints, TensorBoard, progress, Ray Train.

A checkpoint's weights are ``encoder.*`` (the stage-1 student, as trained or not) and ``memory.*``; its config.json
holds the student spec, the memory spec and the stage-1 checkpoint it started from. No teacher trunk or teacher
memory attention is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from esam3.pipeline.object_store import S3Settings
from esam3.pipeline.store import Store
from esam3.schemas.store import StoreError
from esam3.schemas.train import Stage2Config
from esam3.train.checkpoint import checkpoint_dir, latest_checkpoint, load_student_weights, read_config
from esam3.train.clips import ClipDataset
from esam3.train.frozen_heads import load_store_heads
from esam3.train.loop import (
    LoopParts,
    StepReport,
    TrainError,
    TrainResult,
    library_versions,
    resume_point,
    run_loop,
    store_provenance,
    total_steps,
)
from esam3.train.memory import StudentMemory
from esam3.train.reader import StoreDataset
from esam3.train.sampler import ClipSampler

from esam3.train.students import Student, StudentSpec
from esam3.train.tracker import StudentTracker, memory_spec
from esam3.train.video_losses import VideoLossWeights, stage2_terms
from esam3.workers.teacher import resolve_device


def saved_parts(tracker: StudentTracker) -> nn.Module:
    """What a stage-2 checkpoint holds: ``encoder.*`` and ``memory.*`` (the frozen heads come from the store)."""
    return nn.ModuleDict({"encoder": tracker.encoder, "memory": tracker.memory})


def stage1_student(path: Path, store: Store) -> tuple[Student, dict[str, Any]]:
    """The stage-1 student of ``path`` (a run folder or a checkpoint), checked to imitate this store's teacher."""
    checkpoint = checkpoint_dir(path)
    document = read_config(checkpoint)
    if "student" not in document or "memory" in document:
        raise TrainError(f"--init {path}: not a stage-1 checkpoint (expected the run folder of esam3 train stage1)")
    teacher = store.require_card()["teacher"]
    trained_on = document.get("store", {})
    if trained_on.get("checksum") != teacher.get("checksum"):
        raise TrainError(
            f"--init {path}: its student imitates teacher {trained_on.get('teacher')} ({trained_on.get('checksum')}), but {store.uri} "
            f"was cached by {teacher.get('source')} ({teacher.get('checksum')}); train stage 1 on a store of the same teacher"
        )
    student = Student(StudentSpec.from_dict(document["student"]))
    load_student_weights(checkpoint, student)
    return student, {"checkpoint": str(checkpoint), "store": trained_on, "student": document["student"]}


@dataclass
class Stage2Setup:
    config: Stage2Config
    store: Store
    clips: ClipDataset
    tracker: StudentTracker
    device: torch.device
    resume_from: Path | None
    document: dict[str, Any]


def prepare_stage2(config: Stage2Config, world_size: int = 1, device: torch.device | None = None) -> Stage2Setup:
    """Check the run folder, the store and --init; open the pinned snapshot; build the tracker."""
    resume_from, version = resume_point(config)
    store = Store(config.store, S3Settings.from_environment(config.s3_endpoint))
    card = store.require_card()
    spec = card["targets"].get("sa-v")
    if spec is None or "memory" not in spec["targets"]:
        raise StoreError(f"store {store.uri} holds no SA-V memory targets; cache SA-V shards with --dataset sa-v (--targets trunk,memory)")
    device = device or resolve_device(config.device)
    if resume_from is None:
        student, init = stage1_student(config.init, store)
    else:  # the checkpoint holds the encoder: --init is not read again (it may have moved since)
        saved = read_config(resume_from)
        student, init = Student(StudentSpec.from_dict(saved["student"])), saved.get("init")
    heads = load_store_heads(store, device, memory_attention=False)  # the student's memory replaces SAM3's
    torch.manual_seed(config.seed)  # the same initial memory on every rank (DDP also broadcasts rank 0's)
    tracker = StudentTracker(student, heads, StudentMemory(memory_spec(heads.config, config)), train_encoder=config.train_encoder).to(
        device
    )
    geometry = card["teacher"]["geometry"]
    fields = ("input", "memory") + (("gt",) if config.gt_weight > 0 else ())
    frames = StoreDataset(
        store,
        "frames",
        version=version,
        split="train",
        val_percent=config.val_percent,
        fields=fields,
        decode_on="device" if device.type == "cuda" else "cpu",
        input_size=student.spec.image_size if student.spec.image_size != geometry["image_size"] else None,
    )
    clips = ClipDataset(frames, config.clip_length, tracker.spec.memory_frames, tracker.spec.max_pointers)
    document = {
        "config": config.document(),
        "student": student.spec.to_dict(),
        "memory": tracker.spec.to_dict(),
        "init": init,
        "world_size": world_size,
        "versions": library_versions(),
        "store": store_provenance(store, "frames", frames.version),
    }
    return Stage2Setup(config, store, clips, tracker, device, resume_from, document)


def run_stage2(
    config: Stage2Config,
    on_step: Callable[[StepReport], None] | None = None,
    rank: int = 0,
    world_size: int = 1,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
    device: torch.device | None = None,
    targets: Callable[[ClipDataset], Callable[[dict[str, Any]], dict[str, Any]]] | None = None,
) -> TrainResult:
    """Train (or resume) a stage-2 student memory; ``wrap`` makes the DDP model on Ray Train workers. Rank 0 writes.

    ``targets`` makes, from the run's clips, what replaces each batch's cached targets before the step
    (``esam3.train.fidelity.LiveVideoTargets``: the teacher tracking the clips' videos online)."""
    setup = prepare_stage2(config, world_size, device)
    tracker, clips = setup.tracker, setup.clips
    frames = clips.frames
    sampler = ClipSampler(
        frames.video_ids,
        frames.frames,
        config.clip_length,
        config.batch_size,
        stride=config.clip_stride,
        keep=clips.tracked,
        seed=config.seed,
        rank=rank,
        world_size=world_size,
        drop_last=True,
    )
    if sampler.steps_per_epoch < 1:
        raise TrainError(
            f"the train split of {setup.store.uri} has {len(sampler.clips)} clips of {config.clip_length} frames with an object to track, fewer than one step "
            f"of {config.batch_size} x {world_size} worker(s); lower --batch-size, --clip-length or --val-percent, or cache more videos"
        )
    total = total_steps(config, sampler.steps_per_epoch)
    weights = VideoLossWeights(config.feature_weight, config.cosine_weight, config.mask_weight, config.score_weight, config.gt_weight)

    def step(model: nn.Module, batch: dict[str, Any], generator: torch.Generator, index: int) -> tuple[dict[str, torch.Tensor], Any]:
        outputs = model(batch, config.clip_length, config.objects, config.forcing_at(index, total), generator)
        terms = stage2_terms(batch, outputs, weights, len(batch["key"]) // config.clip_length)
        # every trained parameter in the graph, also for a batch whose objects are all on their prompt frames (a
        # constant loss): backward works and DDP ranks reduce the same parameters
        terms["total"] = terms["total"] + 0.0 * sum(p.sum() for _, p in trained)
        return terms, outputs

    trained = [(f"memory.{n}", p) for n, p in tracker.memory.named_parameters()]
    if config.train_encoder:
        trained += [(f"encoder.{n}", p) for n, p in tracker.encoder.named_parameters()]
    parts = LoopParts(
        saved=saved_parts(tracker),
        model=wrap(tracker) if wrap is not None else tracker,
        dataset=clips,
        sampler=sampler,
        step=step,
        images=_log_clip,
        device=setup.device,
        document=setup.document,
        resume_from=setup.resume_from,
        trained=trained,
        no_decay=frozenset(f"memory.{n}" for n in tracker.memory.no_weight_decay()),
        targets=None if targets is None else targets(clips),
    )
    result = run_loop(config, parts, on_step, rank, world_size)
    return TrainResult(
        config.out,
        result.steps,
        latest_checkpoint(config.out),
        frames.version,
        len(frames),
        result.terms,
        result.samples_per_sec,
        result.data_wait,
        result.seconds,
    )


def _log_clip(writer: Any, step: int, batch: dict[str, Any], outputs: list[Any]) -> None:
    """One tracked object of the batch's first clip, frame by frame: the input, the teacher's mask, the student's."""
    import torch.nn.functional as F

    decoded = [(int(r), int(sl), p) for out in outputs for r, sl, c, p in zip(out.row, out.slot, out.clip, out.picked) if int(c) == 0]
    if not decoded:
        return
    slot = decoded[0][1]
    frames = sorted((r, p) for r, sl, p in decoded if sl == slot)
    with torch.no_grad():
        m = frames[0][1].shape[-1]
        rows = torch.tensor([r for r, _ in frames], device=batch["input"].device)
        images = F.interpolate(batch["input"][rows].float() / 255, size=(m, m), mode="bilinear").cpu()
        teacher = (batch["mask_logits"][rows, slot] > 0).float().cpu()[:, None].expand(-1, 3, -1, -1)
        student = (torch.stack([p for _, p in frames]).detach() > 0).float().cpu()[:, None].expand(-1, 3, -1, -1)
        writer.add_images("masks/frame_teacher_student", torch.cat([images, teacher, student], dim=-1), step)
