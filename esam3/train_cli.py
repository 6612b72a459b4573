"""``esam3 train stage1``: distil a student from a store alone (flags > --config file > defaults)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from rich.text import Text

from esam3.console import UsageError, build_config, console, print_json, progress, user_errors
from esam3.schemas.train import Device, Stage1Config, read_config_file

train_app = typer.Typer(help="Train students from a store (no teacher trunk is loaded).", no_args_is_help=True)


def _help(name: str, text: str | None = None) -> str:
    """A flag's help: the config field's description and its default (one source of truth: Stage1Config)."""
    info = Stage1Config.model_fields[name]
    default = info.default.value if hasattr(info.default, "value") else info.default
    shown = "" if info.is_required() or default is None else f" (default: {default})"
    return f"{text or (info.description or '').capitalize()}.{shown}"


def _merge(config_file: Path | None, flags: dict[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(read_config_file(config_file))
    values.update({k: v for k, v in flags.items() if v is not None})
    for required in ("store", "out"):
        if required not in values:
            raise UsageError(f"--{required} is required (on the command line or in --config)")
    return values


@train_app.command("stage1")
def stage1_command(
    store: str = typer.Option(None, "--store", help="Store root written by esam3 cache (folder or s3://...)."),
    out: Path = typer.Option(None, "--out", help="Run folder: checkpoints/, tensorboard/, each checkpoint's config.json."),
    student: str = typer.Option(None, "--student", help=_help("student", "Student: es-{ev,rv,tv}-{s,m,l} (EfficientViT / RepViT / TinyViT; small, medium, large)")),
    steps: int = typer.Option(None, "--steps", help=_help("steps", "Optimizer steps (or --epochs)")),
    epochs: float = typer.Option(None, "--epochs", help=_help("epochs", "Passes over the train split (default 1 when --steps is not given)")),
    batch_size: int = typer.Option(None, "--batch-size", help=_help("batch_size", "Images per micro-batch")),
    accumulate: int = typer.Option(None, "--accumulate", help=_help("accumulate", "Micro-batches per optimizer step (gradient accumulation)")),
    lr: float = typer.Option(None, "--lr", help=_help("lr", "Peak learning rate (default: the public recipe's 1e-3 x images per optimizer step / 512)")),
    min_lr: float = typer.Option(None, "--min-lr", help=_help("min_lr", "Learning rate at the end of the cosine")),
    warmup: float = typer.Option(None, "--warmup", help=_help("warmup", "Share of the steps spent warming up linearly (0..1)")),
    weight_decay: float = typer.Option(None, "--weight-decay", help=_help("weight_decay", "AdamW weight decay (weights only, not norms or biases)")),
    clip: float = typer.Option(None, "--clip", help=_help("clip", "Gradient-norm clip (0: off)")),
    feature_weight: float = typer.Option(None, "--feature-weight", help=_help("feature_weight", "Weight of the per-pixel feature MSE, summed over channels (the public prompt-in-the-loop fine-tune uses 0.0015)")),
    cosine_weight: float = typer.Option(None, "--cosine-weight", help=_help("cosine_weight", "Weight of 1 - cosine on features")),
    prompt_weight: float = typer.Option(None, "--prompt-weight", help=_help("prompt_weight", "Weight of BCE + Dice against the teacher's masks through the frozen heads (0: no prompt-in-the-loop)")),
    iou_weight: float = typer.Option(None, "--iou-weight", help=_help("iou_weight", "Weight of the IoU-head L1 against the teacher's IoU")),
    gt_weight: float = typer.Option(None, "--gt-weight", help=_help("gt_weight", "Weight of BCE + Dice against the stored ground-truth masks")),
    max_prompts: int = typer.Option(None, "--max-prompts", help=_help("max_prompts", "Prompts decoded per image per step, drawn from the cached ones (default: all)")),
    image_size: int = typer.Option(None, "--image-size", help=_help("image_size", "Student input size in pixels (default: the teacher's frame)")),
    val_percent: float = typer.Option(None, "--val-percent", help=_help("val_percent", "Share of samples held out for eval, by key hash (stable across runs and stores)")),
    version: int = typer.Option(None, "--version", help="Store table version to train on (a snapshot; default: the newest)."),
    tag: str = typer.Option(None, "--tag", help="Store snapshot tag to train on (esam3 store info lists them)."),
    init: Path = typer.Option(None, "--init", help="Local timm checkpoint (.safetensors / .pth) to start the backbone from; nothing is downloaded."),
    device: Device = typer.Option(None, "--device", help=_help("device", "Where to train: auto (cuda if present), cpu or cuda")),
    loader_workers: int = typer.Option(None, "--loader-workers", help=_help("loader_workers", "DataLoader processes (spawned) reading the store")),
    workers: int = typer.Option(None, "--workers", help=_help("workers", "Ray Train workers (DDP ranks; one GPU each when there are GPUs), each taking --batch-size images per step")),
    address: str = typer.Option(None, "--address", help="Train on this Ray: auto, or HOST:PORT (default: a local Ray when --workers > 1)."),
    seed: int = typer.Option(None, "--seed", help=_help("seed", "Seed of the student's init, the data order and the prompt draws")),
    checkpoint_every: int = typer.Option(None, "--checkpoint-every", help=_help("checkpoint_every", "Steps between checkpoints (one is also written at the end)")),
    keep_checkpoints: int = typer.Option(None, "--keep-checkpoints", help=_help("keep_checkpoints", "Newest checkpoints kept")),
    log_every: int = typer.Option(None, "--log-every", help=_help("log_every", "Steps between TensorBoard scalars")),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its newest checkpoint (starts fresh if it has none)."),
    s3_endpoint: str = typer.Option(None, "--s3-endpoint", help="S3-compatible endpoint (http(s)://HOST:PORT) for an s3:// store."),
    config_file: Path = typer.Option(None, "--config", help="JSON or TOML file of these settings (keys as the flags, without --); flags win."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON line with the run's figures at the end."),
) -> None:
    """Stage 1: the student's encoder learns the cached trunk, with prompts through the store's frozen heads."""
    from esam3.train.distributed import train_stage1

    flags = dict(
        store=store, out=out, student=student, steps=steps, epochs=epochs, batch_size=batch_size, accumulate=accumulate, lr=lr,
        min_lr=min_lr, warmup=warmup, weight_decay=weight_decay, clip=clip, feature_weight=feature_weight,
        cosine_weight=cosine_weight, prompt_weight=prompt_weight, iou_weight=iou_weight, gt_weight=gt_weight,
        max_prompts=max_prompts, image_size=image_size, val_percent=val_percent, version=version, tag=tag, init=init,
        device=device, loader_workers=loader_workers, workers=workers, address=address, seed=seed, checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints, log_every=log_every, resume=resume or None, s3_endpoint=s3_endpoint,
    )
    with user_errors():
        config = build_config(Stage1Config, {}, **_merge(config_file, flags))
        with progress() as bar:
            task = bar.add_task(f"stage1 {config.student}", total=None, status="opening the store")

            def update(report: Any) -> None:
                shown = ", ".join(f"{k} {v:.4g}" for k, v in report.terms.items() if k != "total")
                bar.update(task, total=report.total, completed=report.step,
                           status=f"loss {report.terms['total']:.4g} ({shown}), {report.samples_per_sec:.1f} samples/s")

            result = train_stage1(config, on_step=update)
    if as_json:
        print_json({
            "out": str(result.out), "checkpoint": str(result.checkpoint), "steps": result.steps, "store_version": result.store_version,
            "train_rows": result.train_rows, "terms": result.terms, "samples_per_sec": result.samples_per_sec,
            "data_wait": result.data_wait, "seconds": result.seconds,
        })
        return
    table = Table(title=Text(f"stage 1: {config.student} from {config.store}"), title_justify="left", show_header=False)
    table.add_column("", style="bold")
    table.add_column("", overflow="fold")
    for name, value in (
        ("steps", str(result.steps)), ("train rows", str(result.train_rows)), ("store version", str(result.store_version)),
        ("final loss", ", ".join(f"{k} {v:.4g}" for k, v in result.terms.items())),
        ("samples/s", f"{result.samples_per_sec:.1f} ({100 * result.data_wait:.0f}% of the time waiting for data)"),
        ("checkpoint", str(result.checkpoint)), ("TensorBoard", f"tensorboard --logdir {result.out / 'tensorboard'}"),
    ):
        table.add_row(name, Text(value))
    console.print(table)
