"""The training loop every stage runs (stage 1: encoder distillation; stage 2: memory distillation).

AdamW, linear warm-up then cosine to ``min_lr``, gradient clipping and accumulation, bf16 autocast on CUDA;
checkpoints every ``checkpoint_every`` steps and at the end (``esam3.train.checkpoint``); exact resume: the data order
comes from the sampler's (seed, epoch, rank) and every random draw of a micro-batch (drop path, prompt subsets,
objects, teacher forcing) from (seed, step, micro-batch, rank), so a resumed run takes the steps an uninterrupted one
does; TensorBoard scalars (and the stage's images on checkpoint steps); a callback per step for progress. Each Ray
Train rank runs it too (``rank`` / ``world_size``; rank 0 writes).

A stage supplies :class:`LoopParts`: what to save, the (DDP-wrapped) module, the dataset and its sampler, and its
step function (a batch -> its loss terms, ``total`` among them).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from esam3.schemas.train import RESUMABLE, TrainingInputError
from esam3.train.checkpoint import TrainerState, latest_checkpoint, load_checkpoint, read_config, save_checkpoint
from esam3.train.reader import make_loader
from esam3.train.sampler import EpochSampler

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


class LoopConfig(Protocol):
    """The fields of a trainer config the loop reads (``Stage1Config``, ``Stage2Config``)."""

    out: Path
    steps: int | None
    epochs: float | None
    accumulate: int
    min_lr: float
    warmup: float
    weight_decay: float
    clip: float
    seed: int
    loader_workers: int
    checkpoint_every: int
    keep_checkpoints: int
    log_every: int

    def peak_lr(self, world_size: int = 1) -> float: ...


@dataclass
class LoopParts:
    """What a stage hands the loop."""

    saved: nn.Module  # its state dict is the checkpoint's weights (and what a resume loads)
    model: nn.Module  # what the step calls: ``saved`` or parts of it, wrapped in DDP on Ray Train
    dataset: Any  # ``__getitem__(indices)`` -> batch, ``to_device(batch, device)``
    sampler: EpochSampler
    step: Callable[[nn.Module, dict[str, Any], torch.Generator, int], tuple[dict[str, torch.Tensor], Any]]
    device: torch.device
    document: dict[str, Any]  # config.json of every checkpoint
    resume_from: Path | None
    trained: list[tuple[str, nn.Parameter]]  # the parameters the optimizer moves (named, for weight decay)
    images: Callable[[Any, int, dict[str, Any], Any], None] | None = None  # TensorBoard images on checkpoint steps
    no_decay: frozenset[str] = frozenset()  # names (as in ``trained``) of matrices kept out of weight decay (learned latents)
    targets: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # replaces a batch's cached targets


@dataclass
class TrainResult:
    """What a training run did (``esam3 train stage1`` / ``stage2``)."""

    out: Path
    steps: int
    checkpoint: Path | None  # the newest checkpoint (None on ranks other than 0 when the run folder is not shared)
    store_version: int
    train_rows: int
    terms: dict[str, float] = field(default_factory=dict)  # the last step's loss terms
    samples_per_sec: float = 0.0
    data_wait: float = 0.0
    seconds: float = 0.0


@dataclass
class LoopResult:
    steps: int
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


def total_steps(config: LoopConfig, steps_per_epoch: int) -> int:
    if config.steps is not None:
        return config.steps
    return max(1, math.ceil((config.epochs or 1.0) * steps_per_epoch / config.accumulate))


def parameter_groups(
    named: list[tuple[str, nn.Parameter]], weight_decay: float, exempt: frozenset[str] = frozenset()
) -> list[dict[str, Any]]:
    """Weight decay on weights of convolutions and linear layers only, not on norms and biases (timm's rule), nor on
    the ``exempt`` names."""
    decay, no_decay = [], []
    for name, parameter in named:
        (no_decay if parameter.ndim <= 1 or name.endswith(".bias") or name in exempt else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _batches(loader: Any, sampler: EpochSampler, state: TrainerState) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """(epoch, batch index in epoch, batch) forever, from where ``state`` says, one epoch after the other."""
    epoch, start = state.epoch, state.batches_in_epoch
    while True:
        sampler.set_epoch(epoch, start)
        for offset, batch in enumerate(loader):
            yield epoch, start + offset, batch
        epoch, start = epoch + 1, 0


def run_loop(
    config: LoopConfig, parts: LoopParts, on_step: Callable[[StepReport], None] | None = None, rank: int = 0, world_size: int = 1
) -> LoopResult:
    """Train (or resume) ``parts`` as ``config`` says; see the module docstring."""
    device, dataset, sampler = parts.device, parts.dataset, parts.sampler
    peak = config.peak_lr(world_size)
    optimizer = torch.optim.AdamW(parameter_groups(parts.trained, config.weight_decay, parts.no_decay), lr=peak, betas=(0.9, 0.999))
    total = total_steps(config, sampler.steps_per_epoch)
    state = TrainerState(0, 0, 0)
    if parts.resume_from is not None:
        state = load_checkpoint(parts.resume_from, parts.saved, optimizer)
        log.info("resuming from %s (step %d of %d)", parts.resume_from, state.step, total)
    writer = _summary_writer(config.out) if rank == 0 else None
    terms: dict[str, float] = {}
    started = time.perf_counter()
    window = {"t": started, "wait": 0.0, "samples": 0}
    rate, wait_share, first_step = 0.0, 0.0, True
    loader = make_loader(dataset, sampler, workers=config.loader_workers)
    batches = _batches(loader, sampler, state)
    trained = [p for _, p in parts.trained]
    parts.model.train()
    try:
        while state.step < total:
            lr = lr_at(state.step, total, peak, min(config.min_lr, peak), config.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            sums: dict[str, float] = {}
            checkpointing = (state.step + 1) % config.checkpoint_every == 0 or state.step + 1 == total
            last: tuple[dict[str, Any], Any] | None = None  # kept on checkpoint steps only (its images)
            for micro in range(config.accumulate):
                waited = time.perf_counter()
                epoch, index, batch = next(batches)
                window["wait"] += time.perf_counter() - waited
                batch = dataset.to_device(batch, device)
                if parts.targets is not None:
                    batch = parts.targets(batch)
                # every draw comes from (seed, step, micro-batch, rank): a resumed run draws what an uninterrupted one
                # does, and ranks draw differently
                draw = config.seed * 1_000_003 + (state.step * config.accumulate + micro) * world_size + rank
                torch.manual_seed(draw)
                generator = torch.Generator().manual_seed(draw)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    step_terms, extra = parts.step(parts.model, batch, generator, state.step)
                (step_terms["total"] / config.accumulate).backward()
                for name, value in step_terms.items():
                    sums[name] = sums.get(name, 0.0) + float(value.detach()) / config.accumulate
                state.epoch, state.batches_in_epoch = epoch, index + 1
                window["samples"] += len(batch["key"]) * world_size
                last = (batch, extra) if checkpointing and rank == 0 else None
            norm = torch.nn.utils.clip_grad_norm_(trained, config.clip if config.clip > 0 else float("inf"))
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
                    save_checkpoint(config.out, parts.saved, optimizer, state, parts.document, config.keep_checkpoints)
                    if writer is not None and last is not None and last[1] is not None and parts.images is not None:
                        parts.images(writer, state.step, *last)
            if on_step is not None and rank == 0:
                on_step(StepReport(state.step, total, terms, lr, float(norm), rate, wait_share))
    finally:
        if writer is not None:
            writer.close()
        del batches, loader
    return LoopResult(state.step, terms, rate, wait_share, time.perf_counter() - started)


def resume_point(config: Any) -> tuple[Path | None, int | str | None]:
    """The checkpoint to resume from (None: a new run) and the store snapshot to read; refuses a run folder that holds
    a run unless ``--resume``, and a resume whose settings differ from the run's (but for those in ``RESUMABLE``)."""
    resume_from = latest_checkpoint(config.out)
    if resume_from is None:
        return None, config.snapshot
    if not config.resume:
        raise TrainError(f"{config.out} holds a run (checkpoint {resume_from.name}); pass --resume to continue it, or choose another --out")
    saved = read_config(resume_from)
    changed = sorted(k for k, v in config.document().items() if k not in RESUMABLE and saved["config"].get(k) != v)
    if changed:
        raise TrainError(
            f"--resume: {', '.join('--' + k.replace('_', '-') for k in changed)} differ from the run in {config.out} "
            "(only --steps/--epochs, --device, --loader-workers and logging may change); use another --out for a new run"
        )
    return resume_from, saved["store"]["version"]  # the snapshot the run started on, even if newer ones exist now


def store_provenance(store: Any, table: str, version: int) -> dict[str, Any]:
    """What a checkpoint records of the store it was trained from."""
    card = store.require_card()
    teacher = card["teacher"]
    return {
        "uri": store.uri,
        "table": table,
        "version": version,
        "teacher": teacher.get("source"),
        "checksum": teacher.get("checksum"),
        "geometry": teacher["geometry"],
        "teacher_parameters": teacher.get("parameters"),
    }


def library_versions() -> dict[str, str]:
    import lance
    import timm
    import transformers

    from esam3 import __version__

    return {
        "esam3": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "transformers": transformers.__version__,
        "lance": lance.__version__,
    }


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
