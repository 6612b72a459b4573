"""Training checkpoints: safetensors tensors + JSON, written atomically, nothing pickled.

A run folder holds ``checkpoints/step-00000100/`` folders and a ``checkpoints/latest`` file naming the newest.
Each checkpoint folder has

* ``student.safetensors`` — the student's weights and buffers (BatchNorm statistics);
* ``optimizer.safetensors`` — every tensor of the optimizer state (``state.<param index>.<name>``) (no RNG state:
  the trainer reseeds every micro-batch from (seed, step, rank), so a resumed run draws what an uninterrupted one does);
* ``trainer.json`` — step, epoch, batches taken in that epoch, the optimizer's param groups;
* ``config.json`` — the resolved config, the student spec, the store and version it read, library versions.

A checkpoint is written to a hidden temporary folder and renamed into place, then ``latest`` is replaced: a run
killed mid-write leaves the previous checkpoint as the newest.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from esam3.schemas.errors import first_line
from esam3.schemas.train import TrainingInputError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STUDENT_WEIGHTS = "student.safetensors"
OPTIMIZER_STATE = "optimizer.safetensors"
TRAINER_STATE = "trainer.json"
RUN_CONFIG = "config.json"


class CheckpointError(TrainingInputError):
    """A checkpoint folder that is missing or cannot be read back."""


@dataclass
class TrainerState:
    step: int  # optimizer steps taken
    epoch: int  # the epoch the next batch belongs to
    batches_in_epoch: int  # batches of that epoch already taken

    def to_dict(self) -> dict[str, int]:
        return {"step": self.step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}


def _state_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous() if torch.is_tensor(value) else torch.tensor(value)
    return tensors, state["param_groups"]


def save_checkpoint(
    run: Path,
    student: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainerState,
    config: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint ``step-<step>`` under ``run``, point ``latest`` at it, keep the newest ``keep``.

    Folders of later steps (left by a run that crashed after writing them, before ``latest`` moved on) are
    removed: this run's history is the one that counts."""
    root = run / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state.step:08d}"
    target = root / name
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
    save_file(weights, str(tmp / STUDENT_WEIGHTS))
    tensors, groups = _state_tensors(optimizer)
    save_file(tensors, str(tmp / OPTIMIZER_STATE))
    (tmp / TRAINER_STATE).write_text(json.dumps({**state.to_dict(), "param_groups": groups}, indent=2))
    (tmp / RUN_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    for path in tmp.iterdir():
        _fsync(path)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    latest_tmp = root / f".{LATEST}.tmp"
    latest_tmp.write_text(name)
    _fsync(latest_tmp)
    os.replace(latest_tmp, root / LATEST)
    _fsync(root)
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in [p for p in steps if p.name > name] + [p for p in steps if p.name <= name][:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to the disk, so a rename never points at data still in flight."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def latest_checkpoint(run: Path) -> Path | None:
    """The newest checkpoint of a run folder, or None if it has none (a ``latest`` naming a missing one is an error)."""
    pointer = run / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    target = run / CHECKPOINTS / pointer.read_text().strip()
    if not (target / STUDENT_WEIGHTS).is_file():
        raise CheckpointError(
            f"{pointer} names {target.name}, which is missing or incomplete; restore it, or point {LATEST} at an older step folder"
        )
    return target


def checkpoint_dir(path: Path) -> Path:
    """A checkpoint folder given as itself or as its run folder (its newest checkpoint)."""
    if (path / STUDENT_WEIGHTS).is_file():
        return path
    newest = latest_checkpoint(path)
    if newest is None:
        raise CheckpointError(f"{path}: not a checkpoint (no {STUDENT_WEIGHTS}) nor a run folder with one (no {CHECKPOINTS}/{LATEST})")
    return newest


def read_config(checkpoint: Path) -> dict[str, Any]:
    try:
        return json.loads((checkpoint / RUN_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{checkpoint}: unreadable {RUN_CONFIG} ({exc})") from None


def load_student_weights(checkpoint: Path, student: torch.nn.Module) -> None:
    try:
        student.load_state_dict(load_file(str(checkpoint / STUDENT_WEIGHTS)), strict=True)
    except (OSError, RuntimeError, SafetensorError) as exc:
        raise CheckpointError(f"{checkpoint}: {STUDENT_WEIGHTS} does not load into the student ({first_line(exc)})") from None


def load_checkpoint(checkpoint: Path, student: torch.nn.Module, optimizer: torch.optim.Optimizer) -> TrainerState:
    """Restore weights and optimizer state; returns where the run goes on."""
    load_student_weights(checkpoint, student)
    try:
        document = json.loads((checkpoint / TRAINER_STATE).read_text())
        tensors = load_file(str(checkpoint / OPTIMIZER_STATE))
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": document["param_groups"]})
        return TrainerState(int(document["step"]), int(document["epoch"]), int(document["batches_in_epoch"]))
    except (OSError, json.JSONDecodeError, SafetensorError, KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{checkpoint}: unreadable trainer state ({first_line(exc)}); resume from an older step folder") from None
