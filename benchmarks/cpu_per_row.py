"""CPU cost of the cache per row outside the teacher, at SAM3's full size: how many cores feed one GPU?

On a GPU node the teacher actor owns a GPU, and the read step and the write step (codecs, Lance fragment writes)
run on CPU cores beside it. Here each step runs in this process on real data and full-size targets, timed in
CPU seconds (``time.process_time``, every thread of the process, Lance's writer threads included), so the
result does not depend on how busy the machine is:

* read: ``ReadImages`` on full-size demo SA-1B images (short side 1500, ~2250x1500 JPEG: JPEG decode, squash
  resize to 1008, K prompts sampled), or ``ReadVideos`` on demo SA-V videos at 1344x1008 H.264 (decode, the
  annotated frames resized to 1008, ground-truth prompts);
* teacher actor: ``quantise`` (the targets quantised with the run's codecs, ``workers/device_codecs.py``: on a GPU
  node this runs on the GPU, so it is reported apart and left out of the cores a GPU needs) and ``teacher_host``
  (the codes received on the host and the Arrow blocks the actor sends through Ray's object store);
* write: ``EncodeImages`` / ``EncodeFrames`` on those rows (wrap the codes, zstd the logits' codes), then
  ``WriteFragments`` streaming the shard into its fragment, split into encoding (``store_row``) and the rest (Arrow
  tables + Lance fragment writes). SA-1B rows: trunk 1024x72x72, K mask logits at 288x288 (the output each
  prompt uses; K x 4 with ``--mask-outputs all``); SA-V rows (one per
  annotated frame): trunk, and per object 288x288 mask logits, ``maskmem_features`` 64x72x72 and
  ``pix_feat_with_mem`` 256x72x72;
* ``before``: the same targets the way the actor sent them up to issue 13 (float32 bytes, one block per 8 rows) and
  encoded by the CPU step with the reference codecs (``schemas/codecs.py``), in the same run; and the bytes per row
  of the blocks through the object store, float32 against quantised.

The targets are synthetic (no full-size teacher runs on this CPU): feature maps Gaussian with per-channel
scales, mask logits smooth fields (an 18x18 random grid upsampled, ~+-10) like a real decoder's. zstd's cost
on the logits depends on their content; real logits (large flat background) compress better.

Prints one JSON line, with ``cores_per_gpu_at`` = CPU seconds per row outside the GPU (read + teacher host + write)
x the GPU rate (rows/s) for a few rates.

    python benchmarks/cpu_per_row.py [--dataset sa-1b|sa-v] [--images 16] [--prompts 16] [--mask-outputs chosen|all]
        [--objects 8] [--codec int8]
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
from esam3.schemas.codecs import FeatureCodec, encode_features, encode_logits, map_codec
from esam3.schemas.demo import DemoDataConfig
from esam3.schemas.prompts import MaskOutputs, PromptConfig
from esam3.schemas.store import FRAMES, IMAGES
from esam3.schemas.teacher import VideoTargetConfig
from esam3.schemas.work import FRAME_TARGETS, KIND_SAMPLE, TARGETS, WORK
from esam3.workers.device_codecs import HostCopies, quantise_features
from esam3.workers.heads import Geometry, picked_output
from esam3.workers.read_step import ReadImages, ReadVideos
from esam3.workers.shard_writer import ShardWriter
from esam3.workers.teacher import PromptTargets
from esam3.workers.teacher_loading import random_config
from esam3.workers.teacher_step import frame_table, received, send_frame, send_image
from esam3.workers.video_targets import FrameTargets
from esam3.workers.write_step import EncodeFrames, EncodeImages, WriteFragments, stored_bytes

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
        out["multi"] = smooth_logits(rng, 3 * k, g.mask_size).reshape(k, 3, g.mask_size, g.mask_size)
        out["single"] = smooth_logits(rng, k, g.mask_size).reshape(k, 1, g.mask_size, g.mask_size)
        out["iou"] = torch.rand(k, 4)
        out["object_score"] = torch.randn(k)
        out["object_pointer"] = torch.randn(k, g.hidden)
    return out


def float32_blocks(rows: list[dict[str, Any]], targets: list[dict[str, torch.Tensor]]) -> list[pa.Table]:
    """Before: what the actor sent up to issue 13, float32 bytes of every target, in blocks of 8 rows."""
    schema = pa.schema([*WORK, ("precision", pa.string()), *[(name, pa.large_binary()) for name in targets[0]]])
    out = [
        {
            **row,
            "precision": "bf16-autocast",
            "pixels": None,
            **{name: memoryview(t.float().numpy()).cast("B") for name, t in tensors.items()},
        }
        for row, tensors in zip(rows, targets)
    ]
    return [pa.Table.from_pylist(out[i : i + 8], schema=schema) for i in range(0, len(out), 8)]


def reference_encode(targets: list[dict[str, torch.Tensor]], codec: FeatureCodec) -> None:
    """Before: the CPU encode step's codecs on the float32 targets (``schemas/codecs.py``)."""
    for tensors in targets:
        for name, t in tensors.items():
            if name in ("multi", "single", "mask_logits"):
                encode_logits(t.numpy())
            elif t.dim() >= 3:
                encode_features(t.numpy(), codec if name == "trunk" else map_codec(codec))


