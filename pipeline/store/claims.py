"""Shard claims: which live run is caching which shards of a store, so that two runs never work on one shard.

Before a run deletes rows of unfinished shards or starts any, it writes ``claims/<run_id>.json`` (host, pid,
dataset, shards, heartbeat), keeps the heartbeat fresh from a background thread, then reads every other claim and
leaves out each shard another live run claims. Storage with read-after-write consistency (local disks, S3) makes
at least one of two runs that start together see the other, so at most one keeps a shard; both may leave it, and
a rerun does it. Without claims, a run starting while another commits shard X could delete X's fresh rows before
that run's ledger row lands.

A claim is dead when its heartbeat is older than ``STALE_AFTER`` seconds (machines' clocks must agree to well
within that, as NTP keeps them), or at once when its process is gone on this host (so a killed driver's rerun
need not wait). The claim file is created once (two live runs cannot share a run id) and removed when the run ends.

Claims only save work: a run that stalls past the expiry (its heartbeats failing) can have its shards taken over,
and the commits (``commits.py``) make sure that only one copy of a shard ever becomes visible.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from esam3.pipeline.store import Store
from esam3.pipeline.store.once import create_once
from esam3.schemas.errors import first_line
from esam3.schemas.store import StoreError

log = logging.getLogger(__name__)
CLAIMS_DIR = "claims"
HEARTBEAT_SECONDS = 10.0
STALE_AFTER = 60.0


@dataclass
class Claim:
    run_id: str
    host: str
    pid: int
    dataset: str
    shards: list[str]
    heartbeat: float  # seconds since the epoch

    def gone(self) -> bool:
        """Whether its process is known to have ended (this host only: elsewhere a silent run may be stalled)."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def alive(self, now: float) -> bool:
        if now - self.heartbeat > STALE_AFTER:
            return False
        if self.host == socket.gethostname():
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True  # someone else's process: it exists
        return True


def read_claims(store: Store) -> list[Claim]:
    """Every claim file in the store, live or not (claims that vanish or do not parse while read are skipped)."""
    claims = []
    for path in store.fs.glob(f"{store.path}/{CLAIMS_DIR}/*.json"):
        try:
            with store.fs.open(path, "r") as handle:
                claims.append(Claim(**json.load(handle)))
        except (OSError, ValueError, TypeError) as exc:  # gone meanwhile (its run ended) or unreadable: no claim
            log.debug("claim %s skipped: %s", path, exc)
    return claims


def may_still_write(store: Store) -> set[str]:
    """Runs that may still write to the store: their claim file is there (a run removes it when it ends), unless its
    process is known to be gone. A stalled run whose heartbeat stopped is one of them."""
    return {c.run_id for c in read_claims(store) if not c.gone()}


def live_claims(store: Store) -> list[Claim]:
    """Claims of runs that are writing to the store now."""
    now = time.time()
    return [c for c in read_claims(store) if c.alive(now)]


def refuse_while_writing(store: Store, why: str) -> None:
    """A StoreError naming the run, if a live run writes to the store; ``why`` says what would go wrong."""
    if running := live_claims(store):
        run = running[0]
        raise StoreError(f"store {store.uri}: run {run.run_id} ({run.host}, pid {run.pid}) is writing to it; {why}")


class ShardClaims:
    """This run's claim on its shards, alive (heartbeat thread) while the context is open."""

    def __init__(self, store: Store, run_id: str, dataset: str, shards: Sequence[str]) -> None:
        self.store = store
        self.claim = Claim(run_id, socket.gethostname(), os.getpid(), dataset, list(shards), time.time())
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._beat, name="esam3-claim-heartbeat", daemon=True)
        self._last_beat = time.monotonic()

    @property
    def path(self) -> str:
        return f"{self.store.path}/{CLAIMS_DIR}/{self.claim.run_id}.json"

    def __enter__(self) -> ShardClaims:
        self.store.fs.makedirs(f"{self.store.path}/{CLAIMS_DIR}", exist_ok=True)
        if not create_once(self.store.fs, self.path, json.dumps(asdict(self.claim)).encode()):
            same = next((c for c in read_claims(self.store) if c.run_id == self.claim.run_id), None)
            if same is not None and same.alive(time.time()):
                raise StoreError(
                    f"store {self.store.uri}: run id {same.run_id} is in use by a live run ({same.host}, pid "
                    f"{same.pid}); give this run another run_id, or none"
                )
            self._write()  # a stopped run's claim with this run id: taken over
        self._last_beat = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.store.fs.rm(self.path)
        except Exception as exc:  # noqa: BLE001 - storage down (s3fs raises more than OSError); never mask the run's error
            log.warning("could not remove the claim %s (%s); it expires in %.0f s", self.path, first_line(exc), STALE_AFTER)

    def held_elsewhere(self) -> dict[str, Claim]:
        """Shards of this run that another live run of the same dataset claims, with that run's claim."""
        now, mine = time.time(), set(self.claim.shards)
        held: dict[str, Claim] = {}
        for other in self._others():
            if other.dataset == self.claim.dataset and other.alive(now):
                held.update({shard: other for shard in other.shards if shard in mine})
        return held

    def narrow(self, shards: Sequence[str]) -> None:
        """Claim only these shards from now on (the ones this run keeps)."""
        with self._lock:
            self.claim.shards = list(shards)
        self._write()

    def _others(self) -> list[Claim]:
        return [c for c in read_claims(self.store) if c.run_id != self.claim.run_id]

    def _write(self) -> None:
        with self._lock:  # the heartbeat thread and narrow() share the staging file
            self.claim.heartbeat = time.time()
            document: dict[str, Any] = asdict(self.claim)
            staging = f"{self.store.path}/{CLAIMS_DIR}/.{self.claim.run_id}.json.tmp"
            with self.store.fs.open(staging, "w") as handle:  # then a rename: readers never see half a claim
                json.dump(document, handle)
            self.store.fs.mv(staging, self.path)

    def _beat(self) -> None:
        warned = False
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self._write()
                self._last_beat, warned = time.monotonic(), False
            except Exception as exc:  # noqa: BLE001 - a storage hiccup: the next beat retries; the run reports outages
                silent = time.monotonic() - self._last_beat
                if silent > STALE_AFTER / 2 and not warned:
                    log.warning(
                        "the claim's heartbeat has failed for %.0f s (%s): past %.0f s another run may take this "
                        "run's shards over (commits stay fenced: no shard is stored twice)",
                        silent,
                        first_line(exc),
                        STALE_AFTER,
                    )
                    warned = True
                else:
                    log.debug("claim heartbeat failed: %s", exc)
