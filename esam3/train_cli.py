"""``esam3 train stage1`` / ``stage2``: distil a student from a store alone (flags > --config file > defaults).

Every field of a stage's config (``esam3.schemas.train``) is a flag of the same name (``batch_size`` ->
``--batch-size``), with the field's description and default as its help: the commands are built from the configs,
so a new setting is one field, validated once.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from rich.text import Text

from esam3.console import UsageError, build_config, console, print_json, progress, user_errors
from esam3.schemas.train import Stage1Config, Stage2Config, TrainerConfig, read_config_file

train_app = typer.Typer(help="Train students from a store (no teacher trunk is loaded).", no_args_is_help=True)


def _help(info: Any) -> str:
    default = info.default.value if isinstance(info.default, Enum) else info.default
    shown = "" if info.is_required() or default is None or default is False else f" (default: {default})"
    text = info.description or ""
    return f"{text[:1].upper()}{text[1:]}.{shown}"


def _plain(annotation: Any) -> Any:
    """``int | None`` -> ``int``: the type typer parses."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def _merge(config_file: Path | None, flags: dict[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(read_config_file(config_file))
    values.update({k: v for k, v in flags.items() if v is not None})
    for required in ("store", "out"):
        if required not in values:
            raise UsageError(f"--{required} is required (on the command line or in --config)")
    return values


def config_command(model: type[TrainerConfig], run: Callable[[Any, bool], None]) -> Callable[..., None]:
    """A typer command whose flags are ``model``'s fields (+ ``--config`` and ``--json``) and that calls ``run``."""
    parameters, annotations = [], {}
    for name, info in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        kind = _plain(info.annotation)
        option = typer.Option(None, f"{flag}/--no-{flag[2:]}" if kind is bool else flag, help=_help(info))
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind))
        annotations[name] = kind
    extra = {
        "config_file": (
            Path,
            typer.Option(None, "--config", help="JSON or TOML file of these settings (keys as the flags, without --); flags win."),
        ),
        "as_json": (bool, typer.Option(False, "--json", help="Print one JSON line with the run's figures at the end.")),
    }
    for name, (kind, option) in extra.items():
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind))
        annotations[name] = kind

    def command(**values: Any) -> None:
        config_file, as_json = values.pop("config_file"), values.pop("as_json")
        with user_errors():
            config = build_config(model, {}, **_merge(config_file, values))
        run(config, as_json)

    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__annotations__ = {**annotations, "return": None}
    command.__doc__ = model.__doc__
    return command


def _train(config: TrainerConfig, as_json: bool, title: str) -> None:
    """Run a stage with a progress bar; print its figures (a table, or one JSON line)."""
    from esam3.train.distributed import train

    with user_errors():
        with progress() as bar:
            task = bar.add_task(title, total=None, status="opening the store")

            def update(report: Any) -> None:
                shown = ", ".join(f"{k} {v:.4g}" for k, v in report.terms.items() if k != "total")
                bar.update(
                    task,
                    total=report.total,
                    completed=report.step,
                    status=f"loss {report.terms['total']:.4g} ({shown}), {report.samples_per_sec:.1f} samples/s",
                )

            result = train(config, on_step=update)
    if as_json:
        print_json(
            {
                "out": str(result.out),
                "checkpoint": str(result.checkpoint),
                "steps": result.steps,
                "store_version": result.store_version,
                "train_rows": result.train_rows,
                "terms": result.terms,
                "samples_per_sec": result.samples_per_sec,
                "data_wait": result.data_wait,
                "seconds": result.seconds,
            }
        )
        return
    table = Table(title=Text(f"{title} from {config.store}"), title_justify="left", show_header=False)
    table.add_column("", style="bold")
    table.add_column("", overflow="fold")
    for name, value in (
        ("steps", str(result.steps)),
        ("train rows", str(result.train_rows)),
        ("store version", str(result.store_version)),
        ("final loss", ", ".join(f"{k} {v:.4g}" for k, v in result.terms.items())),
        ("samples/s", f"{result.samples_per_sec:.1f} ({100 * result.data_wait:.0f}% of the time waiting for data)"),
        ("checkpoint", str(result.checkpoint)),
        ("TensorBoard", f"tensorboard --logdir {result.out / 'tensorboard'}"),
    ):
        table.add_row(name, Text(value))
    console.print(table)


def _stage1(config: Stage1Config, as_json: bool) -> None:
    _train(config, as_json, f"stage 1: {config.student}")


def _stage2(config: Stage2Config, as_json: bool) -> None:
    if not as_json:
        with user_errors():
            console.print(Text(_memory_summary(config)))
    _train(config, as_json, "stage 2: memory")


def _memory_summary(config: Stage2Config) -> str:
    """The memory this run builds, from the store's heads config alone (sizes, tokens per frame, parameters)."""
    from esam3.pipeline.object_store import S3Settings
    from esam3.pipeline.store import Store
    from esam3.train.frozen_heads import store_teacher_config
    from esam3.train.memory import describe
    from esam3.train.tracker import memory_spec

    return describe(memory_spec(store_teacher_config(Store(config.store, S3Settings.from_environment(config.s3_endpoint))), config))


train_app.command("stage1", help="Stage 1: the student's encoder learns the cached trunk, with prompts through the store's frozen heads.")(
    config_command(Stage1Config, _stage1)
)
train_app.command(
    "stage2",
    help="Stage 2: a Perceiver memory and a light memory attention learn SAM3's memory on the store's video clips, on a stage-1 encoder.",
)(config_command(Stage2Config, _stage2))
