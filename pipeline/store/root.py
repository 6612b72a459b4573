"""One store root: its card, its Lance tables, the ledger, and the commits that make rows visible.

Only the driver commits. Workers write Lance fragments (data files nobody sees yet) and hand back their
metadata; the driver commits all fragments of a shard in one ``Append``, then that shard's failures, then its
ledger row. A crash before the ledger row leaves rows of an unfinished shard: :meth:`Store.forget_unfinished`
deletes them before the shard is run again, so a rerun never duplicates a key. Fragment files written by a
worker that died before reporting are never committed (``lance`` cleanup can remove them when no writer runs).
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import fsspec
import lance
import pyarrow as pa
from lance import LanceDataset, LanceOperation
from lance.fragment import FragmentMetadata

from esam3.pipeline.object_store import ACCESS_HINT, S3Settings, access_refused
from esam3.schemas.codecs import Basis
from esam3.schemas.errors import first_line
from esam3.schemas.store import KEY_COLUMNS, LANCE_FILE_VERSION, SCHEMAS, STORE_CARD, STORE_FORMAT, TABLES, StoreError

log = logging.getLogger(__name__)


#: Index segments (one per commit) a key index collects before a commit merges them into one.
INDEX_SEGMENTS = 32


def _quote(values: Iterable[str]) -> str:
    return ", ".join("'" + v.replace("'", "''") + "'" for v in values)


class Store:
    """A store root: a local folder or an fsspec/object-store URL (``s3://bucket/prefix``)."""

    def __init__(self, uri: str, s3: S3Settings | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.s3 = s3 or S3Settings.from_environment()
        self.storage_options = self.s3.lance_options(self.uri)  # for Lance; never logged or stored
        self.fs, self.path = fsspec.core.url_to_fs(self.uri, **self.s3.fsspec_options(self.uri))

    def table_uri(self, name: str) -> str:
        return f"{self.uri}/{name}.lance"

    def dataset(self, name: str, version: int | None = None) -> LanceDataset:
        try:
            return lance.dataset(self.table_uri(name), version=version, storage_options=self.storage_options or None)
        except (OSError, ValueError) as exc:
            if access_refused(exc):  # other errors (server down, ...) keep their own type for the caller
                raise StoreError(f"store {self.uri}: access to {name} refused (403 Forbidden); {ACCESS_HINT}") from None
            raise

    def exists(self) -> bool:
        return self.fs.exists(f"{self.path}/{STORE_CARD}")

    # ---- card -----------------------------------------------------------------------------------------

    def _read_json(self, name: str, attempt: int = 0) -> dict[str, Any] | None:
        try:
            with self.fs.open(f"{self.path}/{name}", "r") as handle:
                return json.load(handle)
        except FileNotFoundError:
            return None
        except PermissionError as exc:
            raise StoreError(f"store {self.uri}: access to {name} refused ({exc}); {ACCESS_HINT}") from None
        except (OSError, ValueError) as exc:
            if attempt < 3 and getattr(exc, "errno", None) == errno.EBUSY:
                # s3fs FileExpired: the object was replaced while we read it (two runs creating one store), or its
                # cached listing is stale; read it again
                self.fs.invalidate_cache(f"{self.path}/{name}")
                time.sleep(0.2 * (attempt + 1))
                return self._read_json(name, attempt + 1)
            raise StoreError(f"store {self.uri}: {name} is unreadable ({exc})") from None

    def _write_json_once(self, name: str, document: dict[str, Any]) -> dict[str, Any]:
        """Write ``name`` unless it exists (temp file + rename: readers never see half a file); returns what is
        there afterwards, which is another run's document if it won a race."""
        existing = self._read_json(name)
        if existing is not None:
            return existing
        self.fs.makedirs(self.path, exist_ok=True)
        staging = f"{self.path}/.{name}.{uuid.uuid4().hex}"
        with self.fs.open(staging, "w") as handle:
            json.dump(document, handle, indent=2, sort_keys=True)
        self.fs.mv(staging, f"{self.path}/{name}")
        return self._read_json(name) or document

    def read_card(self) -> dict[str, Any] | None:
        """The store card (``store.json``) with each dataset's target settings (``targets-<dataset>.json``)."""
        card = self._read_json(STORE_CARD)
        if card is None:
            return None
        self._check_format(card)
        card["targets"] = {}
        for dataset in ("sa-1b", "sa-v"):
            targets = self._read_json(f"targets-{dataset}.json")
            if targets is not None:
                card["targets"][dataset] = targets
        return card

    def require_card(self) -> dict[str, Any]:
        """The store card, or a StoreError saying the URI is not a store (for commands that read one)."""
        card = self.read_card()
        if card is None:
            raise StoreError(f"{self.uri} is not an esam3 store (no store.json)")
        return card

    def failure(self, doing: str, exc: BaseException) -> StoreError:
        """A storage error while ``doing`` something to the store, as one line (with the credentials hint on a 403)."""
        hint = f"; {ACCESS_HINT}" if access_refused(exc) else ""
        return StoreError(f"store {self.uri}: cannot {doing} ({first_line(exc)}){hint}")

    def _check_format(self, card: dict[str, Any]) -> None:
        if card.get("format") != STORE_FORMAT:
            raise StoreError(
                f"store {self.uri} has format {card.get('format')!r}; this esam3 reads and writes format {STORE_FORMAT} "
                "(student inputs and ground-truth masks in every row, which an older store lacks and cannot get without "
                "its source): cache into a new --store, or use the esam3 release that wrote it"
            )

    def open_for(self, teacher: dict[str, Any], targets: dict[str, Any]) -> dict[str, Any]:
        """Create the store (card + empty tables) or check that it holds this teacher's targets of this kind.

        A store holds one teacher; each dataset in it one target spec. Another teacher or spec is refused (use
        another store) rather than mixing rows that a trainer could not tell apart. Each part of the card is
        its own file, written once, so runs of different datasets can create a store at the same time.
        """
        card = self._write_json_once(STORE_CARD, {"format": STORE_FORMAT, "teacher": teacher, "created": _now().isoformat()})
        self._check_format(card)
        if card["teacher"]["checksum"] != teacher["checksum"]:
            raise StoreError(
                f"store {self.uri} holds targets of teacher {card['teacher']['checksum']} ({card['teacher']['source']}); "
                f"this run's teacher is {teacher['checksum']} ({teacher['source']}): use another --store"
            )
        dataset = targets["dataset"]
        existing = self._write_json_once(f"targets-{dataset}.json", targets)
        if existing != targets:
            changed = sorted(k for k in set(existing) | set(targets) if existing.get(k) != targets.get(k))
            raise StoreError(
                f"store {self.uri} holds {dataset} targets made with other settings ({', '.join(changed)} differ); "
                "rerun with the same settings, or use another --store"
            )
        for name in TABLES:
            self.create_table(name)
        return {**card, "targets": {dataset: targets}}

    # ---- low-rank basis ----------------------------------------------------------------------------

    def basis_path(self, dataset: str) -> str:
        return f"{self.path}/basis-{dataset}.bin"

    def read_basis(self, dataset: str, settle: float = 0.0) -> Basis | None:
        """The stored basis, once it has been in place for ``settle`` seconds (waiting if it is newer).

        Two teacher actors that fit a basis at the same moment may both find none and both rename theirs into
        place (no store here has an atomic create-if-absent); the last rename wins within a moment. A writer
        that caches the basis for its lifetime passes ``settle`` so that it never keeps the loser's.
        """
        path = self.basis_path(dataset)
        try:
            for _ in range(3 if settle > 0 else 0):  # again after a wait: a late rename restarts the clock
                age = time.time() - _modified(self.fs.info(path))
                if age >= settle:
                    break
                time.sleep(min(settle - age, 2 * settle))  # capped: a storage clock ahead of ours
            with self.fs.open(path, "rb") as handle:
                return Basis.from_bytes(handle.read())
        except FileNotFoundError:
            return None

    def write_basis_once(self, dataset: str, basis: Basis) -> Basis:
        """Store the run's basis unless one is there (another actor won the race): returns the stored one."""
        existing = self.read_basis(dataset)
        if existing is not None:
            return existing
        staging = f"{self.path}/.basis-{dataset}.{uuid.uuid4().hex}"
        with self.fs.open(staging, "wb") as handle:
            handle.write(basis.to_bytes())
        if not self.fs.exists(self.basis_path(dataset)):
            self.fs.mv(staging, self.basis_path(dataset))
        else:
            self.fs.rm(staging)
        return self.read_basis(dataset) or basis

    def create_table(self, name: str) -> None:
        """An empty table with the store schema; a no-op (race included) when it exists."""
        try:
            lance.write_dataset(
                SCHEMAS[name].empty_table(), self.table_uri(name), mode="create",
                data_storage_version=LANCE_FILE_VERSION, storage_options=self.storage_options or None,
            )
        except OSError as exc:
            if "already exists" not in str(exc):
                raise

    # ---- ledger ---------------------------------------------------------------------------------------

    def ledger(self) -> pa.Table:
        return self.dataset("ledger").to_table()

    def finished_shards(self, dataset: str, fingerprint: str) -> set[str]:
        table = self.dataset("ledger").to_table(
            columns=["shard"], filter=f"dataset = '{dataset}' AND fingerprint = '{fingerprint}'"
        )
        return set(table.column("shard").to_pylist())

    def forget_unfinished(self, table: str, shards: Sequence[str]) -> int:
        """Delete rows of these (unfinished) shards from ``table`` and the failures table; returns rows deleted."""
        if not shards:
            return 0
        removed = 0
        for name in (table, "failures"):
            ds = self.dataset(name)
            where = f"shard IN ({_quote(shards)})"
            count = ds.count_rows(filter=where)
            if count:
                ds.delete(where)
                removed += count
        if removed:
            log.warning("removed %d rows of %d unfinished shard(s) left by an earlier run", removed, len(shards))
        return removed

    # ---- commits --------------------------------------------------------------------------------------

    def commit_shard(
        self,
        table: str,
        dataset: str,
        shard: str,
        source: str,
        fragments: Sequence[dict[str, Any]],
        failures: Sequence[dict[str, Any]],
        rows: int,
        nbytes: int,
        run_id: str,
        fingerprint: str,
        samples: int = -1,
        keys: Sequence[str] = (),
    ) -> tuple[int, int, int]:
        """Make one shard visible: its fragments, then its failures, then its ledger row.

        Returns (table version, rows stored, failed samples: failure records of distinct members).

        Keys the table already holds (the same image in two shards) are deleted again from this shard's rows
        and recorded as failures, before the ledger row: a key is never stored twice.
        """
        version = self.dataset(table).version
        key_column = "key" if table == "images" else "video_id"
        shard_keys = sorted({k if table == "images" else k.split("/")[1] for k in keys})
        taken = self._existing(table, key_column, shard_keys) if shard_keys else {}
        if fragments:
            metadata = [FragmentMetadata.from_json(json.dumps(f)) for f in fragments]
            # Appends commute: Lance rebases this commit onto whatever other writers committed since read_version.
            version = LanceDataset.commit(
                self.table_uri(table), LanceOperation.Append(metadata), read_version=version,
                storage_options=self.storage_options or None,
            ).version
        if taken:
            where = f"shard = '{shard.replace(chr(39), chr(39) * 2)}' AND {key_column} IN ({_quote(taken)})"
            dataset_now = self.dataset(table)
            removed = dataset_now.count_rows(filter=where)
            dataset_now.delete(where)
            version = self.dataset(table).version
            rows -= removed
            failures = [*failures, *({"dataset": dataset, "shard": shard, "member": key, "run_id": run_id,
                                      "reason": f"duplicate key {key}: already stored from {other}"} for key, other in taken.items())]
        if failures:
            self.append("failures", pa.Table.from_pylist([{k: f[k] for k in SCHEMAS["failures"].names} for f in failures], schema=SCHEMAS["failures"]))
        failed = len({f["member"] for f in failures})  # samples: a video with several failed frames counts once
        ledger_row = {
            "dataset": dataset, "shard": shard, "source": source, "samples": samples, "rows": rows, "failures": failed, "bytes": nbytes,
            "run_id": run_id, "fingerprint": fingerprint, "committed_at": _now(),
        }
        self.append("ledger", pa.Table.from_pylist([ledger_row], schema=SCHEMAS["ledger"]))
        return version, rows, failed

    def _existing(self, table: str, column: str, keys: Sequence[str]) -> dict[str, str]:
        """Which of ``keys`` the table already holds, and from which shard."""
        found: dict[str, str] = {}
        ds = self.dataset(table)  # one open (a manifest read) for every chunk
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            rows = ds.to_table(columns=[column, "shard"], filter=f"{column} IN ({_quote(chunk)})")
            found.update(zip(rows.column(column).to_pylist(), rows.column("shard").to_pylist()))
        return found

    def index_keys(self, table: str, attempts: int = 4, merge: bool = False) -> None:
        """Keep the table's scalar (BTREE) indexes on its key columns up to date after a commit: created on first use,
        then a segment per commit for the new fragments (merged every ``INDEX_SEGMENTS``), so the cross-shard
        duplicate check and key lookups do not scan the table.

        ``merge`` merges every segment now (``store compact`` does before compacting: Lance does not merge fragments
        that different index segments cover). Another run committing at the same moment makes Lance refuse an index commit (a retryable conflict): tried
        again, then left for the next commit with a warning, since an index only speeds reads up.
        """
        for attempt in range(attempts):
            try:
                self._update_indexes(table, merge)
                return
            except OSError as exc:
                if "conflict" not in str(exc).lower() and "preempted" not in str(exc).lower():
                    raise
                time.sleep(0.1 * (attempt + 1))
        log.warning("%s: indexes not updated after %d tries (other runs committing); the next commit updates them", table, attempts)

    def _update_indexes(self, table: str, merge_all: bool = False) -> None:
        ds = self.dataset(table)
        if ds.count_rows() == 0:
            return
        present = {index.field_names[0] for index in ds.describe_indices()}
        for column in KEY_COLUMNS[table]:
            if column not in present:
                ds.create_scalar_index(column, "BTREE")
                ds = self.dataset(table)
        for column in KEY_COLUMNS[table]:
            if column in present:
                # A new index segment for the new fragments only; all segments merged once there are many. Merging
                # every commit rewrote the whole index each time: 59 GB of index files after ~900 SA-1B-sized shards
                # (benchmarks/store_scale.py), and a cost per commit growing with the store.
                name = f"{column}_idx"
                segments = int(ds.stats.index_stats(name).get("num_segments", 1))
                merge = segments if segments >= INDEX_SEGMENTS or (merge_all and segments > 1) else 0
                ds.optimize.optimize_indices(index_names=[name], num_indices_to_merge=merge)

    def append(self, name: str, table: pa.Table) -> None:
        lance.write_dataset(table, self.table_uri(name), mode="append", storage_options=self.storage_options or None)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _modified(info: dict[str, Any]) -> float:
    """Last-modified time (epoch seconds) of an fsspec ``info`` entry: local ``mtime`` or S3 ``LastModified``."""
    if "mtime" in info:
        return float(info["mtime"])
    stamp = info.get("LastModified") or info.get("last_modified")
    if isinstance(stamp, dt.datetime):
        return stamp.timestamp()
    return time.time() - 3600.0  # no time known: treat it as settled
