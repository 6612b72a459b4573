"""The full-size SAM3 teacher (random weights, the real architecture) on a GPU: how fast are its targets?

* trunk targets at bf16 autocast for batch 1/4/8/16: images/s, ms/image, achieved TFLOP/s and model FLOP
  utilisation (FLOPs counted by ``torch.utils.flop_counter`` on one forward; peak = the GPU's dense bf16 peak),
  plus the same with the trunk's weights cast to bf16 (no autocast), and the trunk output copied to the host;
* prompt targets: K=16 prompts per image decoded from the trunk in hand: images/s and prompts/s;
* video targets: one synthetic 1008x1008 video, 8 objects over 16 annotated frames: frame-objects/s;
* targets to the host, per image with K prompts: before (float32, one blocking copy per tensor, as the actor did up
  to issue 13) against after (quantised on the device with the run's codec, codes copied into pinned memory by a
  side stream, one wait per batch: ``workers/device_codecs.py``): ms per image, MB per image sent, and the relative
  RMS errors the device measured (trunk, logits);
* the cache's teacher actor itself (``TeacherImages`` on WORK batches: trunk, prompts, task-level error, quantise,
  copies, the Arrow block it sends): images/s.

Inputs are synthetic (random pixels, moving rectangles as masks), so the script needs no JPEG/MP4 codecs.
``--device cpu`` (fp32) runs every step of the same script at full size on a machine without a GPU, to check
it before a GPU is lent; there, keep the work small (``--batches 1 --repeats 1 --warmup 0 --prompt-images 1
--prompts 4 --video-frames 2 --objects 2``: about 15 minutes on 2 cores).
Writes ``$OUT/gpu_teacher.json`` (or ``--out``) and prints the same JSON line. Target: >= 60 trunk images/s
on one H100 (the public recipe exports 8.68 images/s on an L40S at batch 1).

On the lent GPU machine (Python 3.12, torch and transformers preinstalled, nothing reachable), carry the
wheels ``benchmarks/gpu_wheels.sh`` downloads into ``.whl`` and run:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/gpu_teacher.py
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

#: Dense bf16 tensor-core peaks (FLOP/s) by device name fragment; SXM parts unless named.
PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}


def install_package_aliases() -> None:
    """Run from a checkout without ``pip install``: map esam3.<sub> to the repository's top-level folders."""
    import importlib
    import sys

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    import esam3

    for sub in ("schemas", "pipeline", "workers", "train"):
        if f"esam3.{sub}" not in sys.modules:
            module = importlib.import_module(sub)
            sys.modules[f"esam3.{sub}"] = module
            setattr(esam3, sub, module)


def peak_flops(name: str) -> float | None:
    for fragment, peak in PEAK_BF16.items():
        if fragment in name:
            return peak
    return None


