"""Run records: every cache run that had work to do leaves ``runs/<run_id>.json`` in the store, so that a store made
over days by many runs says how each part was made: the resolved config, the versions of esam3 and the libraries
that shape the targets, the driver's host, start and end, what it committed, and how it ended.

Written when the run starts its shards (``status: running``) and again when it ends (``finished``, ``failed`` with
the error's first line, or ``interrupted``). Versions and precision are provenance, not part of the targets'
fingerprint: a store resumed after an upgrade or on other hardware goes on (rows record their precision), and
``store info`` lists the runs so that a mix shows.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import platform
import socket
from importlib import metadata
from typing import Any

from esam3.pipeline.store.root import Store
from esam3.schemas.errors import first_line

log = logging.getLogger(__name__)
RUNS_DIR = "runs"
#: Distributions whose versions a run records (what the targets and their storage depend on).
VERSIONED = ("esam3", "torch", "transformers", "pylance", "pyarrow", "ray", "numpy")


def versions() -> dict[str, str]:
    """Installed versions of what the targets depend on, and Python's."""
    found = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")  # orders runs started in one second


class RunRecord:
    """This run's record in the store; ``end`` writes its outcome."""

    def __init__(self, store: Store, run_id: str, config: dict[str, Any], executor: str) -> None:
        self.store = store
        self.path = f"{store.path}/{RUNS_DIR}/{run_id}.json"
        self.document: dict[str, Any] = {
            "run_id": run_id,
            "status": "running",
            "started_at": _now(),
            "ended_at": None,
            "host": socket.gethostname(),
            "executor": executor,
            "versions": versions(),
            "config": config,
            "counts": {},
            "error": None,
        }
        self._write()

    def end(self, counts: dict[str, Any], error: BaseException | None = None) -> None:
        status = "finished" if error is None else ("interrupted" if isinstance(error, KeyboardInterrupt) else "failed")
        self.document.update(status=status, ended_at=_now(), counts=counts, error=None if error is None else first_line(error))
        self._write()

    def _write(self) -> None:
        try:
            self.store.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
            self.store.fs.pipe_file(self.path, json.dumps(self.document, indent=2, default=str).encode())
        except Exception as exc:  # noqa: BLE001 - provenance must not fail a run (nor hide its own error)
            log.warning("could not write the run record %s: %s", self.path, first_line(exc))


def read_runs(store: Store) -> list[dict[str, Any]]:
    """Every run record of the store, oldest first (unreadable ones skipped)."""
    records = []
    for path in store.fs.glob(f"{store.path}/{RUNS_DIR}/*.json"):
        try:
            with store.fs.open(path, "r") as handle:
                records.append(json.load(handle))
        except (OSError, ValueError) as exc:
            log.debug("run record %s skipped: %s", path, exc)
    return sorted(records, key=lambda r: r.get("started_at") or "")
