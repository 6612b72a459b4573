"""How the store's per-shard costs grow with the store: commit, manifest, duplicate check, index, take latency.

A full SA-1B store is 1,000 shards x ~11,186 images. This grows a real store (``Store``, the ``images`` schema,
the driver's own commit path: ``commit_shard`` = duplicate-key check + Append + ledger row, then ``index_keys`` and
``tag_if_complete``) to ``--shards`` shards of ``--rows`` small synthetic rows each (keys and provenance filled,
tensors null, so it runs on a laptop), written as the cache's writers write them: one fragment per shard (or, with
``--fragment-rows N``, fragments of N rows, to see what smaller fragments would cost). At each checkpoint it records, per shard: the commit's parts in seconds, the size of the
latest manifest, and the latency of a random 32-row ``take`` of keys at the newest snapshot.

Goal (issue 11): per-shard commit cost flat, at most logarithmic, in the number of shards.

    python benchmarks/store_scale.py [--shards 1000] [--rows 11186] [--fragment-rows 0] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from lance.fragment import write_fragments

from esam3.pipeline.store import Store
from esam3.pipeline.store.commits import ShardCommit, commit_shard, existing_elsewhere, finished_shards
from esam3.pipeline.store.snapshots import snapshot_rows, tag_if_complete
from esam3.schemas.store import IMAGES, LANCE_FILE_VERSION


def synthetic_shard(shard: int, rows: int) -> pa.Table:
    """``rows`` images rows of shard ``shard``: keys and provenance, tensors null (small rows)."""
    ids = np.arange(shard * rows, (shard + 1) * rows, dtype=np.int64)
    name = f"sa_{shard:06d}.tar"
    values: dict[str, pa.Array] = {
        "key": pa.array([f"sa1b/{i}" for i in ids]),
        "shard": pa.array([name] * rows),
        "member": pa.array([f"sa_{i}.jpg" for i in ids]),
        "run_id": pa.array(["bench"] * rows),
        "teacher": pa.array(["synthetic"] * rows),
        "precision": pa.array(["fp32"] * rows),
        "codec": pa.array(["int8"] * rows),
        "preprocess": pa.array(["{}"] * rows),
        "image_id": pa.array(ids),
        "height": pa.array(np.full(rows, 1500, np.int32)),
        "width": pa.array(np.full(rows, 2250, np.int32)),
        "prompt_seed": pa.array(np.zeros(rows, np.int64)),
    }
    return pa.table([values.get(f.name, pa.nulls(rows, f.type)) for f in IMAGES], schema=IMAGES)


def manifest_bytes(table_uri: str) -> int:
    versions = sorted(Path(table_uri, "_versions").glob("*.manifest"), key=lambda p: p.stat().st_mtime)
    return versions[-1].stat().st_size if versions else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=1000, help="shards to grow the store to (>= 2)")
    parser.add_argument("--rows", type=int, default=11_186, help="rows per shard (SA-1B: 11,186)")
    parser.add_argument("--fragment-rows", type=int, default=0, help="rows per fragment; 0: one per shard, as the cache writes them")
    parser.add_argument("--out", type=Path, default=None, help="working folder (default: a temp dir)")
    args = parser.parse_args()
    for flag, value, least in (("--shards", args.shards, 2), ("--rows", args.rows, 1), ("--fragment-rows", args.fragment_rows, 0)):
        if value < least:
            parser.error(f"{flag} must be at least {least}, got {value}")
    logging.basicConfig(level=logging.WARNING)
    out = args.out or Path(tempfile.mkdtemp(prefix="esam3-bench-scale-"))
    store = Store(str(out / "store"))
    store.open_for(
        {"checksum": "synthetic", "source": "bench", "geometry": {}},
        {"dataset": "sa-1b", "targets": ["trunk"], "codec": "int8", "fingerprint": "bench"},
    )
    uri = store.table_uri("images")
    checkpoints = sorted({1, *(c for c in (10, 30, 100, 300, 1000, 3000) if c <= args.shards), args.shards})
    rng = np.random.default_rng(0)
    samples: list[dict[str, Any]] = []
    for shard in range(args.shards):
        table = synthetic_shard(shard, args.rows)
        t0 = time.perf_counter()
        fragments = write_fragments(
            table, uri, schema=IMAGES, max_rows_per_file=args.fragment_rows or args.rows, data_storage_version=LANCE_FILE_VERSION
        )
        t1 = time.perf_counter()
        keys = table.column("key").to_pylist()
        commit = ShardCommit(
            "images",
            "sa-1b",
            table.column("shard")[0].as_py(),
            "bench",
            "bench",
            "bench",
            fragments=[f.to_json() for f in fragments],
            keys=keys,
            rows=args.rows,
            samples=args.rows,
        )
        dup_start = time.perf_counter()
        existing_elsewhere(
            store, commit, finished_shards(store, "sa-1b", "bench")
        )  # the cross-shard duplicate check alone (commit_shard runs it too)
        dup = time.perf_counter() - dup_start
        t2 = time.perf_counter()
        commit_shard(store, commit)
        t3 = time.perf_counter()
        store.index_keys("images")
        t4 = time.perf_counter()
        snapshot = tag_if_complete(store, "images")
        t5 = time.perf_counter()
        if shard + 1 in checkpoints:
            ds = store.dataset("images", snapshot.version if snapshot else None)
            picks = rng.integers(0, ds.count_rows(), 32).tolist()
            ds.take(picks, columns=["key"])  # warm
            take_start = time.perf_counter()
            ds.take(rng.integers(0, ds.count_rows(), 32).tolist(), columns=["key"])
            take = time.perf_counter() - take_start
            samples.append(
                {
                    "shards": shard + 1,
                    "rows": (shard + 1) * args.rows,
                    "fragments": len(ds.get_fragments()),
                    "write_s": round(t1 - t0, 3),
                    "duplicate_check_s": round(dup, 4),
                    "commit_s": round(t3 - t2, 3),
                    "index_s": round(t4 - t3, 3),
                    "tag_s": round(t5 - t4, 3),
                    "manifest_bytes": manifest_bytes(uri),
                    "take_32_ms": round(1000 * take, 2),
                    "snapshot_rows": snapshot_rows(store, "images", snapshot) if snapshot else None,
                }
            )
    first, last = samples[0], samples[-1]
    per_shard = lambda s: s["commit_s"] + s["index_s"] + s["tag_s"]  # noqa: E731 - the driver's work per shard
    print(
        json.dumps(
            {
                "benchmark": "store_scale",
                "shards": args.shards,
                "rows_per_shard": args.rows,
                "fragment_rows": args.fragment_rows,
                "checkpoints": samples,
                "driver_s_per_shard_growth": round(per_shard(last) / max(per_shard(first), 1e-9), 2),
                "shards_growth": last["shards"] / first["shards"],
            }
        )
    )


if __name__ == "__main__":
    main()
