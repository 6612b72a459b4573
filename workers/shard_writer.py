"""One streaming Lance writer per shard: a shard's rows, arriving in pieces from many write tasks, become one fragment.

Why: the manifest of a Lance table lists every fragment and every commit rewrites it, and the duplicate check and
the index update plan over every fragment; with a fragment per bundle of rows, the driver's cost per shard grew
10x over the first 100 shards (``benchmarks/store_scale.py``). Here each shard is written by one writer as a
stream (Lance's ``write_fragments`` reading from a queue on a thread, memory bounded by the queue): one fragment
per shard (more only past Lance's 90 GB per file), so the manifest grows by one entry per shard.

The plan routes each shard to one of a few ``ShardWriter`` actors (by a hash of its name); write tasks hand them
encoded pieces (:meth:`ShardWriter.add`). Pieces may arrive twice (Ray retries a task whose worker died after
delivering): rows are kept once per key, failures once per (member, reason). When a shard's end marker has arrived
and every row and failure it announced is in, the writer finishes its fragments and returns the shard's totals
(``final``), which is all the driver needs to commit it; meanwhile each piece returns a progress entry. An abort
(I/O error reading the shard, or writing it) ends the shard's stream; its data files are never committed.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from lance.fragment import write_fragments

from esam3.pipeline.object_store import ACCESS_HINT, S3Settings, access_refused, storage_failed
from esam3.schemas.errors import first_line
from esam3.schemas.store import LANCE_FILE_VERSION, StoreError
from esam3.schemas.work import KIND_ABORT, KIND_END, KIND_FAILURE, KIND_SAMPLE

log = logging.getLogger(__name__)
_DONE = object()
#: Encoded pieces a shard's stream holds before ``add`` waits for the writer (each piece: one teacher block).
QUEUE_PIECES = 4


@dataclass
class _Shard:
    """One shard's stream and what has arrived of it."""

    name: str
    keys: set[str] = field(default_factory=set)
    key_order: list[str] = field(default_factory=list)
    failures: dict[tuple[str, str], int] = field(default_factory=dict)  # (member, reason) -> weight
    rows: int = 0
    bytes: int = 0
    end_count: int = -1
    end_samples: int = -1
    retries: int = 0
    aborted: str | None = None
    pieces: queue.Queue | None = None
    thread: threading.Thread | None = None
    fragments: list[dict[str, Any]] = field(default_factory=list)
    error: BaseException | None = None

    @property
    def complete(self) -> bool:
        return self.end_count >= 0 and self.rows + sum(self.failures.values()) >= self.end_count


