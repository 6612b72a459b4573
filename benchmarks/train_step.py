"""Student steps per second at SAM3's full size: is the reader or the student the limit of stage-1 training?

For each student (``--students``): one stage-1 optimizer step at the full teacher geometry (input 1008 x 1008
uint8, trunk 1024 x 72 x 72, K = ``--prompts`` prompts per image decoded by SAM3's full-size tracker heads with
288 x 288 mask logits; random weights, synthetic targets) = student forward, the frozen heads for every prompt,
every loss term, backward through heads and student, AdamW. Timed after ``--warmup`` steps as the median of
``--repeats``; also with prompt-in-the-loop off (features only). Rows/s are images per second on this machine's
``torch.get_num_threads()`` threads, next to what the store's reader delivers (``benchmarks/train_reader.py``).
One JSON line.

    python benchmarks/train_step.py [--students es-ev-s,es-rv-m,es-tv-m] [--batch 2] [--prompts 16] [--size 1008]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from esam3.train.losses import LossWeights, stage1_terms  # noqa: E402
from esam3.train.students import REGISTRY, Student, StudentSpec  # noqa: E402
from esam3.workers.heads import TeacherHeads  # noqa: E402
from esam3.workers.teacher_loading import teacher_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", default="es-ev-s,es-rv-m,es-tv-m", help="comma-separated students")
    parser.add_argument(
        "--teacher",
        default="full-random",
        choices=["tiny-random", "small-random", "full-random"],
        help="whose geometry (sizes only; its heads are built with random weights)",
    )
    parser.add_argument("--batch", type=int, default=2, help="images per step (>= 1)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per image (>= 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (>= 0)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps (>= 1)")
    return checked(parser, parser.parse_args(argv), {"batch": 1, "prompts": 1, "warmup": 0, "repeats": 1})


def checked(parser: argparse.ArgumentParser, args: argparse.Namespace, minimums: dict[str, int]) -> argparse.Namespace:
    """``--students`` as a list of registry names, and each of ``minimums`` at least its value (else exit 2)."""
    args.students = [s.strip() for s in args.students.split(",") if s.strip()]
    if not args.students or any(s not in REGISTRY for s in args.students):
        parser.error(f"--students: expected names from {', '.join(REGISTRY)}, got {args.students}")
    for name, low in minimums.items():
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be at least {low}")
    return args


def synthetic_batch(geometry: Any, batch: int, prompts: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A collated batch as ``StoreDataset`` gives it: one click, one box, then a click + box, in turn."""
    s, g, m, c = geometry.image_size, geometry.grid, geometry.mask_size, geometry.trunk_width
    kinds = torch.arange(prompts) % 3
    centres = torch.rand(batch, prompts, 2, generator=generator) * s * 0.6 + s * 0.2
    points = centres[:, :, None, :]
    labels = torch.where(kinds == 1, -1, 1).expand(batch, prompts)[..., None].clone()
    boxes = torch.cat([centres - s * 0.1, centres + s * 0.1], dim=-1)
    boxes[:, kinds == 0] = float("nan")
    return {
        "input": torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8, generator=generator),
        "trunk": torch.randn(batch, c, g, g, generator=generator),
        "prompt_valid": torch.ones(batch, prompts, dtype=torch.bool),
        "prompt_points": points,
        "prompt_labels": labels,
        "prompt_boxes": boxes,
        "multi_logits": torch.randn(batch, prompts, 3, m, m, generator=generator) * 4,
        "single_logits": torch.randn(batch, prompts, 1, m, m, generator=generator) * 4,
        "iou": torch.rand(batch, prompts, 4, generator=generator),
    }


def time_steps(
    student: Student, heads: TeacherHeads | None, batch: dict[str, torch.Tensor], weights: LossWeights, warmup: int, repeats: int
) -> float:
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    times = []
    for step in range(warmup + repeats):
        started = time.perf_counter()
        terms, _ = stage1_terms(heads, student(batch["input"]), batch, weights)
        terms["total"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = teacher_config(args.teacher)
    heads = TeacherHeads.build(config, detector=False)
    heads.requires_grad_(False)
    geometry = heads.geometry
    batch = synthetic_batch(geometry, args.batch, args.prompts, torch.Generator().manual_seed(0))
    result: dict[str, Any] = {
        "teacher_geometry": args.teacher,
        "image_size": geometry.image_size,
        "mask_size": geometry.mask_size,
        "batch": args.batch,
        "prompts": args.prompts,
        "threads": torch.get_num_threads(),
        "students": {},
    }
    for name in args.students:
        torch.manual_seed(0)
        student = Student(StudentSpec(name, geometry.trunk_width, geometry.grid, geometry.image_size)).train()
        with_prompts = time_steps(student, heads, batch, LossWeights(), args.warmup, args.repeats)
        features = time_steps(student, None, batch, LossWeights(prompt=0, iou=0), args.warmup, args.repeats)
        result["students"][name] = {
            "backbone_parameters_m": round(student.backbone_parameters() / 1e6, 2),
            "step_seconds": with_prompts,
            "rows_per_s": args.batch / with_prompts,
            "features_only_step_seconds": features,
            "features_only_rows_per_s": args.batch / features,
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
