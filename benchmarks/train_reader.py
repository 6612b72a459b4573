"""The trainer's reader end to end: full-size stage-1 rows delivered as the tensors a student step takes.

Rows at SAM3's full size: the student's input is a real-size JPEG (demo SA-1B images, ~2250x1500, decoded and
squashed to 1008 x 1008 uint8), the trunk is int8 1024x72x72, and each row has K prompt targets (3 + 1 mask logits
at 288 x 288, IoU, scores, pointers). Synthetic targets, written through the cache's own encode and write steps
and committed (a real format-3 store, read at its snapshot). Every loader runs as a DataLoader with ``--workers``
spawned workers over a shuffled epoch, batches of ``--batch``; one warm-up epoch starts the workers, then:

* **esam3**: ``StoreDataset`` (fields input + trunk, and input + trunk + prompts), trunk as int8 codes for the
  device (``decode_on="device"``) or decoded to float32 on the CPU;
* **public recipe**: a folder of the JPEG files + the public stage-1 file of fp16 trunks (fixed-size records, a
  keys file), a per-item Dataset (PIL decode, the squash resize, seek + read of the record) with default collate;
* **fixed-record, stronger**: the same images, int8 trunk records read for a whole batch with ``os.preadv`` on
  8 threads into one array (the stronger reader of ``benchmarks/store_read.py``).

**cold** = every file dropped from the page cache before the pass (a store larger than RAM), **warm** = in the
page cache. The esam3 store and the public layout are also read from a SeaweedFS S3 server on 127.0.0.1. Rows/s,
rows/s per reader core (= per worker), the cores one GPU needs at 60 rows/s, and each worker's RSS after the
warm-up and after the last pass (flat = nothing accumulates). One JSON line.

    python benchmarks/train_reader.py [--rows 48] [--batch 8] [--workers 2] [--prompts 16] [--passes 2] [--no-s3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_per_row import quantised, quantised_blocks, synthetic_targets  # noqa: E402
from store_read import drop_from_page_cache  # noqa: E402

from esam3.pipeline.demo_data import write_demo_data  # noqa: E402
from esam3.pipeline.object_store import S3Settings  # noqa: E402
from esam3.pipeline.shards import DatasetName, select_shards  # noqa: E402
from esam3.pipeline.store import Store  # noqa: E402
from esam3.pipeline.store.commits import ShardCommit, commit_shard  # noqa: E402
from esam3.pipeline.store.snapshots import tag_if_complete  # noqa: E402
from esam3.schemas.codecs import FeatureCodec, encode_features  # noqa: E402
from esam3.schemas.demo import DemoDataConfig  # noqa: E402
from esam3.schemas.prompts import PromptConfig  # noqa: E402
from esam3.schemas.store import IMAGES  # noqa: E402
from esam3.schemas.work import KIND_SAMPLE, TARGETS  # noqa: E402
from esam3.train.reader import StoreDataset  # noqa: E402
from esam3.train.sampler import EpochSampler  # noqa: E402
from esam3.workers.heads import Geometry  # noqa: E402
from esam3.workers.preprocess import resize_uint8  # noqa: E402
from esam3.workers.read_step import ReadImages  # noqa: E402
from esam3.workers.teacher_loading import random_config  # noqa: E402
from esam3.workers.shard_writer import ShardWriter  # noqa: E402
from esam3.workers.write_step import EncodeImages, WriteFragments  # noqa: E402

GPU_RATE = 60  # rows/s one GPU trains on (the project's throughput aim)


# ---- the data, in each layout ----------------------------------------------------------------------------


def build(
    out: Path, rows: int, prompts: int, store_uri: str | None = None, s3: S3Settings | None = None, teacher: str = "full-random"
) -> dict[str, Any]:
    """The esam3 store (at ``store_uri``, default ``out/store``) and, locally, the public and fixed-record layouts;
    rows at the geometry of ``teacher`` (SAM3's full size by default)."""
    g = Geometry.from_config(random_config(teacher))
    if not (out / "data").exists():
        write_demo_data(DemoDataConfig(out=out / "data", sa1b_shards=1, images_per_shard=rows, sav_shards=0))
    source = out / "data" / "sa-1b"
    shard = select_shards(str(source), DatasetName.SA1B, "all")[0]
    work = [r for t in ReadImages(str(source), g.image_size, PromptConfig(num_prompts=prompts))(shard) for r in t.to_pylist()]
    samples = [r for r in work if r["kind"] == KIND_SAMPLE]
    rng = np.random.default_rng(0)
    scale = torch.from_numpy(rng.lognormal(0, 1, (g.trunk_width, 1, 1)).astype(np.float32))
    targets = [synthetic_targets(r["k"], g, rng, scale) for r in samples]
    trunks = [t["trunk"].numpy() for t in targets]
    controls = [r for r in work if r["kind"] != KIND_SAMPLE]  # the shard's end row
    blocks = [
        *quantised_blocks(samples, quantised(samples, targets, FeatureCodec.INT8, video=False), video=False),
        pa.Table.from_pylist(controls, schema=TARGETS),
    ]
    store = Store(store_uri or str(out / "store"), s3)
    store.open_for(
        {"checksum": "synthetic", "source": "bench", "geometry": g.__dict__},
        {
            "dataset": "sa-1b",
            "targets": ["prompts", "trunk"],
            "codec": "int8",
            "inputs": "store",
            "prompts": PromptConfig(num_prompts=prompts).model_dump(mode="json"),
            "fingerprint": "bench",
        },
    )
    encode = EncodeImages(g, FeatureCodec.INT8, "synthetic", "bench", 0)
    write = WriteFragments((ShardWriter(store.table_uri("images"), IMAGES, s3=store.s3),))
    written = next(e for b in blocks for e in write(encode(b)).to_pylist() if e["final"])
    commit_shard(
        store,
        ShardCommit(
            "images",
            "sa-1b",
            shard.name,
            str(source),
            "bench",
            "bench",
            fragments=json.loads(written["fragments"]),
            keys=json.loads(written["keys"]),
            rows=written["rows"],
            bytes=written["bytes"],
            samples=len(samples),
        ),
    )
    store.index_keys("images")
    tag_if_complete(store, "images")
    if store_uri is None:
        (out / "jpg").mkdir()
        keys = [r["key"] for r in samples]
        for key, row in zip(keys, samples):
            (out / "jpg" / f"{key.split('/')[1]}.jpg").write_bytes(row["jpeg"])
        (out / "keys.json").write_text(json.dumps(keys))
        with open(out / "trunk_fp16.bin", "wb") as fp16, open(out / "trunk_int8.bin", "wb") as int8:
            for trunk in trunks:
                fp16.write(trunk.astype(np.float16).tobytes())
                encoded, _ = encode_features(trunk, FeatureCodec.INT8)
                int8.write(encoded.data + encoded.scale)
    return {"geometry": g, "rows": len(samples), "mb_per_row_store": written["bytes"] / len(samples) / 1e6}


class PublicLoaderData(Dataset):
    """The public recipe's stage-1 reading: a JPEG file per image + a fixed-record file of fp16 trunks."""

    def __init__(self, root: Path, size: int, channels: int, grid: int, fs: Any = None, prefix: str = "") -> None:
        self.root, self.size, self.shape, self.fs, self.prefix = root, size, (channels, grid, grid), fs, prefix
        self.keys = json.loads((root / "keys.json").read_text())
        self.record = 2 * channels * grid * grid

    def __len__(self) -> int:
        return len(self.keys)

    def _open(self, name: str) -> Any:
        return self.fs.open(f"{self.prefix}/{name}", "rb") if self.fs is not None else open(self.root / name, "rb")

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        with self._open(f"jpg/{self.keys[index].split('/')[1]}.jpg") as handle:
            image = np.array(Image.open(io.BytesIO(handle.read())).convert("RGB"))
        with self._open("trunk_fp16.bin") as handle:
            handle.seek(index * self.record)
            trunk = np.frombuffer(handle.read(self.record), dtype=np.float16).reshape(self.shape)
        return {"input": resize_uint8(image, self.size), "trunk": torch.from_numpy(trunk.copy())}


class FixedRecordBatches(Dataset):
    """The stronger reader: a batch of int8 trunk records with ``os.preadv`` on 8 threads into one array + the JPEGs."""

    def __init__(self, root: Path, size: int, channels: int, grid: int) -> None:
        self.root, self.size, self.channels, self.grid = root, size, channels, grid
        self.keys = json.loads((root / "keys.json").read_text())
        self.record = channels * grid * grid + 4 * channels
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        self._pool = self._pool or ThreadPoolExecutor(8)
        records = np.empty((len(indices), self.record), dtype=np.uint8)
        fd = os.open(self.root / "trunk_int8.bin", os.O_RDONLY)
        try:
            list(self._pool.map(lambda job: os.preadv(fd, [records[job[0]]], job[1] * self.record), enumerate(indices)))
        finally:
            os.close(fd)
        codes = records[:, : self.channels * self.grid**2].view(np.int8).reshape(len(indices), self.channels, self.grid, self.grid)
        scales = records[:, self.channels * self.grid**2 :].copy().view(np.float32)
        images = [simple_decode(self.root / "jpg" / f"{self.keys[i].split('/')[1]}.jpg", self.size) for i in indices]
        return {"input": torch.stack(images), "trunk_codes": torch.from_numpy(codes.copy()), "trunk_scales": torch.from_numpy(scales)}


def simple_decode(path: Path, size: int) -> torch.Tensor:
    import simplejpeg

    return resize_uint8(simplejpeg.decode_jpeg(path.read_bytes(), colorspace="RGB"), size)


# ---- measuring -----------------------------------------------------------------------------------------


def measure(loader: DataLoader, rows: int, passes: int, before: Any = lambda: None) -> dict[str, Any]:
    """Rows/s of ``passes`` epochs after a warm-up epoch (best pass), and the workers' RSS over them."""
    for _ in loader:  # warm-up: spawns the workers
        pass
    rss_start = worker_rss(loader)
    best = 0.0
    for epoch in range(1, passes + 1):
        sampler = loader.sampler if isinstance(loader.sampler, EpochSampler) else loader.batch_sampler.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        before()
        start = time.perf_counter()
        seen = sum(len(batch["input"]) for batch in loader)
        seconds = time.perf_counter() - start
        assert seen == rows, (seen, rows)
        best = max(best, seen / seconds)
    rss_end = worker_rss(loader)
    return {"rows_per_s": round(best, 2), "worker_rss_mb_start": rss_start, "worker_rss_mb_end": rss_end}


def worker_rss(loader: DataLoader) -> list[int]:
    """Resident MB of each (persistent) worker of ``loader``, from /proc (Linux)."""
    out = []
    for worker in getattr(loader._iterator, "_workers", []):  # the persistent workers' processes
        status = Path(f"/proc/{worker.pid}/status").read_text()
        out.append(round(int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024))
    return out


class Shuffled(torch.utils.data.Sampler[int]):
    """Per-item shuffled order for the public loader, re-drawn per epoch like the EpochSampler's."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(np.random.default_rng([0, self.epoch]).permutation(self.n).tolist())


def loaders(out: Path, info: dict[str, Any], args: argparse.Namespace, store: Store) -> dict[str, DataLoader]:
    g, rows = info["geometry"], info["rows"]
    spawn = {"num_workers": args.workers, "multiprocessing_context": "spawn", "persistent_workers": True, "prefetch_factor": 2}

    def esam3(fields: tuple[str, ...], decode_on: str) -> DataLoader:
        data = StoreDataset(store, fields=fields, split="all", decode_on=decode_on)
        return DataLoader(data, sampler=EpochSampler(rows, args.batch), batch_size=None, **spawn)

    made = {
        "esam3_input_trunk_codes": esam3(("input", "trunk"), "device"),
        "esam3_input_trunk_float": esam3(("input", "trunk"), "cpu"),
        "esam3_input_trunk_prompts": esam3(("input", "trunk", "prompts"), "device"),
    }
    if (out / "keys.json").exists():
        made["public_recipe"] = DataLoader(
            PublicLoaderData(out, g.image_size, g.trunk_width, g.grid), batch_size=args.batch, sampler=Shuffled(rows), **spawn
        )
        made["fixed_record_threads"] = DataLoader(
            FixedRecordBatches(out, g.image_size, g.trunk_width, g.grid), sampler=EpochSampler(rows, args.batch), batch_size=None, **spawn
        )
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=48, help="full-size rows (>= 4)")
    parser.add_argument("--batch", type=int, default=8, help="rows per batch (>= 1)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers = reader cores (>= 1)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per image (K)")
    parser.add_argument("--passes", type=int, default=2, help="measured epochs per loader (the best is reported)")
    parser.add_argument("--no-s3", action="store_true", help="skip the SeaweedFS part")
    parser.add_argument(
        "--rss-epochs",
        type=int,
        default=0,
        help="only measure the esam3 loader's worker RSS after each of this many epochs (0: the full benchmark)",
    )
    args = parser.parse_args()
    for flag, value, least in (
        ("--rows", args.rows, 4),
        ("--batch", args.batch, 1),
        ("--workers", args.workers, 1),
        ("--prompts", args.prompts, 1),
        ("--passes", args.passes, 1),
        ("--rss-epochs", args.rss_epochs, 0),
    ):
        if value < least:
            parser.error(f"{flag} must be at least {least}, got {value}")
    torch.set_num_threads(1)
    out = Path(tempfile.mkdtemp(prefix="esam3-bench-train-read-", dir=os.environ.get("ESAM3_BENCH_DIR")))
    info = build(out, args.rows, args.prompts)
    os.sync()
    if args.rss_epochs:
        print(json.dumps(rss_over_epochs(Store(str(out / "store")), info["rows"], args)))
        return
    result: dict[str, Any] = {
        "benchmark": "train_reader",
        "rows": info["rows"],
        "batch": args.batch,
        "workers": args.workers,
        "prompts": args.prompts,
        "mb_per_row_store": round(info["mb_per_row_store"], 2),
    }
    for name, loader in loaders(out, info, args, Store(str(out / "store"))).items():
        for temperature in ("cold", "warm"):
            before = (lambda: drop_from_page_cache(out)) if temperature == "cold" else (lambda: None)
            entry = measure(loader, info["rows"], args.passes, before)
            entry["rows_per_s_per_core"] = round(entry["rows_per_s"] / args.workers, 2)
            entry["cores_at_60_rows_per_s"] = round(GPU_RATE / entry["rows_per_s_per_core"], 1)
            result[f"local_{temperature}_{name}"] = entry
        del loader
    for temperature in ("cold", "warm"):
        result[f"{temperature}_esam3_vs_public"] = round(
            result[f"local_{temperature}_esam3_input_trunk_codes"]["rows_per_s"]
            / result[f"local_{temperature}_public_recipe"]["rows_per_s"],
            2,
        )
    if not args.no_s3:
        result.update(s3_part(out, info, args))
    print(json.dumps(result))


def rss_over_epochs(store: Store, rows: int, args: argparse.Namespace) -> dict[str, Any]:
    """Each worker's RSS after every epoch of the esam3 loader (input + trunk + prompts, codes for the device)."""
    data = StoreDataset(store, fields=("input", "trunk", "prompts"), split="all", decode_on="device")
    sampler = EpochSampler(rows, args.batch)
    loader = DataLoader(
        data,
        sampler=sampler,
        batch_size=None,
        num_workers=args.workers,
        multiprocessing_context="spawn",
        persistent_workers=True,
        prefetch_factor=2,
    )
    per_epoch = []
    for epoch in range(args.rss_epochs):
        sampler.set_epoch(epoch)
        assert sum(len(batch["input"]) for batch in loader) == rows
        per_epoch.append(worker_rss(loader))
    return {
        "benchmark": "train_reader_rss",
        "rows_per_epoch": rows,
        "workers": args.workers,
        "rows_read": rows * args.rss_epochs,
        "worker_rss_mb_per_epoch": per_epoch,
    }


def s3_part(out: Path, info: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    import fsspec

    from tests.s3_server import s3_server

    (out / "s3").mkdir()
    with s3_server(out / "s3") as server:
        settings = S3Settings(endpoint=server.endpoint, region="us-east-1", key="bench", secret="bench")
        fs = fsspec.filesystem("s3", **settings.fsspec_options("s3://x"))
        fs.mkdir("bench")
        build(out, args.rows, args.prompts, "s3://bench/store", settings)
        fs.put(str(out / "jpg"), "bench/public/jpg", recursive=True)
        fs.put_file(str(out / "trunk_fp16.bin"), "bench/public/trunk_fp16.bin")
        g, rows = info["geometry"], info["rows"]
        spawn = {"num_workers": args.workers, "multiprocessing_context": "spawn", "persistent_workers": True, "prefetch_factor": 2}
        store = DataLoader(
            StoreDataset(Store("s3://bench/store", settings), fields=("input", "trunk"), split="all", decode_on="device"),
            sampler=EpochSampler(rows, args.batch),
            batch_size=None,
            **spawn,
        )
        public = DataLoader(
            PublicLoaderData(out, g.image_size, g.trunk_width, g.grid, fs=fs, prefix="bench/public"),
            batch_size=args.batch,
            sampler=Shuffled(rows),
            **spawn,
        )
        found = {"s3_esam3_input_trunk_codes": measure(store, rows, args.passes), "s3_public_recipe": measure(public, rows, args.passes)}
        for entry in found.values():
            entry["rows_per_s_per_core"] = round(entry["rows_per_s"] / args.workers, 2)
        found["s3_esam3_vs_public"] = round(found["s3_esam3_input_trunk_codes"]["rows_per_s"] / found["s3_public_recipe"]["rows_per_s"], 2)
        return found


if __name__ == "__main__":
    main()
