"""The settings of ``esam3 store cleanup``, validated before anything is deleted."""

from __future__ import annotations

import datetime as dt
import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

_DURATION = re.compile(r"^(\d{1,6})([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> dt.timedelta:
    """``90s``, ``30m``, ``12h``, ``14d`` -> timedelta."""
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError(f"expected a number and a unit s, m, h or d (e.g. 14d), got {text!r}")
    return dt.timedelta(seconds=int(match.group(1)) * _UNIT_SECONDS[match.group(2)])


class CleanupConfig(BaseModel):
    """Which old table versions go, and whether files no version references yet may go too."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    older_than: dt.timedelta = Field(dt.timedelta(days=14), description="Versions replaced longer ago than this are removed.")
    keep_versions: int | None = Field(None, ge=1, description="Keep at least the newest N versions of each table.")
    unverified: bool = Field(False, description="Also delete unreferenced files younger than 7 days (no run may be writing).")
    dry_run: bool = Field(False, description="Report what would be removed; delete nothing.")

    @field_validator("older_than", mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        return parse_duration(value) if isinstance(value, str) else value