class ShardWriter:
    """Streams each shard it is given into its own Lance fragment(s); see the module docstring."""

    def __init__(self, table_uri: str, schema: pa.Schema, s3: S3Settings | None = None) -> None:
        self.table_uri, self.schema, self.s3 = table_uri, schema, s3 or S3Settings()
        self._shards: dict[str, _Shard] = {}
        self._finished: dict[str, dict[str, Any]] = {}

    def add(self, shard: str, piece: pa.Table) -> dict[str, Any]:
        """Take one encoded piece of ``shard`` (ENCODED rows of that shard only); returns a WRITTEN entry: the
        shard's totals once it is finished (``final``), else this piece's new rows (progress)."""
        if shard in self._finished:  # a retried task re-delivering a piece of a finished shard
            return self._finished[shard]
        state = self._shards.setdefault(shard, _Shard(shard))
        small = piece.select(
            ["kind", "key", "member", "reason", "weight", "end_count", "end_samples", "end_retries", "stored_bytes"]
        ).to_pylist()
        new_rows = [i for i, r in enumerate(small) if r["kind"] == KIND_SAMPLE and r["key"] not in state.keys]
        new_bytes = 0
        for i in new_rows:
            state.keys.add(small[i]["key"])
            state.key_order.append(small[i]["key"])
            new_bytes += small[i]["stored_bytes"] or 0
        for r in small:
            if r["kind"] == KIND_FAILURE:
                state.failures.setdefault((r["member"], r["reason"]), r["weight"] if r["weight"] is not None else 1)
            elif r["kind"] == KIND_END:
                state.end_count, state.end_samples, state.retries = r["end_count"], r["end_samples"], r["end_retries"] or 0
            elif r["kind"] == KIND_ABORT and state.aborted is None:
                state.aborted = r["reason"]
        if new_rows and state.aborted is None:
            self._stream(state, piece.take(pa.array(new_rows, type=pa.int64())).select(self.schema.names))
        state.rows += len(new_rows)
        state.bytes += new_bytes
        self._check_stream(state)
        if state.aborted is not None or state.complete:
            return self._finish(state)
        return {
            "shard": shard,
            "final": False,
            "rows": len(new_rows),
            "fragments": "[]",
            "keys": "[]",
            "bytes": 0,
            "failures": "[]",
            "end_count": -1,
            "end_samples": -1,
            "read_retries": 0,
            "aborted": None,
        }

    def _stream(self, state: _Shard, rows: pa.Table) -> None:
        if state.thread is None:
            state.pieces = queue.Queue(maxsize=QUEUE_PIECES)
            state.thread = threading.Thread(target=self._write, args=(state,), name=f"esam3-write-{state.name}", daemon=True)
            state.thread.start()
        for batch in rows.to_batches():
            self._put(state, batch)

    @staticmethod
    def _put(state: _Shard, item: Any) -> None:
        """Queue ``item`` for the shard's writer thread, waiting while the queue is full (unless the thread died)."""
        while state.thread.is_alive():
            try:
                state.pieces.put(item, timeout=1.0)
                return
            except queue.Full:
                continue

    def _write(self, state: _Shard) -> None:
        def batches() -> Any:
            while (batch := state.pieces.get()) is not _DONE:
                yield batch

        try:
            written = write_fragments(
                pa.RecordBatchReader.from_batches(self.schema, batches()),
                self.table_uri,
                schema=self.schema,
                data_storage_version=LANCE_FILE_VERSION,
                storage_options=self.s3.lance_options(self.table_uri) or None,  # credentials as of this shard's start
            )
            state.fragments = [f.to_json() for f in written]
        except BaseException as exc:  # noqa: BLE001 - reported by the next add of this shard
            state.error = exc
            while True:  # drain, so that a waiting put returns
                try:
                    if state.pieces.get_nowait() is _DONE:
                        break
                except queue.Empty:
                    break

    def _check_stream(self, state: _Shard) -> None:
        """A write error becomes the shard's abort (a 403 stops the run: no shard would fare better)."""
        exc = state.error
        if exc is None or state.aborted is not None:
            return
        if access_refused(exc) and "ExpiredToken" not in str(exc):  # an expiry mid-shard: a rerun gets fresh credentials
            raise StoreError(f"store table {self.table_uri}: writing refused (403); {ACCESS_HINT}") from None
        if not isinstance(exc, (OSError, ValueError)) or not storage_failed(exc):
            raise exc
        log.warning("%s: writing fragments failed, the shard stays uncommitted in this run: %s", state.name, exc)
        state.aborted = f"writing its rows failed: {first_line(exc)}"

    @staticmethod
    def _end(state: _Shard, timeout: float | None = None) -> None:
        """Close the shard's stream and wait for its writer (a dead writer takes no more pieces)."""
        if state.thread is None:
            return
        ShardWriter._put(state, _DONE)
        state.thread.join(timeout)

    def _finish(self, state: _Shard) -> dict[str, Any]:
        self._end(state)
        self._check_stream(state)
        del self._shards[state.name]
        entry = {
            "shard": state.name,
            "final": True,
            "rows": state.rows,
            "fragments": json.dumps(state.fragments if state.aborted is None else []),
            "keys": json.dumps(state.key_order),
            "bytes": state.bytes,
            "failures": json.dumps([{"member": m, "reason": r, "weight": w} for (m, r), w in state.failures.items()]),
            "end_count": state.end_count,
            "end_samples": state.end_samples,
            "read_retries": state.retries,
            "aborted": state.aborted,
        }
        self._finished[state.name] = entry
        return entry

    def close(self) -> None:
        """End every open stream (their files are never committed): a plan that stopped early."""
        for state in list(self._shards.values()):
            self._end(state, timeout=60)
        self._shards.clear()
