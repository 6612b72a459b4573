"""Training on Ray Train: ``--workers N`` DDP ranks on the Ray the cache uses (a local one, or ``--address``).

Each rank runs the same loop (``run_stage1`` or ``run_stage2``) on its own disjoint share of every epoch's rows or
clips (the sampler with its rank and the world size) and its own DataLoader; gradients are averaged by DDP, and
BatchNorm statistics are those of the whole global batch (:class:`GlobalBatchNorm2d`), so N workers with batch
B / N take the same steps as one worker with batch B (stage 2: where its random draws, the objects of a clip
with more than ``--objects`` and the teacher-forcing draws, do not come in: each rank draws its own). Rank 0 writes the checkpoints and TensorBoard, and streams
its progress to the driver through a Ray queue. ``--out`` must be a folder every rank can read (one machine, or a
shared filesystem on a cluster): a resumed run loads its checkpoint on every rank.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from esam3.schemas.train import Stage1Config, Stage2Config, TrainerConfig
from esam3.train.loop import StepReport, TrainResult
from esam3.train.stage1 import TrainError, prepare, run_stage1

log = logging.getLogger("esam3.train")


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are the whole batch's across DDP ranks, on any device and backend
    (torch's SyncBatchNorm needs a GPU; this works on gloo too). Same parameters and buffers as BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce  # differentiable: gradients see the global statistics

        shape, dtype = (1, -1, 1, 1), x.dtype
        x = x.float()  # statistics in float32 also under bf16 autocast (as torch's own batch norm computes them)
        count = all_reduce(x.new_tensor([x.numel() / x.shape[1]]))
        mean = all_reduce(x.sum(dim=(0, 2, 3))) / count
        var = all_reduce((x - mean.view(shape)).square().sum(dim=(0, 2, 3))) / count
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.lerp_(mean.detach(), momentum)
            self.running_var.lerp_(var.detach() * count / (count - 1).clamp(min=1), momentum)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return (y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y).to(dtype)


def global_batchnorm(module: nn.Module) -> nn.Module:
    """Make every BatchNorm2d of ``module`` a :class:`GlobalBatchNorm2d` in place (same tensors, same state dict)."""
    for child in module.modules():
        if type(child) is nn.BatchNorm2d:
            child.__class__ = GlobalBatchNorm2d
    return module


def _ddp(model: nn.Module, find_unused: bool = False) -> nn.Module:
    """DDP on the Ray Train worker; ``find_unused`` for stage 2, where a step may leave parameters out of the graph
    (no pointer yet on a clip's second frame, no window latents' use when every object is on its prompt frame)."""
    from ray.train.torch import prepare_model

    return prepare_model(global_batchnorm(model), parallel_strategy="ddp", parallel_strategy_kwargs={"find_unused_parameters": find_unused})


def _stages() -> dict[str, tuple[type[TrainerConfig], Callable[..., TrainResult], Callable[..., Any]]]:
    """Each stage's config class, its loop, and the check that runs before Ray starts."""
    from esam3.train.stage2 import prepare_stage2, run_stage2

    return {"stage1": (Stage1Config, run_stage1, prepare), "stage2": (Stage2Config, run_stage2, prepare_stage2)}


def stage_of(config: TrainerConfig) -> str:
    return "stage2" if isinstance(config, Stage2Config) else "stage1"


def _worker(loop: dict[str, Any]) -> None:
    """What each Ray Train worker runs."""
    import ray.train
    from ray.train.torch import get_device

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(loop["threads"])))
    queue = loop["queue"]

    def report(step: StepReport) -> None:
        queue.put({"step": asdict(step)})

    model, run, _ = _stages()[loop["stage"]]
    config = model.model_validate(loop["config"])
    wrap = functools.partial(_ddp, find_unused=loop["stage"] == "stage2")
    result = run(config, on_step=report if rank == 0 else None, rank=rank, world_size=world, wrap=wrap, device=get_device())
    if rank == 0:
        queue.put(
            {"result": {**asdict(result), "out": str(result.out), "checkpoint": str(result.checkpoint) if result.checkpoint else None}}
        )


def train_on_ray(config: TrainerConfig, on_step: Callable[[StepReport], None] | None = None) -> TrainResult:
    """Run a stage on ``config.workers`` Ray Train workers (GPU each when CUDA is there, else CPU)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from esam3.pipeline.ray_plan import ray_session

    stage = stage_of(config)
    _stages()[stage][2](config, config.workers, torch.device("cpu"))  # the run folder, the store and the split, checked here first
    with ray_session(config.address):
        resources = ray.cluster_resources()
        gpus, cpus_total = resources.get("GPU", 0), resources.get("CPU", 1)
        use_gpu = config.device.value == "cuda" or (config.device.value == "auto" and gpus > 0)
        if use_gpu and gpus < config.workers:
            raise TrainError(
                f"--workers {config.workers} with GPUs: the Ray cluster has {gpus:g} GPU(s); use --workers {int(gpus)} or --device cpu"
            )
        share = cpus_total // config.workers
        if share < 1:
            raise TrainError(f"--workers {config.workers}: the Ray cluster has {cpus_total:g} CPU(s), fewer than one per worker")
        cpus = min(share, config.loader_workers + 1.0) if use_gpu else share
        queue = Queue(maxsize=100_000)
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"config": config.document(), "stage": stage, "queue": queue, "threads": cpus},
            scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus}),
            run_config=RunConfig(name=stage, storage_path=str((config.out / "ray").resolve())),
        )
        done, final = threading.Event(), {}
        relay = threading.Thread(target=_relay, args=(queue, on_step, done, final), daemon=True)
        relay.start()
        try:
            trainer.fit()
        except Exception as exc:  # Ray Train wraps a worker's error (TrainingFailedError and friends): one line here
            raise TrainError(f"{stage} on Ray Train failed: {_worker_error(exc)} (worker logs under {config.out / 'ray'})") from None
        finally:
            done.set()
            relay.join()
    if "result" not in final:
        raise TrainError("the Ray Train run ended without rank 0's result; see the Ray logs (ray/ under --out)")
    result = final["result"]
    return TrainResult(**{**result, "out": Path(result["out"]), "checkpoint": Path(result["checkpoint"]) if result["checkpoint"] else None})


def _worker_error(exc: BaseException) -> str:
    """The innermost error a Ray Train failure carries, as one line."""
    from esam3.schemas.errors import first_line

    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if "Error:" in line and not line.startswith(("File ", "Traceback"))]
    return errors[-1] if errors else first_line(exc)


def _relay(queue: Any, on_step: Callable[[StepReport], None] | None, done: threading.Event, final: dict[str, Any]) -> None:
    """Rank 0's messages, from the Ray queue to the driver: step reports to the progress callback, then its result."""
    from ray.util.queue import Empty

    while True:
        try:
            message = queue.get(timeout=0.2)
        except Empty:
            if done.is_set():
                return
            continue
        if "result" in message:
            final["result"] = message["result"]
        elif on_step is not None:
            on_step(StepReport(**message["step"]))


def train(config: TrainerConfig, on_step: Callable[[StepReport], None] | None = None) -> TrainResult:
    """``esam3 train stage1`` / ``stage2``: in this process, or on Ray Train with ``--workers`` > 1 or an ``--address``."""
    if config.workers == 1 and config.address is None:
        return _stages()[stage_of(config)][1](config, on_step)
    return train_on_ray(config, on_step)
