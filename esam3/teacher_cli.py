"""``esam3 teacher ...``: look at a SAM3 teacher and export the small heads students need."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from esam3.console import UsageError, build_config, console, err_console, human_bytes, print_json, user_errors
from esam3.schemas.teacher import RANDOM_TEACHERS, TeacherConfig

teacher_app = typer.Typer(
    help="Inspect a SAM3 teacher and export its heads (tracker neck, prompt encoder, mask decoder, memory).",
    no_args_is_help=True,
)

_TEACHER_HELP = f"A local SAM3 checkpoint directory (config.json + model.safetensors) or one of: {', '.join(RANDOM_TEACHERS)}."
_FLAGS = {"source": "--teacher"}
_SEED_HELP = "Weight seed of a random teacher (ignored for checkpoint directories)."


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


@teacher_app.command("export-heads")
def export_heads_command(
    teacher: str = typer.Option(..., "--teacher", help=_TEACHER_HELP),
    out: Path = typer.Option(..., "--out", help="Folder to write heads.safetensors and heads.json into (created if missing)."),
    detector: bool = typer.Option(True, "--detector/--no-detector", help="Also export the detector heads (stage 3)."),
    seed: int = typer.Option(0, "--seed", help=_SEED_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON line with the counts and sizes."),
) -> None:
    """Save the heads students train against as safetensors + config; loading them never builds the trunk."""
    from esam3.workers.teacher import export_heads

    with user_errors():
        config = build_config(TeacherConfig, _FLAGS, source=teacher, seed=seed)
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out: {out} exists and is not a folder")
        with err_console.status(f"loading teacher {teacher}"):
            result = export_heads(config, out, detector=detector)
    if as_json:
        print_json(result.to_dict())
        return
    table = Table(title=Text(f"heads of {teacher} -> {out}"), title_justify="left")
    for column in ("", "parameters", "size"):
        table.add_column(column, justify="right" if column else "left")
    table.add_row("full teacher", _millions(result.teacher_parameters), human_bytes(result.teacher_bytes))
    table.add_row("heads" + (" (with detector)" if detector else ""), _millions(result.heads_parameters), human_bytes(result.heads_bytes))
    console.print(table)
    console.print(Text(f"teacher checksum {result.teacher.checksum}"))


@teacher_app.command("info")
def info_command(
    teacher: str = typer.Option(..., "--teacher", help=_TEACHER_HELP),
    seed: int = typer.Option(0, "--seed", help=_SEED_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the teacher card as one JSON line."),
) -> None:
    """Load a teacher on CPU and print its card: checksum, sizes read from its config, parameters per part."""
    from esam3.schemas.teacher import Device
    from esam3.workers.teacher import Sam3Teacher

    with user_errors():
        config = build_config(TeacherConfig, _FLAGS, source=teacher, seed=seed, device=Device.CPU)
        with err_console.status(f"loading teacher {teacher}"):
            card = Sam3Teacher.load(config).card
    if as_json:
        print_json(card.to_dict())
        return
    table = Table(title=Text(f"teacher {teacher}"), title_justify="left", show_header=False)
    table.add_column("field")
    table.add_column("value", overflow="fold")
    table.add_row("checksum", card.checksum)
    table.add_row("checkpoint", Text(card.checkpoint_dir or "(in memory)"))
    for name, value in card.geometry.__dict__.items():
        table.add_row(name.replace("_", " "), str(value))
    for name, value in card.parameters.items():
        table.add_row(f"parameters: {name.replace('_', ' ')}", _millions(value))
    console.print(table)
