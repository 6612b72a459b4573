"""Rows of a store's target table with every tensor's bytes in hand: what trainers, verify and show read.

Big tensors keep their bytes in Lance blob fields (``esam3.schemas.store.BLOB_TENSOR``). A plain Lance ``take``
returns a small descriptor there; :meth:`StoreRows.take` fills in the bytes, reading the batch's blobs on a
small thread pool (Lance releases the GIL while it reads), which is how a trainer reads a shuffled batch: on
this machine that beat both Lance's own batched ``read_blobs`` (~4x) and a one-at-a-time read of each blob
(``benchmarks/store_read.py``). Scans (:meth:`StoreRows.batches`, :meth:`StoreRows.where`) ask Lance for the
bytes directly.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import numpy as np
from lance import BlobFile

from esam3.pipeline.store import Store
from esam3.schemas.codecs import Basis, FeatureCodec
from esam3.schemas.store import TABLE_OF, StoreError, blob_columns, dataset_of, decode_tensor

_WITH_BYTES = "all_binary"  # Lance's blob_handling that returns blob fields as their bytes


class StoreRows:
    """One target table (``images`` or ``frames``) of a store, at one version.

    One instance serves one consumer: its takes run one at a time (with ``reuse_buffers`` a batch's views are
    valid until the next take of the same instance); a forked process (a DataLoader worker) starts its own read
    threads, and a pickled copy (a spawned worker) reopens the same version. Give each prefetching thread its own
    instance.
    """

    def __init__(self, store: Store, table: str, version: int | None = None, threads: int = 8, reuse_buffers: bool = False) -> None:
        """``reuse_buffers``: :meth:`take` reads big tensors into buffers this reader keeps and hands out
        ``memoryview``s of them, valid until the next ``take`` (every big-tensor codec decodes into a new array).
        That is what a loader that collates each batch before reading the next wants: for fixed-size tensors (the
        trunk) no allocation and no page faults per batch; a variable-size one (zstd logits, per-object maps) gets
        a new buffer whenever its size differs from the slot's last."""
        if table not in TABLE_OF.values():
            raise ValueError(f"{table!r} is not a target table; use one of {', '.join(TABLE_OF.values())}")
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self.store = store
        self.table = table
        self.dataset = store.dataset(table, version)
        self.version = self.dataset.version
        self.num_rows = self.dataset.count_rows()  # this version's: fixed
        self.blobs = blob_columns(table)
        self.threads = threads
        self.reuse_buffers = reuse_buffers
        self._buffers: dict[tuple[str, int], bytearray] = {}  # (column, slot in the batch) -> buffer
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._basis: Basis | None = None
        self._basis_read = False

    def __len__(self) -> int:
        return self.num_rows

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (spawned DataLoader workers): the settings only; the copy reopens the same version."""
        return {
            "store": self.store,
            "table": self.table,
            "version": self.version,
            "threads": self.threads,
            "reuse_buffers": self.reuse_buffers,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def __enter__(self) -> StoreRows:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the read threads (a later ``take`` starts them again)."""
        self._after_fork()
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None

    def _after_fork(self) -> None:
        """In a forked child the parent's threads are gone: its pool would wait for them forever, and so would
        Lance on a dataset opened before the fork. Start over with fresh ones (the same version)."""
        if self._pid != os.getpid():
            self._pid, self._lock, self._pool = os.getpid(), threading.Lock(), None
            self.dataset = self.store.dataset(self.table, self.version)

    def take(self, indices: Sequence[int], columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Rows at these positions (0 .. len - 1, any order), in that order, tensors with their bytes."""
        self._after_fork()
        positions = [int(i) for i in indices]
        outside = [i for i in positions if not 0 <= i < self.num_rows]
        if outside:
            raise IndexError(
                f"rows {outside[:5]} are not in {self.table} of {self.store.uri} (version {self.version}: {self.num_rows} rows)"
            )
        wanted = [c for c in self.blobs if columns is None or c in columns]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="esam3-blobs")
            files = [
                (c, i, f)
                for c in (wanted if positions else ())
                for i, f in enumerate(self.dataset.take_blobs(f"{c}.data", indices=positions, buffer_size=0))
            ]
            reads = [self._pool.submit(self._read, job) for job in files]  # blob reads start; small fields meanwhile
            try:
                rows = self.dataset.take(positions, columns=list(columns) if columns is not None else None).to_pylist()
                for (column, i, _), read in zip(files, reads, strict=True):
                    data = read.result()
                    if rows[i][column] is not None:
                        rows[i][column]["data"] = data
            finally:
                wait(reads)  # never leave a read writing into a buffer the next take will use
            return rows

    def _read(self, job: tuple[str, int, BlobFile | None]) -> bytes | memoryview | None:
        """One blob's bytes: a new ``bytes``, or (``reuse_buffers``) a view of this slot's buffer."""
        column, slot, blob = job
        if blob is None:
            return None
        size = blob.size()
        if not self.reuse_buffers:
            return blob.read_range(0, size)
        buffer = self._buffers.get((column, slot))
        if buffer is None or len(buffer) != size:
            buffer = self._buffers[(column, slot)] = bytearray(size)
        read = blob.readinto(buffer) if size else 0
        if read != size:
            raise StoreError(f"{self.store.uri} {self.table}: {column} blob of row {slot} in this batch: read {read} of {size} bytes")
        return memoryview(buffer)

    def where(self, condition: str | None = None, columns: Sequence[str] | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Rows matching a Lance SQL filter (e.g. ``key = 'sa1b/7'``; None: every row), tensors with their bytes."""
        self._after_fork()
        table = self.dataset.to_table(columns=columns, filter=condition, limit=limit, blob_handling=_WITH_BYTES)
        return table.to_pylist()

    def batches(
        self, batch_size: int = 16, columns: Sequence[str] | None = None, fragments: Sequence[Any] | None = None
    ) -> Iterator[list[dict[str, Any]]]:
        """Every row (of ``fragments``, default all) in storage order, ``batch_size`` at a time, tensors with their bytes."""
        self._after_fork()
        scanner = self.dataset.scanner(
            columns=columns, batch_size=batch_size, blob_handling=_WITH_BYTES, fragments=list(fragments) if fragments is not None else None
        )
        for batch in scanner.to_batches():
            yield batch.to_pylist()

    def basis(self) -> Basis | None:
        """The store's low-rank basis for this table's dataset (None unless the trunk codec is low-rank)."""
        if not self._basis_read:
            self._basis, self._basis_read = self.store.read_basis(dataset_of(self.table)), True
        return self._basis

    def decode(self, row: dict[str, Any], column: str) -> np.ndarray:
        """One tensor of a row from this reader as a numpy array (float32 for features and logits)."""
        value = row[column]
        if value is None:
            raise ValueError(f"{row.get('key', 'this row')} has no {column}")
        return decode_tensor(value, self.basis() if value["codec"] == FeatureCodec.LOWRANK.value else None)
