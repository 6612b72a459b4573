"""Teacher throughput on this machine: image (trunk), prompt and video targets per second, per random config.

For each teacher: generated SA-1B images and one SA-V video in the true formats; the image targets (preprocess
+ trunk), the trunk alone, prompt targets (K sampled prompts decoded from the trunk in hand) and video targets
(trunk per frame + tracker with memory) are timed after one warm-up. Prints one JSON line.

    python benchmarks/teacher.py [--teachers tiny-random,small-random] [--images 8] [--prompts 16]
                                 [--video-frames 16] [--objects 4] [--batch-size 4] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import simplejpeg
import torch

from esam3.pipeline.demo_data import write_demo_data
from esam3.pipeline.sources import SA1BSource, SAVSource
from esam3.schemas.demo import DemoDataConfig
from esam3.schemas.prompts import PromptConfig
from esam3.schemas.teacher import RANDOM_TEACHERS, TeacherConfig, VideoTargetConfig
from esam3.workers.preprocess import preprocess_images
from esam3.workers.prompts import sample_prompts
from esam3.workers.teacher import Sam3Teacher


def _timed(fn: Any, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def demo_inputs(args: argparse.Namespace, out: Path) -> tuple[list[Any], list[np.ndarray], Any]:
    config = DemoDataConfig(
        out=out,
        sa1b_shards=1,
        images_per_shard=args.images,
        sav_shards=1,
        videos_per_shard=1,
        image_short_side=args.image_short_side,
        video_width=640,
        video_height=480,
        video_seconds=args.video_frames * 4 / 24 + 0.5,
    )
    write_demo_data(config)
    samples = list(SA1BSource(str(out / "sa-1b")).iter_samples("all"))
    images = [simplejpeg.decode_jpeg(s.jpeg, colorspace="RGB") for s in samples]
    video = next(iter(SAVSource(str(out / "sa-v")).iter_samples("all")))
    return samples, images, video


def bench_teacher(name: str, args: argparse.Namespace, samples: list[Any], images: list[np.ndarray], video: Any) -> dict[str, Any]:
    teacher = Sam3Teacher.load(TeacherConfig(source=name, batch_size=args.batch_size, device=args.device))
    device, size = teacher.device, teacher.geometry.image_size
    result: dict[str, Any] = {"image_size": size, "parameters": teacher.card.parameters, "precision": teacher.card.precision}
    teacher.image_targets(images[: args.batch_size])  # warm-up
    seconds = _timed(lambda: teacher.image_targets(images), device)
    result["image_targets_per_s"] = round(len(images) / seconds, 3)
    pixels = preprocess_images(images, size)
    seconds = _timed(lambda: teacher.trunk_features(pixels), device)
    result["trunk_images_per_s"] = round(len(images) / seconds, 3)
    result["trunk_ms_per_image"] = round(1000 * seconds / len(images), 1)
    trunks = teacher.image_targets(images).trunk
    prompt_config = PromptConfig(num_prompts=args.prompts)
    prompt_sets = [sample_prompts(s.key, s.masks, (s.record.image.height, s.record.image.width), size, prompt_config) for s in samples]
    teacher.prompt_targets(trunks[0], prompt_sets[0])
    seconds = _timed(lambda: [teacher.prompt_targets(t, p) for t, p in zip(trunks, prompt_sets)], device)
    n_prompts = sum(len(p) for p in prompt_sets)
    result["prompt_images_per_s"] = round(len(images) / seconds, 3)
    result["prompts_per_s"] = round(n_prompts / seconds, 2)
    video_config = VideoTargetConfig(max_objects=args.objects, max_frames=args.video_frames)
    frames: list[Any] = []
    seconds = _timed(lambda: frames.extend(teacher.video_targets(video, video_config)), device)
    frame_objects = sum(len(f.object_ids) for f in frames)
    result["video_frames_per_s"] = round(len(frames) / seconds, 3)
    result["video_frame_objects_per_s"] = round(frame_objects / seconds, 3)
    result["video_frames"], result["video_frame_objects"] = len(frames), frame_objects
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teachers", default="tiny-random,small-random", help="comma-separated random teachers")
    parser.add_argument("--images", type=int, default=8, help="SA-1B images to time")
    parser.add_argument("--image-short-side", type=int, default=600, help="short side of the generated images")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per image (K)")
    parser.add_argument("--video-frames", type=int, default=16, help="annotated frames of the video")
    parser.add_argument("--objects", type=int, default=4, help="objects tracked in the video")
    parser.add_argument("--batch-size", type=int, default=4, help="images per trunk forward")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the teacher runs")
    parser.add_argument("--out", type=Path, default=None, help="where to write demo data (default: a temp dir)")
    args = parser.parse_args()
    names = [n for n in args.teachers.split(",") if n]
    unknown = [n for n in names if n not in RANDOM_TEACHERS]
    if unknown:
        parser.error(f"--teachers: unknown {unknown}; choose from {', '.join(RANDOM_TEACHERS)}")
    samples, images, video = demo_inputs(args, args.out or Path(tempfile.mkdtemp(prefix="esam3-bench-")))
    results: dict[str, Any] = {
        "benchmark": "teacher",
        "threads": torch.get_num_threads(),
        "images": len(images),
        "prompts": args.prompts,
        "batch_size": args.batch_size,
    }
    for name in names:
        results[name] = bench_teacher(name, args, samples, images, video)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
