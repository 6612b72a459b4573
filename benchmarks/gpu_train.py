"""Stage-1 training on a GPU from a full-size store: student steps/s and the share of step time spent waiting for data.

For when a GPU is lent (one short prepared script). It makes a random-weight store on the machine itself: demo
JPEGs (~2250 x 1500) as inputs, synthetic int8 1024 x 72 x 72 trunks and K prompt targets at 288 x 288, written
through the cache's own encode and write steps (``benchmarks/train_reader.py``), plus SAM3's full-size tracker heads
with random weights as the store's heads file. Then ``esam3.train.stage1.run_stage1`` trains each student
(``--students``) for ``--steps`` steps with spawned DataLoader workers and reports what its progress reports: rows/s
and the share of wall time the loop waited for the loader (goal: under 5%). Writes ``$OUT/gpu_train.json`` when
``OUT`` is set, and prints one JSON line. ``--device cpu --teacher tiny-random`` runs it here (CI).

    python benchmarks/gpu_train.py [--students es-ev-s,es-rv-m,es-tv-m] [--rows 64] [--steps 30] [--batch 16] [--loader-workers 8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from train_reader import build  # noqa: E402
from train_step import checked  # noqa: E402

from esam3.schemas.store import HEADS_DIR  # noqa: E402
from esam3.schemas.train import Stage1Config  # noqa: E402
from esam3.train.stage1 import run_stage1  # noqa: E402
from esam3.workers.heads import TeacherHeads  # noqa: E402
from esam3.workers.teacher_loading import random_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", default="es-ev-s,es-rv-m,es-tv-m", help="comma-separated students")
    parser.add_argument("--teacher", default="full-random", choices=["tiny-random", "small-random", "full-random"], help="store geometry")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where to train")
    parser.add_argument("--rows", type=int, default=64, help="rows in the store (>= --batch)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per image (>= 1)")
    parser.add_argument("--steps", type=int, default=30, help="steps per student; the first one is not timed (>= 2)")
    parser.add_argument("--batch", type=int, default=16, help="images per step (>= 1)")
    parser.add_argument("--loader-workers", type=int, default=8, help="spawned DataLoader workers (>= 0)")
    args = checked(parser, parser.parse_args(argv), {"prompts": 1, "steps": 2, "batch": 1, "loader_workers": 0})
    if args.rows < args.batch:
        parser.error("--rows must be at least --batch")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device (use --device cpu)")
    return args


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    info = build(work, args.rows, args.prompts, teacher=args.teacher)
    heads = TeacherHeads.build(random_config(args.teacher), detector=False)
    heads.save(work / "store" / HEADS_DIR, {"teacher": f"{args.teacher} (random heads)"})
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    result: dict[str, Any] = {
        "device": device,
        "teacher_geometry": args.teacher,
        "rows": info["rows"],
        "batch": args.batch,
        "prompts": args.prompts,
        "loader_workers": args.loader_workers,
        "students": {},
    }
    for name in args.students:
        config = Stage1Config(
            store=str(work / "store"),
            out=work / f"run-{name}",
            student=name,
            steps=args.steps,
            batch_size=args.batch,
            val_percent=0,
            loader_workers=args.loader_workers,
            device=args.device,
            log_every=args.steps,
            checkpoint_every=args.steps,
            lr=1e-4,
        )
        trained = run_stage1(config)
        result["students"][name] = {
            "rows_per_s": trained.samples_per_sec,
            "steps_per_s": trained.samples_per_sec / args.batch,
            "data_wait_share": trained.data_wait,
            "final_loss": trained.terms["total"],
        }
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args, Path(tmp))
    line = json.dumps(result)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_train.json").write_text(line)
    print(line)


if __name__ == "__main__":
    main()