def synchronize() -> None:
    """Wait for queued GPU work, so wall-clock times cover it (a no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Any, repeats: int, warmup: int) -> float:
    """Seconds per call, after ``warmup`` untimed calls, with the GPU synchronised."""
    for _ in range(warmup):
        fn()
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize()
    return (time.perf_counter() - start) / repeats


def trunk_flops(teacher: Any) -> int:
    """FLOPs of one image through the trunk, attention included on any device.

    Counted with SDPA's math backend: the counter knows CUDA's fused attention kernels but not the CPU one, which
    would leave out the attention (0.78 of SAM3's 5.40 TFLOPs per image).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    size = teacher.geometry.image_size
    pixels = torch.randn(1, 3, size, size, device=teacher.device)
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter, torch.inference_mode(), teacher.autocast():
        teacher.trunk(pixels)
    return counter.get_total_flops()


def bench_trunk(teacher: Any, batches: list[int], timing: tuple[int, int], flops: int, peak: float | None) -> dict[str, Any]:
    size = teacher.geometry.image_size
    out: dict[str, Any] = {}
    dtype = next(teacher.trunk.parameters()).dtype
    for batch in batches:
        pixels = torch.randn(batch, 3, size, size, device=teacher.device, dtype=dtype)
        seconds = timed(lambda: teacher.trunk_features(pixels), *timing)
        rate = batch / seconds
        out[f"batch{batch}"] = {
            "images_per_s": round(rate, 2),
            "ms_per_image": round(1000 / rate, 2),
            "tflops": round(flops * rate / 1e12, 1),
            "mfu": round(flops * rate / peak, 3) if peak else None,
        }
    best = max(batches, key=lambda b: out[f"batch{b}"]["images_per_s"])
    pixels = torch.randn(best, 3, size, size, device=teacher.device, dtype=dtype)
    seconds = timed(lambda: teacher.trunk_features(pixels).to(torch.float16).cpu(), *timing)
    out["to_host_fp16"] = {"batch": best, "images_per_s": round(best / seconds, 2)}
    return out


def synthetic_masks(rng: np.random.Generator, height: int, width: int, n: int) -> list[Any]:
    from esam3.schemas.rle import Runs

    masks = []
    for _ in range(n):
        mask = np.zeros((height, width), bool)
        h, w = rng.integers(height // 10, height // 2), rng.integers(width // 10, width // 2)
        r, c = rng.integers(0, height - h), rng.integers(0, width - w)
        mask[r : r + h, c : c + w] = True
        masks.append(Runs.from_mask(mask))
    return masks


#: (height, width) of the synthetic images whose prompts the benchmark samples (SA-1B's usual size).
IMAGE_HW = (1500, 2250)


def synthetic_prompt_sets(rng: np.random.Generator, size: int, k: int, images: int) -> list[Any]:
    """K prompts per image for ``images`` synthetic images of ``IMAGE_HW`` (rectangles as masks), in the S x S frame."""
    from esam3.schemas.prompts import PromptConfig
    from esam3.workers.prompts import sample_prompts

    height, width = IMAGE_HW
    return [
        sample_prompts(f"sa1b/{i}", synthetic_masks(rng, height, width, 2 * k), (height, width), size, PromptConfig(num_prompts=k))
        for i in range(images)
    ]


def bench_prompts(teacher: Any, k: int, images: int, warmup: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    size = teacher.geometry.image_size
    prompt_sets = synthetic_prompt_sets(rng, size, k, images)
    trunks = teacher.trunk_features(torch.randn(images, 3, size, size, device=teacher.device))
    seconds = timed(lambda: [teacher.prompt_targets(t, p, on_device=True) for t, p in zip(trunks, prompt_sets)], 2, warmup)
    return {"k": k, "images_per_s": round(images / seconds, 2), "prompts_per_s": round(images * k / seconds, 1)}


def bench_video(teacher: Any, frames: int, objects: int, warmup: int) -> dict[str, Any]:
    from esam3.schemas.rle import Runs
    from esam3.schemas.teacher import VideoPrompt, VideoTargetConfig

    rng = np.random.default_rng(1)
    height = width = teacher.geometry.image_size
    pixels = rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    masks = []
    for t in range(frames):
        frame_masks = []
        for obj in range(objects):
            mask = np.zeros((height, width), bool)
            r, c = 40 * obj % (height // 2) + 2 * t, 60 * obj % (width // 2) + 3 * t
            mask[r : r + height // 4, c : c + width // 4] = True
            frame_masks.append(Runs.from_mask(mask))
        masks.append(tuple(frame_masks))
    video = SimpleNamespace(
        key="sav/synthetic",
        frames=pixels,
        frame_indices=np.arange(frames) * 4,
        masks=tuple(masks),
        record=SimpleNamespace(masklet_id=list(range(objects))),
    )
    config = VideoTargetConfig(prompt=VideoPrompt.MASK, max_objects=objects, max_frames=frames)
    for _ in range(warmup):
        list(teacher.video_targets(video, config))
    synchronize()
    start = time.perf_counter()
    done = list(teacher.video_targets(video, config))
    synchronize()
    seconds = time.perf_counter() - start
    frame_objects = sum(len(f.object_ids) for f in done)
    return {
        "frames": len(done),
        "objects": objects,
        "frames_per_s": round(len(done) / seconds, 2),
        "frame_objects_per_s": round(frame_objects / seconds, 1),
    }


def bench_host_targets(teacher: Any, k: int, images: int, codec: str, warmup: int) -> dict[str, Any]:
    """Targets of ``images`` images with ``k`` prompts each, to host memory: float32 blocking copies vs quantised codes."""
    from esam3.workers.device_codecs import HostCopies, quantise_features
    from esam3.workers.teacher import prompt_tensors
    from esam3.workers.teacher_step import send_image

    rng = np.random.default_rng(2)
    size = teacher.geometry.image_size
    prompt_sets = synthetic_prompt_sets(rng, size, k, images)
    trunks = teacher.trunk_features(torch.randn(images, 3, size, size, device=teacher.device))
    outs = [teacher.prompt_targets(t, p, on_device=True) for t, p in zip(trunks, prompt_sets)]
    picks = [teacher.heads.picked_output(*prompt_tensors(p, teacher.device)[1:], out.iou) for p, out in zip(prompt_sets, outs)]
    names = ("multi", "single", "iou", "object_score", "object_pointer")

    def before() -> int:
        host = [trunk.float().cpu() for trunk in trunks] + [getattr(out, n).float().cpu() for out in outs for n in names]
        return sum(t.numel() * 4 for t in host)

    copies = HostCopies(teacher.device)

    def after() -> list[dict[str, Any]]:
        parts = [send_image(copies, quantise_features(trunk, codec), out, pick) for trunk, out, pick in zip(trunks, outs, picks)]
        copies.wait()
        return [{key: value for name, part in p.items() for key, value in part.fields(name).items()} for p in parts]

    sent_before = before()
    fields = after()
    sent_after = sum(len(v) for f in fields for v in f.values() if isinstance(v, memoryview))
    return {
        "k": k,
        "codec": codec,
        "images": images,
        "float32_ms_per_image": round(1000 * timed(before, 3, warmup) / images, 2),
        "quantised_ms_per_image": round(1000 * timed(after, 3, warmup) / images, 2),
        "float32_mb_per_image": round(sent_before / images / 1e6, 2),
        "quantised_mb_per_image": round(sent_after / images / 1e6, 2),
        "trunk_error": round(float(np.mean([f["trunk_error"] for f in fields])), 5),
        "logits_error": round(float(np.mean([f["chosen_logits_error"] for f in fields])), 5),
    }


def bench_actor(teacher: Any, k: int, images: int, codec: str, warmup: int) -> dict[str, Any]:
    """The cache's teacher actor itself (``TeacherImages``, this teacher) on WORK batches of ``images`` images with
    ``k`` prompts: trunk, prompt targets, the trunk codec's task-level error, quantise + copies, the Arrow block
    it sends. Images/s, and MB per image of that block."""
    import pyarrow as pa

    from esam3.schemas.work import KIND_SAMPLE, WORK
    from esam3.workers.teacher_step import TeacherImages

    rng = np.random.default_rng(3)
    size = teacher.geometry.image_size
    height, width = IMAGE_HW
    rows = []
    for i, prompts in enumerate(synthetic_prompt_sets(rng, size, k, images)):
        rows.append(
            {
                **{"kind": KIND_SAMPLE, "dataset": "sa-1b", "shard": "sa_000000.tar", "key": f"sa1b/{i}", "member": f"sa_{i}.jpg"},
                **{"image_id": i, "height": height, "width": width, "transform": "{}", "gt_masks": "[]", "k": len(prompts)},
                "pixels": rng.integers(0, 256, (3, size, size), dtype=np.uint8).tobytes(),
                "prompt_mask_index": prompts.mask_index.astype(np.int32).tobytes(),
                "prompt_kinds": prompts.kinds.astype(np.int8).tobytes(),
                "prompt_points": prompts.points_model.astype(np.float32).tobytes(),
                "prompt_labels": prompts.labels.astype(np.int8).tobytes(),
                "prompt_boxes": prompts.boxes_model.astype(np.float32).tobytes(),
            }
        )
    batch = pa.Table.from_pylist(rows, schema=WORK)
    actor = TeacherImages(teacher.config, teacher.card.checksum, with_prompts=True, codec=codec, loaded=teacher)
    out = actor(batch)
    failed = [r["reason"] for r in out.select(["kind", "reason"]).to_pylist() if r["kind"] != KIND_SAMPLE]
    if failed:
        raise RuntimeError(f"the teacher actor failed {len(failed)} of {images} images: {failed[0]}")
    seconds = timed(lambda: actor(batch), 2, warmup)
    return {
        "k": k,
        "codec": codec,
        "images_per_s": round(images / seconds, 2),
        "block_mb_per_image": round(out.nbytes / images / 1e6, 2),
        "codec_mask_iou": round(float(np.mean(out.column("codec_mask_iou").to_pylist())), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="full-random", help="random teacher name or checkpoint directory")
    parser.add_argument("--batches", default="1,4,8,16", help="trunk batch sizes to time")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per batch size")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before each timing")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu (fp32) checks the script without a GPU")
    parser.add_argument("--prompt-images", type=int, default=8, help="images whose prompts are decoded per timed call")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per image")
    parser.add_argument("--video-frames", type=int, default=16, help="annotated frames of the synthetic video")
    parser.add_argument("--objects", type=int, default=8, help="objects tracked in the synthetic video")
    parser.add_argument("--codec", choices=("fp16", "bf16", "int8"), default="int8", help="trunk codec of the host-targets step")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")), help="folder for gpu_teacher.json")
    args = parser.parse_args()
    install_package_aliases()
    from esam3.schemas.teacher import TeacherConfig
    from esam3.workers.teacher import Sam3Teacher

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: this benchmark is for the GPU machine (--device cpu checks it on a CPU)")
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        parser.error(f"--batches takes comma-separated integers like 1,4,8, not {args.batches!r}")
    counts = {
        "--repeats": args.repeats,
        "--prompt-images": args.prompt_images,
        "--prompts": args.prompts,
        "--video-frames": args.video_frames,
        "--objects": args.objects,
        "batch sizes": min(batches),
    }
    for flag, value in counts.items():
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    if args.warmup < 0:
        parser.error(f"--warmup must be 0 or more, got {args.warmup}")
    timing = (args.repeats, args.warmup)
    start = time.perf_counter()
    precision = "bf16" if args.device == "cuda" else "fp32"
    teacher = Sam3Teacher.load(TeacherConfig(source=args.teacher, device=args.device, precision=precision, batch_size=max(batches)))
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    peak = peak_flops(name)
    flops = trunk_flops(teacher)
    result: dict[str, Any] = {
        "benchmark": "gpu_teacher",
        "gpu": name,
        "torch": torch.__version__,
        "teacher": args.teacher,
        "load_s": round(time.perf_counter() - start, 1),
        "parameters": teacher.card.parameters,
        "trunk_gflops_per_image": round(flops / 1e9, 1),
        "peak_bf16_tflops": peak and peak / 1e12,
    }
    result["trunk_autocast" if args.device == "cuda" else "trunk_fp32"] = bench_trunk(teacher, batches, timing, flops, peak)
    result["prompts"] = bench_prompts(teacher, args.prompts, args.prompt_images, args.warmup)
    result["video"] = bench_video(teacher, args.video_frames, args.objects, args.warmup)
    result["host_targets"] = bench_host_targets(teacher, args.prompts, args.prompt_images, args.codec, args.warmup)
    result["actor"] = bench_actor(teacher, args.prompts, args.prompt_images, args.codec, args.warmup)
    teacher.trunk.to(torch.bfloat16)
    teacher.amp_dtype = None  # weights in bf16, no autocast: what a cast-once teacher would give
    result["trunk_bf16_weights"] = bench_trunk(teacher, batches, timing, flops, peak)
    if args.device == "cuda":
        result["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    args.out.mkdir(parents=True, exist_ok=True)
    line = json.dumps(result)
    (args.out / "gpu_teacher.json").write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
