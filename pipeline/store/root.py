"""One store root: its card, its Lance tables, and what every part of the store needs to read and write them.

Only drivers commit rows (``commits.py``: fenced shard commits); workers write Lance fragments (data files nobody
sees until a commit) and hand back their metadata. Fragment files written by a worker that died before reporting
are never committed (``store cleanup`` removes them when no writer runs).
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import fsspec
import lance
import pyarrow as pa
from lance import LanceDataset

from esam3.pipeline.object_store import ACCESS_HINT, ENDPOINT_HINT, S3Settings, access_refused, is_s3, storage_errors
from esam3.pipeline.store.once import create_once, fences
from esam3.schemas.codecs import Basis
from esam3.schemas.errors import first_line
from esam3.schemas.store import KEY_COLUMNS, LANCE_FILE_VERSION, SCHEMAS, STORE_CARD, STORE_FORMAT, TABLES, StoreError

log = logging.getLogger(__name__)
T = TypeVar("T")


#: Index segments (one per commit) a key index collects before a commit merges them into one.
INDEX_SEGMENTS = 32


def quote_sql(values: Iterable[str]) -> str:
    """String literals for a Lance SQL filter: ``'a', 'b'``."""
    return ", ".join("'" + v.replace("'", "''") + "'" for v in values)


def conflicted(exc: BaseException) -> bool:
    """Whether a Lance write failed because another writer committed first (retryable)."""
    text = str(exc).lower()
    return "conflict" in text or "preempted" in text


def retry_conflicts(action: Callable[[], T], what: str, attempts: int = 5) -> T:
    """Run a Lance write again when another writer's commit made it conflict."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except OSError as exc:
            if not conflicted(exc) or attempt == attempts:
                raise
            log.debug("%s conflicted with another commit (attempt %d): %s", what, attempt, first_line(exc))
            time.sleep(0.1 * attempt)
    raise AssertionError("unreachable: the last attempt returns or raises")


