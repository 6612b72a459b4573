"""The per-shard streaming writer: pieces of a shard from many tasks become one fragment; pieces delivered twice
(a retried task) count once; an abort or a write error ends the shard without a fragment anyone commits."""

from __future__ import annotations

import json
from pathlib import Path

import lance
import pyarrow as pa
import pytest

import esam3.workers.shard_writer as shard_writer
from esam3.schemas.store import IMAGES, LANCE_FILE_VERSION
from esam3.workers.shard_writer import ShardWriter
from esam3.workers.write_step import encoded_schema

SCHEMA = encoded_schema(IMAGES)


def piece(shard: str, keys: list[str], end: int | None = None, failures: list[str] = (), abort: str | None = None) -> pa.Table:
    rows = [{"kind": "sample", "key": k, "shard": shard, "member": f"{k}.jpg", "stored_bytes": 10} for k in keys]
    rows += [{"kind": "failure", "shard": shard, "member": m, "reason": "bad", "weight": 1} for m in failures]
    if end is not None:
        rows.append({"kind": "end", "shard": shard, "end_count": end, "end_samples": end})
    if abort:
        rows.append({"kind": "abort", "shard": shard, "reason": abort})
    return pa.Table.from_pylist(rows, schema=SCHEMA)


@pytest.fixture()
def table(tmp_path: Path) -> str:
    uri = str(tmp_path / "images.lance")
    lance.write_dataset(IMAGES.empty_table(), uri, data_storage_version=LANCE_FILE_VERSION)
    return uri


def test_pieces_of_a_shard_become_one_fragment_and_repeats_count_once(table: str) -> None:
    writer = ShardWriter(table, IMAGES)
    first = writer.add("s0", piece("s0", ["a", "b"]))
    assert not first["final"] and first["rows"] == 2
    again = writer.add("s0", piece("s0", ["a", "b"]))  # a retried task delivers its piece again
    assert not again["final"] and again["rows"] == 0
    other = writer.add("s1", piece("s1", ["x"], end=1))  # shards interleave; s1 is complete at once
    assert other["final"] and other["rows"] == 1 and len(json.loads(other["fragments"])) == 1
    final = writer.add("s0", piece("s0", ["c"], end=4, failures=["d.jpg"]))
    assert final["final"] and final["rows"] == 3 and final["keys"] == json.dumps(["a", "b", "c"]) and final["bytes"] == 30
    assert json.loads(final["failures"]) == [{"member": "d.jpg", "reason": "bad", "weight": 1}] and final["end_count"] == 4
    assert writer.add("s0", piece("s0", ["c"], end=4)) == final  # a finished shard answers with its totals again
    fragments = json.loads(final["fragments"])
    assert len(fragments) == 1 and fragments[0]["physical_rows"] == 3


def test_an_abort_ends_the_shard_without_fragments(table: str) -> None:
    writer = ShardWriter(table, IMAGES)
    writer.add("s0", piece("s0", ["a"]))
    aborted = writer.add("s0", piece("s0", [], abort="connection reset"))
    assert aborted["final"] and aborted["aborted"] == "connection reset" and json.loads(aborted["fragments"]) == []


def test_a_write_error_aborts_that_shard_and_a_403_stops_the_run(table: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(reader, *args, **kwargs):
        reader.read_next_batch()
        raise OSError("LanceError(IO): disk full")

    monkeypatch.setattr(shard_writer, "write_fragments", disk_full)
    writer = ShardWriter(table, IMAGES)
    writer.add("s0", piece("s0", ["a"]))
    done = writer.add("s0", piece("s0", ["b"], end=2))
    assert done["final"] and "writing its rows failed" in done["aborted"] and json.loads(done["fragments"]) == []

    def refused(reader, *args, **kwargs):
        raise PermissionError("403 Forbidden")

    monkeypatch.setattr(shard_writer, "write_fragments", refused)
    writer = ShardWriter(table, IMAGES)
    with pytest.raises(Exception, match="writing refused"):
        writer.add("s1", piece("s1", ["a"], end=1))
    writer.close()