def quantised(
    rows: list[dict[str, Any]],
    targets: list[dict[str, torch.Tensor]],
    codec: FeatureCodec,
    video: bool,
    mask_outputs: MaskOutputs = MaskOutputs.CHOSEN,
) -> list[dict[str, Any]]:
    """After, device side: the targets of ``rows`` quantised and sent, as the actor does (on the GPU where it has
    one); image prompts keep the logits ``mask_outputs`` says, picked by SAM3's tracker rule for the row's prompts."""
    copies = HostCopies(torch.device("cpu"))
    tracker = random_config("full-random").tracker_config  # its multimask settings: which output each prompt uses
    parts = []
    for row, tensors in zip(rows, targets):
        trunk = quantise_features(tensors["trunk"], codec)
        if video:
            parts.append(
                send_frame(
                    copies, trunk, FrameTargets(0, 0, object_ids=[], is_conditioning=None, has_memory_conditioned=None, **tensors), codec
                )
            )
        else:
            prompts = {name: t for name, t in tensors.items() if name != "trunk"}
            if not prompts:
                parts.append(send_image(copies, trunk, None))
                continue
            k = row["k"]
            labels = torch.from_numpy(np.frombuffer(row["prompt_labels"], dtype=np.int8).reshape(k, -1).astype(np.int64))
            boxes = torch.from_numpy(np.frombuffer(row["prompt_boxes"], dtype=np.float32).reshape(k, 4).copy())
            pick = picked_output(labels, boxes, prompts["iou"], tracker)
            parts.append(send_image(copies, trunk, PromptTargets(**prompts), pick, mask_outputs))
    copies.wait()
    return parts


def quantised_blocks(rows: list[dict[str, Any]], parts: list[dict[str, Any]], video: bool) -> list[pa.Table]:
    """After, host side: the codes received into the rows, and the Arrow blocks the actor sends."""
    out = [received(row, sent, precision="bf16-autocast") for row, sent in zip(rows, parts)]
    if video:
        return [frame_table(out[i : i + 8]) for i in range(0, len(out), 8)]
    return [pa.Table.from_pylist(out[i : i + 8], schema=TARGETS) for i in range(0, len(out), 8)]


def actor_costs(
    rows: list[dict[str, Any]],
    targets: list[dict[str, torch.Tensor]],
    codec: FeatureCodec,
    video: bool,
    mask_outputs: MaskOutputs = MaskOutputs.CHOSEN,
) -> dict[str, Any]:
    """CPU seconds per row of the teacher actor's side, before (float32) and after (quantised, image prompts keeping
    the logits ``mask_outputs`` says), and the bytes per row of the blocks it sends through the object store.
    Returns the quantised rows too, for the write step."""
    units = len(rows)
    float32_blocks(rows, targets)  # warm-up: a running actor's allocator holds memory from earlier blocks
    before, before_s = cpu_seconds(lambda: float32_blocks(rows, targets))
    _, reference_s = cpu_seconds(lambda: reference_encode(targets, codec))
    quantised_blocks(rows, quantised(rows, targets, codec, video, mask_outputs), video)  # warm-up, as above
    parts, quantise_s = cpu_seconds(lambda: quantised(rows, targets, codec, video, mask_outputs))
    after, host_s = cpu_seconds(lambda: quantised_blocks(rows, parts, video))
    return {
        "quantise": quantise_s / units,
        "teacher_host": host_s / units,
        "before": {"teacher_host": before_s / units, "encode": reference_s / units},
        "object_store_mb_per_row": {
            "float32": round(sum(t.nbytes for t in before) / units / 1e6, 2),
            "quantised": round(sum(t.nbytes for t in after) / units / 1e6, 2),
        },
        "rows": [row for block in after for row in block.to_pylist()],
    }


