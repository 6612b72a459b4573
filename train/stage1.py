"""Stage 1: encoder distillation with prompt-in-the-loop, from a store alone.

The student (``esam3.train.students``) sees each row's input (the teacher's own input, decoded from the stored
JPEG) and learns the cached trunk; its trunk also goes through the store's frozen heads with the cached prompts
(``esam3.train.losses``). No teacher trunk or text encoder is ever loaded: the store and its heads file are all
this reads.

The loop: AdamW, linear warm-up then cosine to ``min_lr``, gradient clipping and accumulation, bf16 autocast on
CUDA, seeded; checkpoints every ``checkpoint_every`` steps and at the end (``esam3.train.checkpoint``), exact
resume (same data order, optimizer, random draws); TensorBoard scalars and mask images; a callback per step for progress.
``run_stage1`` is what each Ray Train worker runs too (``rank`` / ``world_size``; rank 0 writes).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from esam3.pipeline.object_store import S3Settings
from esam3.pipeline.store import Store
from esam3.schemas.store import StoreError
from esam3.schemas.train import RESUMABLE, Stage1Config, TrainingInputError
from esam3.train.checkpoint import TrainerState, latest_checkpoint, load_checkpoint, read_config, save_checkpoint
from esam3.train.frozen_heads import load_store_heads
from esam3.train.losses import LossWeights, PromptOutputs, stage1_terms, teacher_outputs
from esam3.train.reader import StoreDataset, make_loader
from esam3.train.sampler import EpochSampler
from esam3.train.students import Student, StudentSpec
from esam3.workers.teacher import resolve_device

log = logging.getLogger("esam3.train")


class TrainError(TrainingInputError):
    """A training run that cannot start as asked (the message names the fix)."""


@dataclass
class StepReport:
    """What the progress callback gets after each optimizer step (rank 0)."""

    step: int
    total: int
    terms: dict[str, float]
    lr: float
    grad_norm: float
    samples_per_sec: float
    data_wait: float  # share of the wall time spent waiting for the loader since the last report


@dataclass
class Stage1Result:
    out: Path
    steps: int
    checkpoint: Path | None  # the newest checkpoint (None on ranks other than 0 when the run folder is not shared)
    store_version: int
    train_rows: int
    terms: dict[str, float] = field(default_factory=dict)  # the last step's loss terms
    samples_per_sec: float = 0.0
    data_wait: float = 0.0
    seconds: float = 0.0


def lr_at(step: int, total: int, peak: float, floor: float, warmup: float) -> float:
    """Linear warm-up over ``warmup`` of the steps, then cosine from ``peak`` to ``floor`` (``step`` counts from 0)."""
    warm = int(warmup * total)
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm - 1)  # the last step is at the floor
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def library_versions() -> dict[str, str]:
    import lance
    import timm
    import transformers

    from esam3 import __version__

    return {"esam3": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "transformers": transformers.__version__, "lance": lance.__version__}


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
    resume_from = latest_checkpoint(config.out)
    version: int | str | None = config.snapshot
    if resume_from is not None and not config.resume:
        raise TrainError(f"{config.out} holds a run (checkpoint {resume_from.name}); pass --resume to continue it, or choose another --out")
    if resume_from is not None:
        saved = read_config(resume_from)
        changed = sorted(k for k, v in config.document().items() if k not in RESUMABLE and saved["config"].get(k) != v)
        if changed:
            raise TrainError(
                f"--resume: {', '.join('--' + k.replace('_', '-') for k in changed)} differ from the run in {config.out} "
                "(only --steps/--epochs, --device, --loader-workers and logging may change); use another --out for a new run"
            )
        version = saved["store"]["version"]  # the snapshot the run started on, even if newer ones exist now
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
        store, "images", version=version, split="train", val_percent=config.val_percent, fields=fields,
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
        "config": config.document(), "student": spec.to_dict(), "world_size": world_size, "versions": library_versions(),
        "store": {"uri": store.uri, "table": "images", "version": dataset.version, "teacher": card["teacher"].get("source"),
                  "checksum": card["teacher"].get("checksum"), "geometry": geometry, "teacher_parameters": card["teacher"].get("parameters")},
    }
    return Stage1Setup(config, store, dataset, spec, student, heads, weights, device, resume_from, document)


def total_steps(config: Stage1Config, steps_per_epoch: int) -> int:
    if config.steps is not None:
        return config.steps
    return max(1, math.ceil((config.epochs or 1.0) * steps_per_epoch / config.accumulate))


def _parameter_groups(student: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weights of convolutions and linear layers only, not on norms and biases (timm's rule)."""
    decay, no_decay = [], []
    for name, parameter in student.named_parameters():
        (no_decay if parameter.ndim <= 1 or name.endswith(".bias") else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _batches(loader: Any, sampler: EpochSampler, state: TrainerState) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """(epoch, batch index in epoch, batch) forever, from where ``state`` says, one epoch after the other."""
    epoch, start = state.epoch, state.batches_in_epoch
    while True:
        sampler.set_epoch(epoch, start)
        for offset, batch in enumerate(loader):
            yield epoch, start + offset, batch
        epoch, start = epoch + 1, 0


def run_stage1(
    config: Stage1Config, on_step: Callable[[StepReport], None] | None = None, rank: int = 0, world_size: int = 1,
    wrap: Callable[[nn.Module], nn.Module] | None = None, device: torch.device | None = None,
    targets: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> Stage1Result:
    """Train (or resume) a stage-1 student; ``wrap`` makes the DDP model on Ray Train workers. Rank 0 writes.

    ``targets`` replaces each batch's cached targets before the step (``esam3.train.fidelity.LiveTargets``: the
    teacher computing them online, as training without a cache does)."""
    setup = prepare(config, world_size, device)
    student, device, dataset = setup.student, setup.device, setup.dataset
    model = wrap(student) if wrap is not None else student
    optimizer = torch.optim.AdamW(_parameter_groups(student, config.weight_decay), lr=config.peak_lr(world_size), betas=(0.9, 0.999))
    sampler = EpochSampler(len(dataset), config.batch_size, seed=config.seed, rank=rank, world_size=world_size, drop_last=True)
    total = total_steps(config, sampler.steps_per_epoch)
    state = TrainerState(0, 0, 0)
    if setup.resume_from is not None:
        state = load_checkpoint(setup.resume_from, student, optimizer)
        log.info("resuming from %s (step %d of %d)", setup.resume_from, state.step, total)
    writer = _summary_writer(config.out) if rank == 0 else None
    peak = config.peak_lr(world_size)
    terms: dict[str, float] = {}
    started = time.perf_counter()
    window = {"t": started, "wait": 0.0, "samples": 0}
    rate, wait_share, first_step = 0.0, 0.0, True
    loader = make_loader(dataset, sampler, workers=config.loader_workers)
    batches = _batches(loader, sampler, state)
    model.train()
    try:
        while state.step < total:
            lr = lr_at(state.step, total, peak, min(config.min_lr, peak), config.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            sums: dict[str, float] = {}
            checkpointing = (state.step + 1) % config.checkpoint_every == 0 or state.step + 1 == total
            last: tuple[dict[str, Any], PromptOutputs | None] | None = None  # kept on checkpoint steps only (its images)
            for micro in range(config.accumulate):
                waited = time.perf_counter()
                epoch, index, batch = next(batches)
                window["wait"] += time.perf_counter() - waited
                batch = dataset.to_device(batch, device)
                if targets is not None:
                    batch = targets(batch)
                # every draw (drop path, prompt subsets) comes from (seed, step, micro-batch, rank): a resumed run
                # draws what an uninterrupted one does, and ranks draw differently
                draw = config.seed * 1_000_003 + (state.step * config.accumulate + micro) * world_size + rank
                torch.manual_seed(draw)
                generator = torch.Generator().manual_seed(draw)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    step_terms, outputs = stage1_terms(setup.heads, model(batch["input"]), batch, setup.weights, config.max_prompts, generator)
                (step_terms["total"] / config.accumulate).backward()
                for name, value in step_terms.items():
                    sums[name] = sums.get(name, 0.0) + float(value.detach()) / config.accumulate
                state.epoch, state.batches_in_epoch = epoch, index + 1
                window["samples"] += len(batch["key"]) * world_size
                last = (batch, outputs) if checkpointing and rank == 0 else None
            norm = torch.nn.utils.clip_grad_norm_(student.parameters(), config.clip if config.clip > 0 else float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            terms = sums
            now = time.perf_counter()
            if first_step:  # the first step pays for start-up (workers, allocations): no rate from it
                window.update(t=now, wait=0.0, samples=0)
                first_step = False
            if state.step % config.log_every == 0 or state.step == total:
                elapsed = now - window["t"]
                if window["samples"]:
                    rate, wait_share = window["samples"] / elapsed, window["wait"] / elapsed
                if writer is not None:
                    _log_scalars(writer, state.step, terms, lr, float(norm), rate, wait_share)
                window.update(t=now, wait=0.0, samples=0)
            if state.step % config.checkpoint_every == 0 or state.step == total:
                if rank == 0:
                    save_checkpoint(config.out, student, optimizer, state, setup.document, config.keep_checkpoints)
                    if writer is not None and last is not None and last[1] is not None:
                        _log_masks(writer, state.step, *last)
            if on_step is not None and rank == 0:
                on_step(StepReport(state.step, total, terms, lr, float(norm), rate, wait_share))
    finally:
        if writer is not None:
            writer.close()
        del batches, loader
    return Stage1Result(config.out, state.step, latest_checkpoint(config.out), dataset.version, len(dataset), terms, rate, wait_share,
                        time.perf_counter() - started)


def _summary_writer(out: Path) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    out.mkdir(parents=True, exist_ok=True)
    return SummaryWriter(str(out / "tensorboard"))


def _log_scalars(writer: Any, step: int, terms: dict[str, float], lr: float, norm: float, rate: float, wait: float) -> None:
    for name, value in terms.items():
        writer.add_scalar(f"loss/{name}", value, step)
    writer.add_scalar("train/lr", lr, step)
    writer.add_scalar("train/grad_norm", norm, step)
    writer.add_scalar("train/samples_per_sec", rate, step)
    writer.add_scalar("train/data_wait_share", wait, step)


def _log_masks(writer: Any, step: int, batch: dict[str, Any], outputs: PromptOutputs, count: int = 4) -> None:
    """Up to ``count`` prompts: the input, the teacher's mask and the student's (the output the teacher uses), side by side."""
    import torch.nn.functional as F

    if len(outputs.image) == 0:
        return
    with torch.no_grad():
        teacher, _ = teacher_outputs(batch, outputs)
        m = teacher.shape[-1]
        images = F.interpolate(batch["input"][outputs.image[:count]].float() / 255, size=(m, m), mode="bilinear")
        masks = [(x[:count] > 0).float()[:, None].expand(-1, 3, -1, -1) for x in (teacher, outputs.chosen.detach())]
        writer.add_images("masks/input_teacher_student", torch.cat([images.cpu(), masks[0].cpu(), masks[1].cpu()], dim=-1), step)
