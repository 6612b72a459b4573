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
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from esam3.schemas.train import Stage2Config  # noqa: E402
from esam3.train.memory import StudentMemory, attention_cost, expected_parameters  # noqa: E402
from esam3.train.students import REGISTRY, Student, StudentSpec  # noqa: E402
from esam3.train.tracker import memory_spec  # noqa: E402
from esam3.workers.heads import TeacherHeads  # noqa: E402
from esam3.workers.preprocess import normalize  # noqa: E402
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


def timed(run: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median milliseconds of ``run`` over ``repeats`` runs after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = teacher_config(args.teacher)
    torch.manual_seed(0)
    heads = TeacherHeads.build(config, detector=False)
    g = heads.geometry
    tracker = heads.tracker_model
    options = Stage2Config(store="-", out=Path("-"), init=Path("-"))  # the stage-2 defaults
    spec = memory_spec(heads, options)
    pixels = torch.randint(0, 256, (1, 3, g.image_size, g.image_size), dtype=torch.uint8)
    trunk = torch.randn(1, g.trunk_width, g.grid, g.grid)
    feats, positions = heads.tracker_features(trunk)
    embeddings = heads.image_embeddings(trunk)
    high_res = torch.zeros(1, 1, g.image_size, g.image_size)
    pointers = spec.max_pointers * spec.pointer_tokens
    shared = {
        "neck": timed(lambda: heads.tracker_features(trunk), args.repeats),
        "mask_decoder": timed(lambda: heads.decode_each(embeddings, None, None, True), args.repeats),
        "memory_encoder": timed(lambda: tracker._encode_new_memory(feats[-1], high_res, torch.ones(1, 1, 1), False), args.repeats),
    }

    dense = torch.randn(spec.memory_frames * g.grid**2 + pointers, 1, g.memory_channels)
    sam3_parts = dict(shared, memory_attention=timed(lambda: tracker.memory_attention(
        current_vision_features=feats[-1], memory=dense, current_vision_position_embeddings=positions[-1],
        memory_posision_embeddings=torch.randn_like(dense), num_object_pointer_tokens=pointers), args.repeats))
    if not args.skip_sam3_trunk:
        from transformers.models.sam3.modeling_sam3 import Sam3ViTModel

        vit = Sam3ViTModel(config.detector_config.vision_config.backbone_config).eval()
        sam3_parts["trunk"] = timed(lambda: vit(normalize(pixels)), args.trunk_repeats, warmup=0)
        vit_parameters = sum(p.numel() for p in vit.parameters())
        del vit
    cost = attention_cost(spec)
    memory_attention_parameters = sum(p.numel() for p in tracker.memory_attention.parameters())
    result: dict[str, Any] = {
        "teacher_geometry": args.teacher, "image_size": g.image_size, "grid": g.grid, "threads": torch.get_num_threads(),
        "memory_frames": spec.memory_frames, "object_pointers": spec.max_pointers,
        "sam3": {"parts_ms": sam3_parts, "frame_ms": sum(sam3_parts.values()), "trunk_included": not args.skip_sam3_trunk,
                 "memory_tokens_per_frame": cost["dense_tokens_per_frame"], "memory_keys": cost["dense_memory_keys"],
                 "cross_attention_gmacs": cost["dense_cross_attention_macs"] / 1e9 * tracker.config.memory_attention_num_layers,
                 "memory_attention_parameters_m": memory_attention_parameters / 1e6},
        "students": {},
    }
    if not args.skip_sam3_trunk:
        result["sam3"]["trunk_parameters_m"] = vit_parameters / 1e6
    memory = StudentMemory(spec).eval()
    position = torch.randn(1, g.memory_channels, g.grid, g.grid)
    latents = memory.compress(torch.randn(1, g.memory_channels, g.grid, g.grid), position)
    bank = memory.bank([(0, latents)] + [(k, latents) for k in range(1, spec.memory_frames)],
                       [(k, torch.randn(1, g.hidden)) for k in range(spec.max_pointers)])
    top = feats[-1].permute(1, 2, 0).reshape(1, g.hidden, g.grid, g.grid)
    top_position = positions[-1].permute(1, 2, 0).reshape(1, g.hidden, g.grid, g.grid)
    student_memory = {
        "memory_attention": timed(lambda: memory(top, top_position, bank), args.repeats),
        "perceiver": timed(lambda: memory.compress(torch.randn(1, g.memory_channels, g.grid, g.grid), position), args.repeats),
    }
    counts = expected_parameters(spec)
    for name in args.students:
        student = Student(StudentSpec(name, g.trunk_width, g.grid, g.image_size)).eval()
        parts = dict(shared, **student_memory, encoder=timed(lambda: student(pixels), args.repeats))
        result["students"][name] = {
            "parts_ms": parts, "frame_ms": sum(parts.values()), "encoder_parameters_m": sum(p.numel() for p in student.parameters()) / 1e6,
            "memory_tokens_per_frame": spec.tokens_per_frame, "memory_keys": cost["memory_keys"],
            "cross_attention_gmacs": cost["cross_attention_macs"] / 1e9 * spec.attention_layers,
            "memory_parameters_m": counts["total"] / 1e6, "perceiver_parameters_m": counts["perceiver"] / 1e6,
            "memory_attention_speedup": sam3_parts["memory_attention"] / student_memory["memory_attention"],
            "frame_speedup": sum(sam3_parts.values()) / sum(parts.values()),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