def write_cost(encode: Any, write: Any, rows: list[dict[str, Any]], schema: pa.Schema, units: int) -> dict[str, Any]:
    """CPU seconds per unit of the encode step alone, and of encode + write (Arrow blocks streamed by the shard's
    ``ShardWriter`` into its Lance fragment, as the plan does)."""
    samples = [row for row in rows if row["kind"] == KIND_SAMPLE]
    [encode.store_row(row) for row in samples[:2]]  # warm-up: a running worker's allocator holds memory already
    encoded, encode_s = cpu_seconds(lambda: [encode.store_row(row) for row in samples])
    batches = [pa.Table.from_pylist(rows[i : i + 4], schema=schema) for i in range(0, len(rows), 4)]
    written, write_s = cpu_seconds(lambda: [write(encode(batch)) for batch in batches])
    finals = [e for table in written for e in table.to_pylist() if e["final"]]
    return {
        "encode": encode_s / units,
        "write_total": write_s / units,
        "rows_stored": sum(e["rows"] for e in finals),
        "stored_mb": sum(stored_bytes(r) for r in encoded) / units / 1e6,
    }


def image_costs(args: argparse.Namespace, out: Path, g: Geometry, store: Store) -> dict[str, Any]:
    write_demo_data(DemoDataConfig(out=out / "data", sa1b_shards=1, images_per_shard=args.images, sav_shards=0))
    source = out / "data" / "sa-1b"
    shard = select_shards(str(source), DatasetName.SA1B, "all")[0]
    read = ReadImages(str(source), g.image_size, PromptConfig(num_prompts=args.prompts), with_prompts=True, batch_rows=4)
    batches, read_s = cpu_seconds(lambda: list(read(shard)))
    rows = [row for batch in batches for row in batch.to_pylist()]
    samples = [row for row in rows if row["kind"] == KIND_SAMPLE]
    rng = np.random.default_rng(0)
    channel_scale = torch.from_numpy(rng.lognormal(0, 1, (g.trunk_width, 1, 1)).astype(np.float32))
    tensors = [synthetic_targets(row["k"], g, rng, channel_scale) for row in samples]
    outputs = MaskOutputs(args.mask_outputs)
    actor = actor_costs(samples, tensors, FeatureCodec(args.codec), video=False, mask_outputs=outputs)
    tensors.clear()
    store.create_table("images")
    encode = EncodeImages(g, FeatureCodec(args.codec), "synthetic", "bench", 0, mask_outputs=outputs)
    cost = write_cost(
        encode,
        WriteFragments((ShardWriter(store.table_uri("images"), IMAGES),)),
        actor.pop("rows") + [row for row in rows if row["kind"] != KIND_SAMPLE],
        TARGETS,
        len(samples),
    )
    return {
        "unit": "image",
        "units": len(samples),
        "prompts_per_image": round(sum(r["k"] for r in samples) / len(samples), 1),
        "read": read_s / len(samples),
        **actor,
        **cost,
    }


def frame_rows(
    video: dict[str, Any], objects: int, g: Geometry, rng: np.random.Generator
) -> tuple[list[dict[str, Any]], list[dict[str, torch.Tensor]]]:
    """FRAME_TARGETS rows of one read video, and full-size synthetic targets for each of its frames."""
    rows, tensors = [], []
    masks = json.loads(video["frame_masks"])
    for t in range(video["frames"]):
        real = list(masks[t].values())  # the video's tracked objects' RLEs, repeated up to ``objects``
        rows.append(
            {
                **{name: video[name] for name in ("kind", "dataset", "shard", "member", "height", "width", "transform")},
                "key": f"{video['key']}/{t:05d}",
                "video_id": video["key"].split("/", 1)[1],
                "frame": t,
                "frame_index": 4 * t,
                "prompt_kind": "mask",
                "object_ids": list(range(objects)),
                "is_conditioning": [t == 0] * objects,
                "has_memory_conditioned": [t > 0] * objects,
                "input": video["frame_inputs"][t] if video["frame_inputs"] else None,
                "gt_masks": json.dumps([real[i % len(real)] for i in range(objects)] if real else []),
            }
        )
        tensors.append(
            {
                "trunk": torch.randn(g.trunk_width, g.grid, g.grid),
                "mask_logits": smooth_logits(rng, objects, g.mask_size),
                "object_score": torch.randn(objects),
                "object_pointer": torch.randn(objects, g.hidden),
                "maskmem_features": torch.randn(objects, g.memory_channels, g.grid, g.grid),
                "pix_feat_with_mem": torch.randn(objects, g.hidden, g.grid, g.grid),
            }
        )
    return rows, tensors


