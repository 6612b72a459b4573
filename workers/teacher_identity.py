"""A teacher's card without loading the teacher: its checksum and sizes, remembered by its weight files' identity.

The teacher id is a checksum over the loaded weights (``weights_checksum``), and SAM3 takes about 70 s to load on
a CPU: a cache run's driver needs only the card (checksum, sizes, parameter counts), and a rerun of a finished run
needs nothing else at all. So the card of every teacher loaded from files is kept under ``$ESAM3_CACHE/cards/``,
keyed by the weight files' resolved paths, sizes and modification times (ns): replacing, editing or touching a
weight file misses the cache and the teacher is loaded (and checksummed) again. ``full-random`` (in memory) is never
remembered.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from esam3.schemas.teacher import RANDOM_TEACHERS, TeacherConfig
from esam3.workers.teacher_loading import cache_root, random_teacher_dir

log = logging.getLogger(__name__)
#: Bumped when the card's content or the checksum's definition changes.
CARD_CACHE_VERSION = 1


def checkpoint_dir(config: TeacherConfig) -> Path | None:
    """The directory the teacher loads from, without creating it (None: built in memory)."""
    if config.source == "full-random":
        return None
    if config.source in RANDOM_TEACHERS:
        return random_teacher_dir(config.source, config.seed)
    return Path(config.source).expanduser().resolve()


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint (one file, or the shards its index lists); [] if there are none."""
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    index = directory / "model.safetensors.index.json"
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [directory / name for name in shards]


def _key(config: TeacherConfig) -> str | None:
    directory = checkpoint_dir(config)
    files = weight_files(directory) if directory is not None and directory.is_dir() else []
    if not files:
        return None
    try:
        identity = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    except OSError:
        return None
    blob = json.dumps({"version": CARD_CACHE_VERSION, "source": config.source, "files": identity}).encode()
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


def _path(key: str) -> Path:
    return cache_root() / "cards" / f"{key}.json"


def remembered_card(config: TeacherConfig) -> dict[str, Any] | None:
    """The card remembered for this teacher's weight files as they are now, or None."""
    key = _key(config)
    if key is None:
        return None
    try:
        return json.loads(_path(key).read_text())
    except (OSError, ValueError):
        return None


def remember_card(config: TeacherConfig, card: dict[str, Any]) -> None:
    """Keep ``card`` (a ``TeacherCard.to_dict()``) for this teacher's weight files; best effort."""
    key = _key(config)
    if key is None:
        return
    path = _path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(f".{os.getpid()}.tmp")
        staging.write_text(json.dumps(card, indent=2))
        staging.replace(path)
    except OSError as exc:  # a read-only cache only costs the next run a load
        log.debug("teacher card not remembered in %s: %s", path, exc)
