"""Trainer-side reads: shuffled batches of stage-1 rows from the store, next to the layouts people use today.

The same N rows (SAM3's trunk 1024x72x72 encoded with one codec: the bytes a trainer fetches per image) in:

* the esam3 store: a Lance table with the ``tensor`` struct column, read with ``take`` of a shuffled batch;
* the same bytes as a top-level Lance blob column (``lance-encoding:blob``), read with ``take_blobs``: the
  candidate layout for big tensors;
* (a) one ``.npy`` file per row, read with ``np.load``;
* (b) the public recipe's fixed-record layout: a keys file + one values file of fixed-size records, read by seek;

on local disk, and the Lance table and the fixed-record file on a SeaweedFS S3 server on 127.0.0.1 (range reads
through s3fs). Rows/s and MB/s per layout; files were just written, so local reads come mostly from the page
cache for every layout alike. Prints one JSON line.

    python benchmarks/store_read.py [--rows 48] [--batch 8] [--codec int8] [--no-s3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from esam3.schemas.codecs import encode_features
from esam3.schemas.store import TENSOR, tensor_value

SCHEMA = pa.schema([("key", pa.string()), ("trunk", TENSOR)])
#: The candidate layout: the same bytes as a top-level Lance blob column (read as files, not as Arrow values).
BLOB_SCHEMA = pa.schema([pa.field("key", pa.string()), pa.field("trunk", pa.large_binary(), metadata={"lance-encoding:blob": "true"})])


def make_rows(n: int, codec: str, channels: int, side: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        x = rng.normal(size=(channels, side, side)).astype(np.float32)
        rows.append({"key": f"sa1b/{i}", "trunk": tensor_value(*encode_features(x, codec))})
    return rows


def record_bytes(row: dict[str, Any]) -> bytes:
    return row["trunk"]["data"] + row["trunk"]["scale"]


def timed(read_batch: Any, order: np.ndarray, batch: int, record: int) -> dict[str, float]:
    start = time.perf_counter()
    total = 0
    for s in range(0, len(order), batch):
        total += read_batch(order[s : s + batch])
    seconds = time.perf_counter() - start
    assert total == len(order) * record, (total, len(order) * record)
    return {"rows_per_s": round(len(order) / seconds, 1), "mb_per_s": round(total / seconds / 1e6, 1)}


def lance_reader(uri: str, options: dict[str, str] | None) -> Any:
    ds = lance.dataset(uri, storage_options=options)

    def read(indices: np.ndarray) -> int:
        trunk = ds.take(indices.tolist(), columns=["trunk"]).column("trunk").combine_chunks()
        # Arrow buffers, no copy into Python objects: what a reader hands to numpy / torch.
        return int(pc.sum(pc.binary_length(trunk.field("data"))).as_py() + pc.sum(pc.binary_length(trunk.field("scale"))).as_py())

    return read


def blob_reader(uri: str, options: dict[str, str] | None) -> Any:
    ds = lance.dataset(uri, storage_options=options)

    def read(indices: np.ndarray) -> int:
        return sum(len(blob.read()) for blob in ds.take_blobs("trunk", indices=indices.tolist()))

    return read


def fixed_record_reader(opener: Any, record: int) -> Any:
    def read(indices: np.ndarray) -> int:
        got = 0
        with opener() as handle:
            for i in sorted(indices.tolist()):  # a good reader sorts its seeks
                handle.seek(int(i) * record)
                got += len(handle.read(record))
        return got

    return read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=48, help="rows (images)")
    parser.add_argument("--batch", type=int, default=8, help="rows per shuffled batch")
    parser.add_argument("--codec", default="int8", choices=["fp16", "bf16", "int8"], help="trunk codec")
    parser.add_argument("--channels", type=int, default=1024, help="trunk width (SAM3: 1024)")
    parser.add_argument("--side", type=int, default=72, help="token grid side (SAM3: 72)")
    parser.add_argument("--no-s3", action="store_true", help="skip the SeaweedFS part")
    args = parser.parse_args()
    if args.rows < 1 or args.batch < 1:
        parser.error("--rows and --batch must be positive")
    out = Path(tempfile.mkdtemp(prefix="esam3-bench-read-"))
    rows = make_rows(args.rows, args.codec, args.channels, args.side)
    record = len(record_bytes(rows[0]))
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    lance.write_dataset(table, str(out / "store.lance"), max_rows_per_group=8)
    blobs = pa.table({"key": [r["key"] for r in rows], "trunk": [record_bytes(r) for r in rows]}, schema=BLOB_SCHEMA)
    lance.write_dataset(blobs, str(out / "blob.lance"), max_rows_per_group=8)
    (out / "npy").mkdir()
    for i, row in enumerate(rows):
        np.save(out / "npy" / f"{i}.npy", np.frombuffer(record_bytes(row), dtype=np.uint8))
    (out / "keys.json").write_text(json.dumps([r["key"] for r in rows]))
    with open(out / "values.bin", "wb") as handle:
        for row in rows:
            handle.write(record_bytes(row))
    order = np.random.default_rng(1).permutation(args.rows)
    result: dict[str, Any] = {
        "benchmark": "store_read", "rows": args.rows, "batch": args.batch, "codec": args.codec,
        "mb_per_row": round(record / 1e6, 3),
    }
    result["local_lance_store"] = timed(lance_reader(str(out / "store.lance"), None), order, args.batch, record)
    result["local_lance_blob"] = timed(blob_reader(str(out / "blob.lance"), None), order, args.batch, record)
    result["local_npy_per_row"] = timed(
        lambda idx: sum(np.load(out / "npy" / f"{i}.npy").nbytes for i in idx), order, args.batch, record
    )
    result["local_fixed_record"] = timed(fixed_record_reader(lambda: open(out / "values.bin", "rb"), record), order, args.batch, record)
    if not args.no_s3:
        result.update(s3_part(out, table, blobs, record, order, args.batch))
    print(json.dumps(result))


def s3_part(out: Path, table: pa.Table, blobs: pa.Table, record: int, order: np.ndarray, batch: int) -> dict[str, Any]:
    import fsspec

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from esam3.pipeline.object_store import S3Settings
    from tests.s3_server import s3_server

    (out / "s3").mkdir()
    with s3_server(out / "s3") as server:
        settings = S3Settings(endpoint=server.endpoint, region="us-east-1", key="bench", secret="bench")
        fs = fsspec.filesystem("s3", **settings.fsspec_options("s3://x"))
        fs.mkdir("bench")
        options = settings.lance_options("s3://bench")
        lance.write_dataset(table, "s3://bench/store.lance", max_rows_per_group=8, storage_options=options)
        lance.write_dataset(blobs, "s3://bench/blob.lance", max_rows_per_group=8, storage_options=options)
        fs.put_file(str(out / "values.bin"), "bench/values.bin")
        return {
            "s3_lance_store": timed(lance_reader("s3://bench/store.lance", options), order, batch, record),
            "s3_lance_blob": timed(blob_reader("s3://bench/blob.lance", options), order, batch, record),
            "s3_fixed_record": timed(
                fixed_record_reader(lambda: fs.open("bench/values.bin", "rb", block_size=record), record), order, batch, record
            ),
        }


if __name__ == "__main__":
    main()
