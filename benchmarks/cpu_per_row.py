"""CPU cost of the cache per SA-1B image outside the teacher, at SAM3's full size: how many cores feed one GPU?

On a GPU node the teacher actor owns a GPU, and the read step (JPEG decode, squash resize to 1008, prompt
sampling) and the write step (codecs, Lance fragment writes) run on CPU cores beside it. Here each step runs
in this process on real data and full-size targets, timed in CPU seconds (``time.process_time``, every thread
of the process, Lance's writer threads included), so the result does not depend on how busy the machine is:

* read: ``ReadImages`` on full-size demo SA-1B images (short side 1500, ~2250x1500 JPEG), K prompts sampled;
* teacher host side: turning the targets into row bytes (``target_bytes``: the float32 copies the actor makes);
* write: ``WriteImages`` on TARGETS rows holding full-size targets (trunk 1024x72x72, K x 4 mask logits at
  288x288), split into encoding (``store_row``) and the rest (Arrow table + Lance fragment write).

The targets are synthetic (no full-size teacher runs on this CPU): the trunk is Gaussian with per-channel
scales, the mask logits smooth fields (an 18x18 random grid upsampled, ~+-10) like a real decoder's. zstd's
cost on the logits depends on their content; real logits (large flat background) compress better.

Prints one JSON line, with ``cores_per_gpu_at`` = CPU seconds per row x the GPU rate (rows/s) for a few rates.

    python benchmarks/cpu_per_row.py [--images 16] [--prompts 16] [--codec int8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from esam3.pipeline.demo_data import write_demo_data
from esam3.pipeline.shards import DatasetName, select_shards
from esam3.pipeline.store import Store
from esam3.schemas.codecs import FeatureCodec
from esam3.schemas.demo import DemoDataConfig
from esam3.schemas.prompts import PromptConfig
from esam3.schemas.work import KIND_SAMPLE, TARGETS
from esam3.workers.heads import Geometry
from esam3.workers.read_step import ReadImages
from esam3.workers.teacher_loading import random_config
from esam3.workers.teacher_step import target_bytes
from esam3.workers.write_step import WriteImages, stored_bytes

GPU_RATES = (10, 30, 60)


def cpu_seconds(fn: Any) -> tuple[Any, float]:
    start = time.process_time()
    result = fn()
    return result, time.process_time() - start


def smooth_logits(rng: np.random.Generator, count: int, size: int) -> torch.Tensor:
    """Mask-logit-like maps: an 18x18 random grid bilinearly upsampled to ``size`` and scaled to about +-10."""
    coarse = torch.from_numpy(rng.normal(0, 6, (count, 1, 18, 18)).astype(np.float32))
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def synthetic_targets(k: int, g: Geometry, rng: np.random.Generator, channel_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """Full-size teacher outputs for one image with ``k`` prompts, as the teacher actor holds them."""
    out = {"trunk": torch.randn(g.trunk_width, g.grid, g.grid) * channel_scale}
    if k:
        out["multi_logits"] = smooth_logits(rng, 3 * k, g.mask_size).reshape(k, 3, g.mask_size, g.mask_size)
        out["single_logits"] = smooth_logits(rng, k, g.mask_size).reshape(k, 1, g.mask_size, g.mask_size)
        out["iou"] = torch.rand(k, 4)
        out["object_score"] = torch.randn(k)
        out["object_pointer"] = torch.randn(k, g.hidden)
    return out


def to_row_bytes(rows: list[dict[str, Any]], targets: list[dict[str, torch.Tensor]]) -> None:
    """What the teacher actor does on the host with each image's targets."""
    for row, tensors in zip(rows, targets):
        row.update(precision="bf16-autocast", pixels=None, **{name: target_bytes(t) for name, t in tensors.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16, help="full-size demo images to push through (>= 4)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per image (K)")
    parser.add_argument("--codec", choices=[c.value for c in FeatureCodec if c != FeatureCodec.LOWRANK], default="int8",
                        help="feature codec of the trunk")
    parser.add_argument("--out", type=Path, default=None, help="working folder (default: a temp dir)")
    args = parser.parse_args()
    if args.images < 4:
        parser.error(f"--images must be at least 4, got {args.images}")
    if args.prompts < 1:
        parser.error(f"--prompts must be at least 1, got {args.prompts}")
    torch.set_num_threads(1)  # the steps run one row after the other on one core each in the pipeline
    out = args.out or Path(tempfile.mkdtemp(prefix="esam3-bench-cpu-"))
    write_demo_data(DemoDataConfig(out=out / "data", sa1b_shards=1, images_per_shard=args.images, sav_shards=0))
    source = out / "data" / "sa-1b"
    g = Geometry.from_config(random_config("full-random"))
    shard = select_shards(str(source), DatasetName.SA1B, "all")[0]

    read = ReadImages(str(source), g.image_size, PromptConfig(num_prompts=args.prompts), with_prompts=True, batch_rows=4)
    batches, read_s = cpu_seconds(lambda: list(read(shard)))
    rows = [row for batch in batches for row in batch.to_pylist()]
    samples = sum(row["kind"] == KIND_SAMPLE for row in rows)
    prompts = sum(row["k"] for row in rows if row["kind"] == KIND_SAMPLE)

    rng = np.random.default_rng(0)
    channel_scale = torch.from_numpy(rng.lognormal(0, 1, (g.trunk_width, 1, 1)).astype(np.float32))
    sample_rows = [row for row in rows if row["kind"] == KIND_SAMPLE]
    tensors = [synthetic_targets(row["k"], g, rng, channel_scale) for row in sample_rows]
    _, teacher_host_s = cpu_seconds(lambda: to_row_bytes(sample_rows, tensors))
    targets = [pa.Table.from_pylist(rows[i : i + 4], schema=TARGETS) for i in range(0, len(rows), 4)]

    store = Store(str(out / "store"))
    store.create_table("images")
    write = WriteImages(store.table_uri("images"), g, FeatureCodec(args.codec), "synthetic", "bench", 0)
    encoded, encode_s = cpu_seconds(lambda: [write.store_row(row) for row in sample_rows])
    written, write_s = cpu_seconds(lambda: [write(batch) for batch in targets])
    stored = sum(b.column("rows").to_pylist()[0] for b in written)
    per_row = {"read": read_s / samples, "teacher_host": teacher_host_s / samples, "encode": encode_s / samples,
               "write_total": write_s / samples}
    total = per_row["read"] + per_row["teacher_host"] + per_row["write_total"]
    result: dict[str, Any] = {
        "benchmark": "cpu_per_row", "images": samples, "rows_stored": stored, "prompts_per_image": round(prompts / samples, 1),
        "codec": args.codec, "geometry": {"image": g.image_size, "trunk": [g.trunk_width, g.grid, g.grid], "mask": g.mask_size},
        "cpu_ms_per_image": {name: round(1000 * value, 1) for name, value in per_row.items()},
        "cpu_ms_per_image_total": round(1000 * total, 1),
        "stored_mb_per_image": round(sum(stored_bytes(r) for r in encoded) / samples / 1e6, 2),
        "cores_per_gpu_at": {f"{rate}_images_per_s": round(total * rate, 1) for rate in GPU_RATES},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
