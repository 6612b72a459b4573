"""Training checkpoints: safetensors tensors + JSON, written atomically, nothing pickled.

A run folder holds ``checkpoints/step-00000100/`` folders and a ``checkpoints/latest`` file naming the newest.
Each checkpoint folder has

* ``student.safetensors`` — the student's weights and buffers (BatchNorm statistics);
* ``optimizer.safetensors`` — every tensor of the optimizer state (``state.<param index>.<name>``) and the RNG
  states (``rng.cpu``, ``rng.cuda``);
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
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STUDENT_WEIGHTS = "student.safetensors"
OPTIMIZER_STATE = "optimizer.safetensors"
TRAINER_STATE = "trainer.json"
RUN_CONFIG = "config.json"


class CheckpointError(ValueError):
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
    run: Path, student: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainerState, config: dict[str, Any], keep: int,
) -> Path:
    """Write checkpoint ``step-<step>`` under ``run``, point ``latest`` at it, keep the newest ``keep``."""
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
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(tmp / OPTIMIZER_STATE))
    (tmp / TRAINER_STATE).write_text(json.dumps({**state.to_dict(), "param_groups": groups}, indent=2))
    (tmp / RUN_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    latest_tmp = root / f".{LATEST}.tmp"
    latest_tmp.write_text(name)
    os.replace(latest_tmp, root / LATEST)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(run: Path) -> Path | None:
    """The newest complete checkpoint of a run folder, or None if it has none."""
    pointer = run / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    target = run / CHECKPOINTS / pointer.read_text().strip()
    return target if (target / STUDENT_WEIGHTS).is_file() else None


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
        weights = load_file(str(checkpoint / STUDENT_WEIGHTS))
        student.load_state_dict(weights, strict=True)
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"{checkpoint}: {STUDENT_WEIGHTS} does not load into the student ({str(exc).splitlines()[0]})") from None


def load_checkpoint(checkpoint: Path, student: torch.nn.Module, optimizer: torch.optim.Optimizer) -> TrainerState:
    """Restore weights, optimizer and RNG states; returns where the run goes on."""
    load_student_weights(checkpoint, student)
    try:
        document = json.loads((checkpoint / TRAINER_STATE).read_text())
        tensors = load_file(str(checkpoint / OPTIMIZER_STATE))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{checkpoint}: unreadable trainer state ({exc})") from None
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": document["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return TrainerState(int(document["step"]), int(document["epoch"]), int(document["batches_in_epoch"]))
