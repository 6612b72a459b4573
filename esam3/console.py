"""What every esam3 command shares: the consoles, user-error handling (one line, exit 2), progress bars, JSON."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from esam3.pipeline.object_store import resolved_secrets, storage_failed
from esam3.schemas.errors import Esam3Error, describe, first_line

console = Console()
#: Whether stderr is a terminal is decided now: during a cache run its fd may go through a filter's pipe
#: (``pipeline/stderr_filter.py``) and the progress bar must stay live.
err_console = Console(stderr=True, force_terminal=True if sys.stderr.isatty() else None)
M = TypeVar("M", bound=BaseModel)


def redact(text: str) -> str:
    """Remove S3 credentials from a message (server replies can echo them): this environment's, and any this process
    resolved through the credential chain (a profile, credential_process, a role)."""
    secrets = {os.environ.get(name) for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")}
    for value in sorted((secrets | resolved_secrets()) - {None}, key=len, reverse=True):
        if len(value) >= 4:
            text = text.replace(value, "***")
    return text


def human_bytes(n_bytes: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as the benchmarks report them)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n_bytes < 1000 or unit == "TB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1000
    raise AssertionError("unreachable")


class UsageError(Esam3Error):
    """A mistake in what the user typed; shown as one line, exit code 2."""


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def build_config(model: type[M], flags: dict[str, str] | None = None, **values: Any) -> M:
    """Validate CLI values into a config model; errors name the flag (``--images-per-shard: ...``).

    ``flags`` maps a config field to its flag where the names differ (``{"source": "--teacher"}``).
    """
    names = flags or {}
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise UsageError(describe(exc, name=lambda field: names.get(field, _flag(field)))) from None


@contextmanager
def user_errors() -> Iterator[None]:
    """esam3's errors as one line on stderr, with the exit code their class carries (2: the user's to fix, 1: rerun)."""
    try:
        yield
    except Esam3Error as exc:
        _fail(f"{exc}; {exc.advice}" if exc.advice else str(exc), exc.exit_code)
    except Exception as exc:  # the storage failing where no command expected it: one line too, not a traceback
        if not storage_failed(exc):
            raise
        _fail(f"storage error: {first_line(exc)}; check that the storage is reachable and run the command again", 1)


def _fail(message: str, code: int) -> None:
    err_console.print(f"[bold red]esam3: error:[/] {escape(redact(message))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code) from None


def progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    )


def print_json(payload: dict[str, Any]) -> None:
    console.print_json(json.dumps(payload, default=str), indent=None)
