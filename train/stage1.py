"""Stage 1: encoder distillation with prompt-in-the-loop, from a store alone.

The student (``esam3.train.students``) sees each row's input (the teacher's own input, decoded from the stored
JPEG) and learns the cached trunk; its trunk also goes through the store's frozen heads with the cached prompts
(``esam3.train.losses``). No teacher trunk or text encoder is ever loaded: the store and its heads file are all
this reads.

The loop is ``esam3.train.loop`` (AdamW, warm-up + cosine, clipping, accumulation, bf16 autocast on CUDA,
checkpoints, exact resume, TensorBoard, progress); this module adds the student, its batches and its loss terms, and
TensorBoard mask images. ``run_stage1`` is what each Ray Train worker runs too (``rank`` / ``world_size``; rank 0 writes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from esam3.pipeline.object_store import S3Settings
from esam3.pipeline.store import Store
from esam3.schemas.store import StoreError
from esam3.schemas.train import Stage1Config
from esam3.train.checkpoint import latest_checkpoint
from esam3.train.frozen_heads import load_store_heads
from esam3.train.losses import LossWeights, PromptOutputs, stage1_terms, teacher_outputs
from esam3.train.loop import LoopParts, StepReport, TrainError, TrainResult, library_versions, resume_point, run_loop, store_provenance
from esam3.train.reader import StoreDataset
from esam3.train.sampler import EpochSampler
from esam3.train.students import Student, StudentSpec
from esam3.workers.teacher import resolve_device

log = logging.getLogger("esam3.train")


@dataclass
class Stage1Setup:
    """Everything a stage-1 loop needs, built the same way on every rank."""

    config: Stage1Config
    store: Store
    dataset: StoreDataset
    spec: StudentSpec
    student: Student
    heads: nn.Module | None
    weights: LossWeights
    device: torch.device
    resume_from: Path | None
    document: dict[str, Any]  # config.json of every checkpoint


def prepare(config: Stage1Config, world_size: int = 1, device: torch.device | None = None) -> Stage1Setup:
    """Check the run folder and the store, open the pinned snapshot, build the student and the frozen heads."""
    resume_from, version = resume_point(config)
    store = Store(config.store, S3Settings.from_environment(config.s3_endpoint))
    card = store.require_card()
    weights = LossWeights(config.feature_weight, config.cosine_weight, config.prompt_weight, config.iou_weight, config.gt_weight)
    spec_targets = (card["targets"].get("sa-1b") or {}).get("targets", [])
    if weights.needs_prompts and spec_targets and "prompts" not in spec_targets:
        raise StoreError(
            f"store {store.uri} was cached without prompt targets: re-cache with --targets trunk,prompts, or train on features "
            "only with --prompt-weight 0 --iou-weight 0 --gt-weight 0"
        )
    fields = ("input", "trunk") + (("prompts",) if weights.needs_prompts else ()) + (("gt",) if weights.gt > 0 else ())
    device = device or resolve_device(config.device)
    geometry = card["teacher"]["geometry"]
    spec = StudentSpec(config.student, geometry["trunk_width"], geometry["grid"], config.image_size or geometry["image_size"])
    dataset = StoreDataset(
        store,
        "images",
        version=version,
        split="train",
        val_percent=config.val_percent,
        fields=fields,
        decode_on="device" if device.type == "cuda" else "cpu",
        input_size=spec.image_size if spec.image_size != geometry["image_size"] else None,
    )
    needed = config.batch_size * world_size
    if len(dataset) < needed:
        raise TrainError(
            f"the train split of {store.uri} has {len(dataset)} rows, fewer than one step of {config.batch_size} x {world_size} "
            "worker(s); lower --batch-size or --val-percent, or cache more shards"
        )
    torch.manual_seed(config.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    student = Student(spec, init=None if resume_from is not None else config.init).to(device)  # a resume loads its weights
    heads = load_store_heads(store, device) if weights.needs_prompts else None
    document = {
        "config": config.document(),
        "student": spec.to_dict(),
        "world_size": world_size,
        "versions": library_versions(),
        "store": store_provenance(store, "images", dataset.version),
    }
    return Stage1Setup(config, store, dataset, spec, student, heads, weights, device, resume_from, document)


def run_stage1(
    config: Stage1Config,
    on_step: Callable[[StepReport], None] | None = None,
    rank: int = 0,
    world_size: int = 1,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
    device: torch.device | None = None,
    targets: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> TrainResult:
    """Train (or resume) a stage-1 student; ``wrap`` makes the DDP model on Ray Train workers. Rank 0 writes.

    ``targets`` replaces each batch's cached targets before the step (``esam3.train.fidelity.LiveTargets``: the
    teacher computing them online, as training without a cache does)."""
    setup = prepare(config, world_size, device)
    student, dataset = setup.student, setup.dataset

    def step(model: nn.Module, batch: dict[str, Any], generator: torch.Generator, _: int) -> tuple[dict[str, torch.Tensor], Any]:
        return stage1_terms(setup.heads, model(batch["input"]), batch, setup.weights, config.max_prompts, generator)

    parts = LoopParts(
        saved=student,
        model=wrap(student) if wrap is not None else student,
        dataset=dataset,
        sampler=EpochSampler(len(dataset), config.batch_size, seed=config.seed, rank=rank, world_size=world_size, drop_last=True),
        step=step,
        device=setup.device,
        document=setup.document,
        resume_from=setup.resume_from,
        trained=list(student.named_parameters()),
        images=_log_masks,
        targets=targets,
    )
    result = run_loop(config, parts, on_step, rank, world_size)
    return TrainResult(
        config.out,
        result.steps,
        latest_checkpoint(config.out),
        dataset.version,
        len(dataset),
        result.terms,
        result.samples_per_sec,
        result.data_wait,
        result.seconds,
    )


def _log_masks(writer: Any, step: int, batch: dict[str, Any], outputs: PromptOutputs | None, count: int = 4) -> None:
    """Up to ``count`` prompts: the input, the teacher's mask and the student's (the output the teacher uses), side by side."""
    import torch.nn.functional as F

    if outputs is None or len(outputs.image) == 0:
        return
    with torch.no_grad():
        teacher, _ = teacher_outputs(batch, outputs)
        m = teacher.shape[-1]
        images = F.interpolate(batch["input"][outputs.image[:count]].float() / 255, size=(m, m), mode="bilinear")
        masks = [(x[:count] > 0).float()[:, None].expand(-1, 3, -1, -1) for x in (teacher, outputs.chosen.detach())]
        writer.add_images("masks/input_teacher_student", torch.cat([images.cpu(), masks[0].cpu(), masks[1].cpu()], dim=-1), step)
