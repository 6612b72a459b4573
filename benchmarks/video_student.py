"""Per-frame cost of tracking one object: the stage-2 student vs SAM3's tracker, same input size, this CPU.

Both on random weights at a teacher's geometry (``--teacher``; default ``full-random``: SAM3's own sizes, 1008 px,
a 72 x 72 memory). One tracked frame = image encoder (the student's backbone + head; SAM3's ViT trunk) -> the
tracker neck -> memory attention over ``memory_frames`` spatial memories (the conditioning frame + 6 recent ones)
and 16 object pointers (SAM3: 4 layers over 7 x 5,184 dense tokens; the student: 2 layers over its Perceiver's
tokens) -> the mask decoder -> the memory encoder (+ the student's Perceiver compressing that new memory once).
Each part is timed as the median of ``--repeats`` after one warm-up (SAM3's trunk: ``--trunk-repeats`` runs, it
takes about a minute on 2 cores at full size; ``--skip-sam3-trunk`` leaves it out); the cross-attention's
multiply-adds (counted) next to its measured ms. One JSON line.

    python benchmarks/video_student.py [--teacher full-random] [--students es-rv-m] [--repeats 3] [--skip-sam3-trunk]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from esam3.schemas.train import Stage2Config  # noqa: E402
from esam3.train.memory import StudentMemory, attention_cost, expected_parameters  # noqa: E402
from esam3.train.students import REGISTRY, Student, StudentSpec  # noqa: E402
from esam3.train.tracker import memory_spec  # noqa: E402
from esam3.train.video_cost import FrameCost  # noqa: E402
from esam3.workers.heads import TeacherHeads  # noqa: E402
from esam3.workers.teacher_loading import teacher_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="full-random", choices=["tiny-random", "small-random", "full-random"], help="whose geometry")
    parser.add_argument("--students", default="es-rv-m", help="comma-separated student encoders")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each part (>= 1)")
    parser.add_argument("--trunk-repeats", type=int, default=1, help="timed runs of SAM3's trunk (>= 1)")
    parser.add_argument("--skip-sam3-trunk", action="store_true", help="leave SAM3's trunk out (its frame time is then without it)")
    args = parser.parse_args(argv)
    args.students = [s.strip() for s in args.students.split(",") if s.strip()]
    if not args.students or any(s not in REGISTRY for s in args.students):
        parser.error(f"--students: expected names from {', '.join(REGISTRY)}, got {args.students}")
    for name in ("repeats", "trunk_repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def trunk_parameters(config: Any) -> int:
    """SAM3's ViT trunk's parameters, counted on the meta device."""
    from transformers.models.sam3.modeling_sam3 import Sam3ViTModel

    with torch.device("meta"):
        return sum(p.numel() for p in Sam3ViTModel(config.detector_config.vision_config.backbone_config).parameters())


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = teacher_config(args.teacher)
    torch.manual_seed(0)
    heads = TeacherHeads.build(config, detector=False)
    g = heads.geometry
    tracker = heads.tracker_model
    spec = memory_spec(config, Stage2Config(store="-", out=Path("-"), init=Path("-")))  # the stage-2 defaults
    cost = FrameCost(heads, spec, args.repeats)
    shared = cost.shared()
    sam3_parts = dict(shared, **cost.sam3(config, trunk_repeats=None if args.skip_sam3_trunk else args.trunk_repeats))
    attention = attention_cost(spec)
    layers = tracker.config.memory_attention_num_layers
    result: dict[str, Any] = {
        "teacher_geometry": args.teacher,
        "image_size": g.image_size,
        "grid": g.grid,
        "threads": torch.get_num_threads(),
        "memory_frames": spec.memory_frames,
        "object_pointers": spec.max_pointers,
        "sam3": {
            "parts_ms": sam3_parts,
            "frame_ms": sum(sam3_parts.values()),
            "trunk_included": not args.skip_sam3_trunk,
            "memory_tokens_per_frame": attention["dense_tokens_per_frame"],
            "memory_keys": attention["dense_memory_keys"],
            "cross_attention_gmacs": attention["dense_cross_attention_macs"] / 1e9 * layers,
            "memory_attention_parameters_m": sum(p.numel() for p in tracker.memory_attention.parameters()) / 1e6,
            "trunk_parameters_m": trunk_parameters(config) / 1e6,
        },
        "students": {},
    }
    memory = StudentMemory(spec).eval()
    counts = expected_parameters(spec)
    for name in args.students:
        student = Student(StudentSpec(name, g.trunk_width, g.grid, g.image_size)).eval()
        parts = dict(shared, **cost.student(student, memory))
        result["students"][name] = {
            "parts_ms": parts,
            "frame_ms": sum(parts.values()),
            "encoder_parameters_m": sum(p.numel() for p in student.parameters()) / 1e6,
            "memory_tokens_per_frame": spec.tokens_per_frame,
            "memory_keys": attention["memory_keys"],
            "cross_attention_gmacs": attention["cross_attention_macs"] / 1e9 * spec.attention_layers,
            "memory_parameters_m": counts["total"] / 1e6,
            "perceiver_parameters_m": counts["perceiver"] / 1e6,
            "memory_attention_speedup": sam3_parts["memory_attention"] / parts["memory_attention"],
            "frame_speedup": sum(sam3_parts.values()) / sum(parts.values()),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
