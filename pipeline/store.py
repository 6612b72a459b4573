"""One store root: its card, its Lance tables, the ledger, and the commits that make rows visible.

Only the driver commits. Workers write Lance fragments (data files nobody sees yet) and hand back their
metadata; the driver commits all fragments of a shard in one ``Append``, then that shard's failures, then its
ledger row. A crash before the ledger row leaves rows of an unfinished shard: :meth:`Store.forget_unfinished`
deletes them before the shard is run again, so a rerun never duplicates a key. Fragment files written by a
worker that died before reporting are never committed (``lance`` cleanup can remove them when no writer runs).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import fsspec
import lance
import pyarrow as pa
from lance import LanceDataset, LanceOperation
from lance.fragment import FragmentMetadata

from esam3.schemas.store import SCHEMAS, STORE_CARD, STORE_FORMAT, TABLES, StoreError

log = logging.getLogger(__name__)


def _quote(values: Iterable[str]) -> str:
    return ", ".join("'" + v.replace("'", "''") + "'" for v in values)


class Store:
    """A store root: a local folder or an fsspec/object-store URL (``s3://bucket/prefix``)."""

    def __init__(self, uri: str, storage_options: dict[str, str] | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.storage_options = storage_options or {}
        self.fs, self.path = fsspec.core.url_to_fs(self.uri, **_fsspec_options(self.storage_options))

    def table_uri(self, name: str) -> str:
        return f"{self.uri}/{name}.lance"

    def dataset(self, name: str, version: int | None = None) -> LanceDataset:
        return lance.dataset(self.table_uri(name), version=version, storage_options=self.storage_options or None)

    def exists(self) -> bool:
        return self.fs.exists(f"{self.path}/{STORE_CARD}")

    # ---- card -----------------------------------------------------------------------------------------

    def read_card(self) -> dict[str, Any] | None:
        try:
            with self.fs.open(f"{self.path}/{STORE_CARD}", "r") as handle:
                card = json.load(handle)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StoreError(f"store {self.uri}: {STORE_CARD} is unreadable ({exc})") from None
        if card.get("format") != STORE_FORMAT:
            raise StoreError(f"store {self.uri}: format {card.get('format')!r}, this esam3 writes {STORE_FORMAT}")
        return card

    def open_for(self, teacher: dict[str, Any], targets: dict[str, Any]) -> dict[str, Any]:
        """Create the store (card + empty tables) or check that it holds this teacher's targets of this kind.

        A store holds one teacher; each dataset in it one target spec. Another teacher or spec is refused (use
        another store) rather than mixing rows that a trainer could not tell apart.
        """
        card = self.read_card()
        dataset = targets["dataset"]
        if card is None:
            card = {"format": STORE_FORMAT, "teacher": teacher, "targets": {}, "created": _now().isoformat()}
        elif card["teacher"]["checksum"] != teacher["checksum"]:
            raise StoreError(
                f"store {self.uri} holds targets of teacher {card['teacher']['checksum']} ({card['teacher']['source']}); "
                f"this run's teacher is {teacher['checksum']} ({teacher['source']}): use another --store"
            )
        existing = card["targets"].get(dataset)
        if existing is not None and existing != targets:
            changed = sorted(k for k in set(existing) | set(targets) if existing.get(k) != targets.get(k))
            raise StoreError(
                f"store {self.uri} holds {dataset} targets made with other settings ({', '.join(changed)} differ); "
                "rerun with the same settings, or use another --store"
            )
        if existing is None:
            card["targets"][dataset] = targets
            self.fs.makedirs(self.path, exist_ok=True)
            with self.fs.open(f"{self.path}/{STORE_CARD}", "w") as handle:
                json.dump(card, handle, indent=2, sort_keys=True)
        for name in TABLES:
            self.create_table(name)
        return card

    def create_table(self, name: str) -> None:
        """An empty table with the store schema; a no-op (race included) when it exists."""
        try:
            lance.write_dataset(
                SCHEMAS[name].empty_table(), self.table_uri(name), mode="create",
                storage_options=self.storage_options or None,
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
    ) -> int:
        """Make one shard visible: its fragments, then its failures, then its ledger row. Returns the table version."""
        version = self.dataset(table).version
        if fragments:
            metadata = [FragmentMetadata.from_json(json.dumps(f)) for f in fragments]
            # Appends commute: Lance rebases this commit onto whatever other writers committed since read_version.
            version = LanceDataset.commit(
                self.table_uri(table), LanceOperation.Append(metadata), read_version=version,
                storage_options=self.storage_options or None,
            ).version
        if failures:
            self.append("failures", pa.Table.from_pylist(list(failures), schema=SCHEMAS["failures"]))
        ledger_row = {
            "dataset": dataset, "shard": shard, "source": source, "rows": rows, "failures": len(failures), "bytes": nbytes,
            "run_id": run_id, "fingerprint": fingerprint, "committed_at": _now(),
        }
        self.append("ledger", pa.Table.from_pylist([ledger_row], schema=SCHEMAS["ledger"]))
        return version

    def append(self, name: str, table: pa.Table) -> None:
        lance.write_dataset(table, self.table_uri(name), mode="append", storage_options=self.storage_options or None)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _fsspec_options(storage_options: dict[str, str]) -> dict[str, Any]:
    """Lance storage options (aws_*) -> s3fs keyword arguments, for the card file."""
    options: dict[str, Any] = {}
    if "aws_access_key_id" in storage_options:
        options["key"] = storage_options["aws_access_key_id"]
    if "aws_secret_access_key" in storage_options:
        options["secret"] = storage_options["aws_secret_access_key"]
    if "aws_endpoint" in storage_options:
        options["client_kwargs"] = {"endpoint_url": storage_options["aws_endpoint"]}
    return options