class Store:
    """A store root: a local folder or an fsspec/object-store URL (``s3://bucket/prefix``)."""

    def __init__(self, uri: str, s3: S3Settings | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.s3 = s3 or S3Settings.from_environment()
        self.fs, self.path = fsspec.core.url_to_fs(self.uri, **self.s3.fsspec_options(self.uri))

    @property
    def storage_options(self) -> dict[str, str]:
        """Lance's options for this store, credentials resolved now (they may have been refreshed); never logged."""
        return self.s3.lance_options(self.uri)

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
        """Create ``name`` unless it exists (see ``once.create_once``); returns what is there afterwards, which is
        another run's document if that run created it first."""
        existing = self._read_json(name)
        if existing is not None:
            return existing
        create_once(self.fs, f"{self.path}/{name}", json.dumps(document, indent=2, sort_keys=True).encode())
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
                "(format 3 added student inputs and ground-truth masks to every row, format 4 the mask outputs the "
                "tracker uses and their measured error): cache into a new --store, or use the esam3 release that wrote it"
            )

    def check_writable(self) -> bool:
        """Before a run loads anything: the store can be written (a probe file created twice and removed), or a
        StoreError says why, with the fix for a local folder or for S3. Returns whether the storage fences
        (see ``once.fences``)."""
        s3 = is_s3(self.uri)
        try:
            self.fs.makedirs(self.path, exist_ok=True)
            return fences(self.fs, self.path)
        except (FileExistsError, NotADirectoryError):
            raise StoreError(f"store {self.uri} is a file, not a folder: give --store a new folder or an esam3 store") from None
        except PermissionError as exc:
            fix = ACCESS_HINT if s3 else "give --store a folder you can write to"
            raise StoreError(f"store {self.uri}: cannot write there ({first_line(exc)}); {fix}") from None
        except FileNotFoundError as exc:
            fix = "create the bucket first, or check the store URL" if s3 else "check the --store path"
            raise StoreError(f"store {self.uri}: not found ({first_line(exc)}); {fix}") from None
        except storage_errors() as exc:
            if access_refused(exc):
                raise StoreError(f"store {self.uri}: access refused ({first_line(exc)}); {ACCESS_HINT}") from None
            fix = f"; {ENDPOINT_HINT}" if s3 else ""
            raise StoreError(f"store {self.uri}: cannot be written ({first_line(exc)}){fix}") from None

    def check_settings(self, targets: dict[str, Any]) -> None:
        """Before a run loads its teacher: settings other than the teacher that differ from those the store holds
        for the dataset are refused (the teacher itself is checked once its checksum is known, in ``open_for``)."""
        existing = self._read_json(f"targets-{targets['dataset']}.json")
        if existing is not None:
            _refuse_other_settings(self.uri, existing, targets, ignore=("teacher", "fingerprint"))

    def check_teacher(self, teacher: dict[str, Any], card: dict[str, Any] | None = None) -> None:
        """A store holds one teacher's targets: another teacher (checksum) is refused; a store without a card yet
        takes any."""
        card = card if card is not None else self.read_card()
        if card is not None and card["teacher"]["checksum"] != teacher["checksum"]:
            raise StoreError(
                f"store {self.uri} holds targets of teacher {card['teacher']['checksum']} ({card['teacher']['source']}); "
                f"this run's teacher is {teacher['checksum']} ({teacher['source']}): use another --store"
            )

    def open_for(self, teacher: dict[str, Any], targets: dict[str, Any]) -> dict[str, Any]:
        """Create the store (card + empty tables) or check that it holds this teacher's targets of this kind.

        A store holds one teacher; each dataset in it one target spec. Another teacher or spec is refused (use
        another store) rather than mixing rows that a trainer could not tell apart. Each part of the card is
        its own file, written once, so runs of different datasets can create a store at the same time.
        """
        card = self._write_json_once(STORE_CARD, {"format": STORE_FORMAT, "teacher": teacher, "created": _now().isoformat()})
        self._check_format(card)
        self.check_teacher(teacher, card)
        dataset = targets["dataset"]
        existing = self._write_json_once(f"targets-{dataset}.json", targets)
        _refuse_other_settings(self.uri, existing, targets)
        for name in TABLES:
            self.create_table(name)
        return {**card, "targets": {dataset: targets}}

    # ---- codec chosen by --codec auto ---------------------------------------------------------------

    def read_codec_choice(self, dataset: str) -> dict[str, Any] | None:
        """What ``--codec auto`` measured and chose for ``dataset`` (``codec-<dataset>.json``), if it ran."""
        return self._read_json(f"codec-{dataset}.json")

    def write_codec_choice_once(self, dataset: str, choice: dict[str, Any]) -> dict[str, Any]:
        """Store the choice unless one is there; returns the stored one (another run's, if it chose first)."""
        return self._write_json_once(f"codec-{dataset}.json", choice)

    # ---- low-rank basis ----------------------------------------------------------------------------

    def basis_path(self, dataset: str) -> str:
        return f"{self.path}/basis-{dataset}.bin"

    def read_basis(self, dataset: str) -> Basis | None:
        """The stored basis: created once (``write_basis_once``), so every reader gets the same one."""
        try:
            with self.fs.open(self.basis_path(dataset), "rb") as handle:
                return Basis.from_bytes(handle.read())
        except FileNotFoundError:
            return None

    def write_basis_once(self, dataset: str, basis: Basis) -> Basis:
        """Store the run's basis unless one is there (another actor created it first): returns the stored one."""
        if create_once(self.fs, self.basis_path(dataset), basis.to_bytes()):
            return basis
        return self.read_basis(dataset) or basis

    def create_table(self, name: str) -> None:
        """An empty table with the store schema; a no-op (race included) when it exists."""
        try:
            lance.write_dataset(
                SCHEMAS[name].empty_table(),
                self.table_uri(name),
                mode="create",
                data_storage_version=LANCE_FILE_VERSION,
                storage_options=self.storage_options or None,
            )
        except OSError as exc:
            if "already exists" not in str(exc):
                raise

    def index_keys(self, table: str, attempts: int = 4, merge: bool = False) -> None:
        """Keep the table's scalar (BTREE) indexes on its key columns up to date after a commit: created on first use,
        then a segment per commit for the new fragments (merged every ``INDEX_SEGMENTS``), so the cross-shard
        duplicate check and key lookups do not scan the table.

        ``merge`` merges every segment now (``store compact`` does before compacting: Lance does not merge fragments
        that different index segments cover). Another run committing at the same moment makes Lance refuse an index commit (a retryable conflict): tried
        again, then left for the next commit with a warning, since an index only speeds reads up.
        """
        try:
            retry_conflicts(lambda: self._update_indexes(table, merge), f"updating {table}'s indexes", attempts)
        except OSError as exc:
            if not conflicted(exc):
                raise
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


def _refuse_other_settings(uri: str, existing: dict[str, Any], targets: dict[str, Any], ignore: tuple[str, ...] = ()) -> None:
    changed = sorted(k for k in set(existing) | set(targets) if k not in ignore and existing.get(k) != targets.get(k))
    if changed:
        raise StoreError(
            f"store {uri} holds {targets['dataset']} targets made with other settings ({', '.join(changed)} differ); "
            "rerun with the same settings, or use another --store"
        )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)