def frame_costs(args: argparse.Namespace, out: Path, g: Geometry, store: Store) -> dict[str, Any]:
    write_demo_data(
        DemoDataConfig(
            out=out / "data",
            sa1b_shards=0,
            sav_shards=1,
            videos_per_shard=args.videos,
            video_width=1344,
            video_height=1008,
            video_seconds=args.seconds,
        )
    )
    source = out / "data" / "sa-v"
    shard = select_shards(str(source), DatasetName.SAV, "all")[0]
    read = ReadVideos(str(source), g.image_size, VideoTargetConfig(max_objects=args.objects))
    batches, read_s = cpu_seconds(lambda: list(read(shard)))
    work = [row for batch in batches for row in batch.to_pylist()]
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    tensors: list[dict[str, torch.Tensor]] = []
    for video in (row for row in work if row["kind"] == KIND_SAMPLE):
        video_rows, video_tensors = frame_rows(video, args.objects, g, rng)
        rows += video_rows
        tensors += video_tensors
    actor = actor_costs(rows, tensors, FeatureCodec(args.codec), video=True)
    tensors.clear()  # the rows hold the codes now
    store.create_table("frames")
    encode = EncodeFrames(g, FeatureCodec(args.codec), "synthetic", "bench", 0)
    cost = write_cost(
        encode,
        WriteFragments((ShardWriter(store.table_uri("frames"), FRAMES),)),
        actor.pop("rows") + [row for row in work if row["kind"] != KIND_SAMPLE],
        FRAME_TARGETS,
        len(rows),
    )
    return {
        "unit": "frame",
        "units": len(rows),
        "objects": args.objects,
        "read": read_s / len(rows),
        **actor,
        **cost,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["sa-1b", "sa-v"], default="sa-1b", help="images (SA-1B) or video frames (SA-V)")
    parser.add_argument("--images", type=int, default=16, help="sa-1b: full-size demo images to push through (>= 4)")
    parser.add_argument("--prompts", type=int, default=16, help="sa-1b: prompts per image (K)")
    parser.add_argument(
        "--mask-outputs",
        choices=[m.value for m in MaskOutputs],
        default="chosen",
        help="sa-1b: mask logits kept per prompt, as the cache's flag",
    )
    parser.add_argument("--videos", type=int, default=2, help="sa-v: demo videos at 1344x1008 (>= 1)")
    parser.add_argument("--seconds", type=float, default=2.0, help="sa-v: video length (every 4th of 24 fps is annotated)")
    parser.add_argument("--objects", type=int, default=8, help="sa-v: objects tracked per frame")
    parser.add_argument(
        "--codec",
        choices=[c.value for c in FeatureCodec if c != FeatureCodec.LOWRANK],
        default="int8",
        help="feature codec of the trunk and the per-object maps (lowrank needs a fitted basis: not measured here)",
    )
    parser.add_argument("--out", type=Path, default=None, help="working folder (default: a temp dir)")
    args = parser.parse_args()
    for flag, value, least in (
        ("--images", args.images, 4),
        ("--prompts", args.prompts, 1),
        ("--videos", args.videos, 1),
        ("--objects", args.objects, 1),
    ):
        if value < least:
            parser.error(f"{flag} must be at least {least}, got {value}")
    if not 0.5 <= args.seconds <= 60:
        parser.error(f"--seconds must be within 0.5-60, got {args.seconds}")
    torch.set_num_threads(1)  # the steps run one row after the other on one core each in the pipeline
    out = args.out or Path(tempfile.mkdtemp(prefix="esam3-bench-cpu-"))
    g = Geometry.from_config(random_config("full-random"))
    store = Store(str(out / "store"))
    cost = (image_costs if args.dataset == "sa-1b" else frame_costs)(args, out, g, store)
    total = cost["read"] + cost["teacher_host"] + cost["write_total"]  # quantise runs on the GPU of a GPU node
    unit = cost.pop("unit")
    ms = {name: round(1000 * cost.pop(name), 1) for name in ("read", "quantise", "teacher_host", "encode", "write_total")}
    before = {f"{name}_ms_per_{unit}": round(1000 * seconds, 1) for name, seconds in cost.pop("before").items()}
    result: dict[str, Any] = {
        "benchmark": "cpu_per_row",
        "dataset": args.dataset,
        "codec": args.codec,
        "geometry": {"image": g.image_size, "trunk": [g.trunk_width, g.grid, g.grid], "mask": g.mask_size},
        **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in cost.items()},
        f"cpu_ms_per_{unit}": ms,
        "before": before,
        f"cpu_ms_per_{unit}_total": round(1000 * total, 1),
        "cores_per_gpu_at": {f"{rate}_{unit}s_per_s": round(total * rate, 1) for rate in GPU_RATES},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
