"""Trainer-side reads: shuffled batches of stage-1 rows from the store, next to the layouts people use today.

The same N rows (SAM3's trunk, 1024x72x72, encoded with one codec: the bytes a trainer fetches per image) in:

* the esam3 store: an ``images`` table made by ``Store``, read with ``StoreRows.take`` (Lance take for the small
  fields + the trunk blobs read on a thread pool), once into new ``bytes`` per row and once into buffers the
  reader reuses from batch to batch (``reuse_buffers=True``, as the fixed-record reader below reuses its array);
* (a) one ``.npy`` file per row, read with ``np.load``;
* (b) the public recipe's fixed-record layout: a keys file + one values file of fixed-size records, read by seek
  into a preallocated batch array, one record after the other as the public recipe does; and, as stronger
  baselines than anyone ships, the same file read with ``os.preadv`` on a thread pool like the store's reader
  (locally) and with every record of a batch requested at once (``s3fs.cat_ranges``, on S3);

each batch is held until the next one is read, as a trainer collates it. Local disk is measured twice: **cold**
(every benchmark file dropped from the page cache with ``posix_fadvise(DONTNEED)`` before the pass: reads come
from the disk, as for a store larger than RAM, which SA-1B's is) and **warm** (files in the page cache: memory
copies only). The store and the fixed-record file are also read from a SeaweedFS S3 server on 127.0.0.1 (range
reads through s3fs for the fixed-record file). Rows/s and MB/s per layout, best of ``--passes``; one JSON line.

    python benchmarks/store_read.py [--rows 64] [--batch 8] [--codec int8] [--no-s3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from esam3.pipeline.object_store import S3Settings  # noqa: E402
from esam3.pipeline.store import Store  # noqa: E402
from esam3.pipeline.store.rows import StoreRows  # noqa: E402
from esam3.schemas.codecs import encode_features  # noqa: E402
from esam3.schemas.store import IMAGES, tensor_value  # noqa: E402

Reader = Callable[[np.ndarray], Sequence[Any]]


def make_rows(n: int, codec: str, channels: int, side: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        x = rng.normal(size=(channels, side, side)).astype(np.float32)
        rows.append({"key": f"sa1b/{i}", "shard": "sa_000000.tar", "trunk": tensor_value(*encode_features(x, codec))})
    return rows


def record_bytes(row: dict[str, Any]) -> bytes:
    return row["trunk"]["data"] + row["trunk"]["scale"]


def drop_from_page_cache(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def timed(
    read: Reader, order: np.ndarray, batch: int, record: int, passes: int, before: Callable[[], None] = lambda: None
) -> dict[str, float]:
    best = 0.0
    for _ in range(passes):
        before()
        start = time.perf_counter()
        total = 0
        held: Sequence[Any] = ()
        for s in range(0, len(order), batch):
            held = read(order[s : s + batch])  # the previous batch stays alive until this one is read
            total += sum(len(item) for item in held)
        seconds = time.perf_counter() - start
        assert total == len(order) * record, (total, len(order) * record)
        best = max(best, len(order) / seconds)
    return {"rows_per_s": round(best, 1), "mb_per_s": round(best * record / 1e6, 1)}


def store_reader(uri: str, s3: S3Settings | None = None, reuse_buffers: bool = False) -> Reader:
    rows = StoreRows(Store(uri, s3), "images", reuse_buffers=reuse_buffers)

    def read(indices: np.ndarray) -> list[bytes]:
        return [part for r in rows.take(indices.tolist(), columns=["trunk"]) for part in (r["trunk"]["data"], r["trunk"]["scale"])]

    return read


def fixed_record_reader(opener: Callable[[], Any], record: int, batch: int) -> Reader:
    buffer = np.empty((batch, record), dtype=np.uint8)

    def read(indices: np.ndarray) -> list[np.ndarray]:
        with opener() as handle:
            for slot, i in enumerate(sorted(indices.tolist())):  # a good reader sorts its seeks
                handle.seek(int(i) * record)
                handle.readinto(memoryview(buffer[slot]))
        return list(buffer[: len(indices)])

    return read


def threaded_fixed_record_reader(path: Path, record: int, batch: int, threads: int = 8) -> Reader:
    buffer = np.empty((batch, record), dtype=np.uint8)
    pool = ThreadPoolExecutor(threads)

    def read(indices: np.ndarray) -> list[np.ndarray]:
        fd = os.open(path, os.O_RDONLY)
        try:
            jobs = [(slot, int(i)) for slot, i in enumerate(sorted(indices.tolist()))]
            list(pool.map(lambda job: os.preadv(fd, [buffer[job[0]]], job[1] * record), jobs))
        finally:
            os.close(fd)
        return list(buffer[: len(indices)])

    return read


def write_layouts(out: Path, rows: list[dict[str, Any]], s3: S3Settings | None = None, store_uri: str | None = None) -> None:
    """The esam3 store at ``store_uri`` (default ``out/store``); locally also .npy per row and the fixed-record file."""
    store = Store(store_uri or str(out / "store"), s3)
    store.create_table("images")
    store.append("images", pa.Table.from_pylist(rows, schema=IMAGES))
    if store_uri is None:
        (out / "npy").mkdir()
        for i, row in enumerate(rows):
            np.save(out / "npy" / f"{i}.npy", np.frombuffer(record_bytes(row), dtype=np.uint8))
        (out / "keys.json").write_text(json.dumps([r["key"] for r in rows]))
        with open(out / "values.bin", "wb") as handle:
            for row in rows:
                handle.write(record_bytes(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64, help="rows (images)")
    parser.add_argument("--batch", type=int, default=8, help="rows per shuffled batch")
    parser.add_argument("--codec", default="int8", choices=["fp16", "bf16", "int8"], help="trunk codec")
    parser.add_argument("--channels", type=int, default=1024, help="trunk width (SAM3: 1024)")
    parser.add_argument("--side", type=int, default=72, help="token grid side (SAM3: 72)")
    parser.add_argument("--passes", type=int, default=3, help="passes per measurement (the best is reported)")
    parser.add_argument("--no-s3", action="store_true", help="skip the SeaweedFS part")
    args = parser.parse_args()
    if min(args.rows, args.batch, args.passes, args.channels, args.side) < 1:
        parser.error("--rows, --batch, --passes, --channels and --side must be positive")
    out = Path(tempfile.mkdtemp(prefix="esam3-bench-read-", dir=os.environ.get("ESAM3_BENCH_DIR")))
    rows = make_rows(args.rows, args.codec, args.channels, args.side)
    record = len(record_bytes(rows[0]))
    write_layouts(out, rows)
    os.sync()
    order = np.random.default_rng(1).permutation(args.rows)
    layouts: dict[str, Reader] = {
        "store": store_reader(str(out / "store")),
        "store_reused_buffers": store_reader(str(out / "store"), reuse_buffers=True),
        "npy_per_row": lambda idx: [np.load(out / "npy" / f"{i}.npy") for i in idx],
        "fixed_record": fixed_record_reader(lambda: open(out / "values.bin", "rb"), record, args.batch),
        "fixed_record_threads": threaded_fixed_record_reader(out / "values.bin", record, args.batch),
    }
    result: dict[str, Any] = {
        "benchmark": "store_read",
        "rows": args.rows,
        "batch": args.batch,
        "codec": args.codec,
        "mb_per_row": round(record / 1e6, 3),
    }
    for name, read in layouts.items():
        result[f"local_cold_{name}"] = timed(read, order, args.batch, record, args.passes, lambda: drop_from_page_cache(out))
    for name, read in layouts.items():
        timed(read, order, args.batch, record, 1)  # into the page cache
        result[f"local_warm_{name}"] = timed(read, order, args.batch, record, args.passes)
    for temperature in ("cold", "warm"):
        for store in ("store", "store_reused_buffers"):
            result[f"{temperature}_{store}_vs_fixed_record"] = round(
                result[f"local_{temperature}_{store}"]["rows_per_s"] / result[f"local_{temperature}_fixed_record"]["rows_per_s"], 2
            )
    if not args.no_s3:
        result.update(s3_part(out, rows, record, order, args.batch, args.passes))
    print(json.dumps(result))


def s3_part(out: Path, rows: list[dict[str, Any]], record: int, order: np.ndarray, batch: int, passes: int) -> dict[str, Any]:
    import fsspec

    from tests.s3_server import s3_server

    (out / "s3").mkdir()
    with s3_server(out / "s3") as server:
        settings = S3Settings(endpoint=server.endpoint, region="us-east-1", key="bench", secret="bench")
        fs = fsspec.filesystem("s3", **settings.fsspec_options("s3://x"))
        fs.mkdir("bench")
        write_layouts(out, rows, settings, "s3://bench/store")
        fs.put_file(str(out / "values.bin"), "bench/values.bin")
        store = timed(store_reader("s3://bench/store", settings, reuse_buffers=True), order, batch, record, passes)
        fixed = timed(
            fixed_record_reader(lambda: fs.open("bench/values.bin", "rb", block_size=record), record, batch), order, batch, record, passes
        )

        def concurrent(indices: np.ndarray) -> list[bytes]:  # every record of the batch in flight at once
            starts = [int(i) * record for i in sorted(indices.tolist())]
            return fs.cat_ranges(["bench/values.bin"] * len(starts), starts, [s + record for s in starts])

        fixed_concurrent = timed(concurrent, order, batch, record, passes)
        return {
            "s3_store_reused_buffers": store,
            "s3_fixed_record": fixed,
            "s3_fixed_record_concurrent": fixed_concurrent,
            "s3_store_vs_fixed_record": round(store["rows_per_s"] / fixed["rows_per_s"], 2),
            "s3_store_vs_fixed_record_concurrent": round(store["rows_per_s"] / fixed_concurrent["rows_per_s"], 2),
        }


if __name__ == "__main__":
    main()
