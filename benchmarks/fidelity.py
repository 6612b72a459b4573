"""The cache costs no accuracy: the same student trained from the cache and with the live teacher.

Demo SA-1B images are cached by a random SAM3 teacher (``--teacher``) once per codec (``--codecs``; ``compact`` is a
low-rank trunk with the chosen mask output stored at half the decoder's size: the smallest store). For each
store the same student (``--student``, same seed, images, prompts and order) trains ``--steps`` stage-1 steps
(a) from the store and (b) with the teacher computing every target online from the same batch
(``esam3.train.fidelity.LiveTargets``). Reported per codec: how far the two runs' losses are apart, step by step;
both students' mask mIoU against the teacher's masks and against the ground truth on
the held-out split of the fp16 store (one reference for every codec); the teacher's trunk forwards per epoch
(cache: once, at caching; online: every epoch) and the wall-clock of caching, training from the cache and
training online. One JSON line. Loss differences are those of the total loss, relative, per step (and per term,
absolute: small terms such as the IoU L1 make relative figures meaningless).

    python benchmarks/fidelity.py [--teacher small-random] [--student es-ev-s] [--steps 24] [--images 16]
        [--codecs fp16,int8,lowrank,compact]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from esam3.pipeline.demo_data import write_demo_data  # noqa: E402
from esam3.pipeline.plan import run_cache  # noqa: E402
from esam3.schemas.cache import CacheConfig  # noqa: E402
from esam3.schemas.demo import DemoDataConfig  # noqa: E402
from esam3.schemas.prompts import PromptConfig  # noqa: E402
from esam3.schemas.teacher import TeacherConfig  # noqa: E402
from esam3.schemas.train import Stage1Config  # noqa: E402
from esam3.train.evaluate import evaluate_store  # noqa: E402
from esam3.train.fidelity import LiveTargets  # noqa: E402
from esam3.train.model import StudentModel  # noqa: E402
from esam3.train.stage1 import run_stage1  # noqa: E402
from esam3.train.students import REGISTRY  # noqa: E402
from esam3.workers.teacher import Sam3Teacher  # noqa: E402

CODECS = ("fp16", "bf16", "int8", "lowrank", "compact")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="small-random", choices=["tiny-random", "small-random"], help="random SAM3 teacher")
    parser.add_argument("--student", default="es-ev-s", choices=sorted(REGISTRY), help="student to train")
    parser.add_argument("--steps", type=int, default=24, help="training steps of each run (>= 1)")
    parser.add_argument("--batch", type=int, default=4, help="images per step (>= 1)")
    parser.add_argument("--images", type=int, default=16, help="demo images to cache, in shards of 8 (>= 8)")
    parser.add_argument(
        "--codecs",
        default="fp16,int8,lowrank,compact",
        help=f"comma-separated store codecs ({', '.join(CODECS)}; compact: lowrank + masks at half size); fp16 always runs",
    )
    parser.add_argument("--rank", type=int, default=64, help="lowrank codec: basis size (>= 1)")
    parser.add_argument("--val-percent", type=float, default=25.0, help="held-out share for the eval (0 < P < 100)")
    parser.add_argument("--out", type=Path, default=None, help="working folder (default: a temp dir)")
    args = parser.parse_args(argv)
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    if not codecs or any(c not in CODECS for c in codecs):
        parser.error(f"--codecs: expected a comma-separated list of {', '.join(CODECS)}, got {args.codecs!r}")
    args.codecs = ["fp16", *[c for c in dict.fromkeys(codecs) if c != "fp16"]]
    for name in ("steps", "batch", "rank"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.images < 8:
        parser.error("--images must be at least 8 (one demo shard)")
    if not 0 < args.val_percent < 100:
        parser.error("--val-percent must be in (0, 100)")
    return args


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    os.environ["ESAM3_CACHE"] = str(work / "teachers")
    shards = -(-args.images // 8)
    data = DemoDataConfig(out=work / "data", sa1b_shards=shards, images_per_shard=8, sav_shards=0, image_short_side=320)
    write_demo_data(data)
    teacher = Sam3Teacher.load(TeacherConfig(source=args.teacher, batch_size=args.batch))
    result: dict[str, Any] = {
        "teacher": args.teacher,
        "student": args.student,
        "steps": args.steps,
        "batch": args.batch,
        "images": shards * 8,
        "codecs": {},
    }
    stores = {}
    for codec in args.codecs:
        started = time.perf_counter()
        stores[codec] = work / f"store-{codec}"
        compact = codec == "compact"  # the smallest store: low-rank trunk, the chosen mask output at half size
        run_cache(
            CacheConfig(
                dataset="sa-1b",
                source=str(data.out / "sa-1b"),
                store=str(stores[codec]),
                codec="lowrank" if compact else codec,
                rank=args.rank,
                prompts=PromptConfig(mask_size=teacher.geometry.mask_size // 2 if compact else None),
                teacher=TeacherConfig(source=args.teacher, batch_size=args.batch),
            ),
            executor="local",
        )
        cache_seconds = time.perf_counter() - started
        base = dict(
            store=str(stores[codec]),
            student=args.student,
            steps=args.steps,
            batch_size=args.batch,
            lr=1e-3,
            val_percent=args.val_percent,
            loader_workers=0,
            checkpoint_every=args.steps,
            seed=1,
        )
        cached_terms: list[dict[str, float]] = []
        live_terms: list[dict[str, float]] = []
        started = time.perf_counter()
        cached = run_stage1(Stage1Config(out=work / f"cached-{codec}", **base), on_step=lambda r: cached_terms.append(r.terms))
        cached_seconds = time.perf_counter() - started
        live = LiveTargets(teacher)
        started = time.perf_counter()
        run_stage1(Stage1Config(out=work / f"live-{codec}", **base), on_step=lambda r: live_terms.append(r.terms), targets=live)
        live_seconds = time.perf_counter() - started
        total = [abs(a["total"] - b["total"]) / abs(b["total"]) for a, b in zip(cached_terms, live_terms)]
        terms = {k: max(abs(a[k] - b[k]) for a, b in zip(cached_terms, live_terms)) for k in cached_terms[0]}
        evals = {
            arm: evaluate_store(
                StudentModel.from_checkpoint(work / f"{arm}-{codec}"), str(stores["fp16"]), split="val", val_percent=args.val_percent
            )
            for arm in ("cached", "live")
        }
        epochs = args.steps / (cached.train_rows // args.batch)  # whole batches per epoch (drop_last)
        result["codecs"][codec] = {
            "store_mb_per_image": sum(f.stat().st_size for f in (stores[codec] / "images.lance").rglob("*") if f.is_file())
            / 1e6
            / (shards * 8),
            "loss_relative_difference": {"first_step": total[0], "max": max(total), "last_step": total[-1]},
            "term_max_absolute_difference": terms,
            "loss": {"cached": [t["total"] for t in cached_terms], "live": [t["total"] for t in live_terms]},
            "miou_vs_teacher": {arm: e.miou_teacher for arm, e in evals.items()},
            "miou_vs_gt": {arm: e.miou_gt for arm, e in evals.items()},
            "feature_cosine": {arm: e.feature_cosine for arm, e in evals.items()},
            "epochs": epochs,
            "teacher_trunk_forwards": {"cache_once": shards * 8, "online_per_epoch": live.trunk_forwards / epochs},
            "seconds": {
                "cache": cache_seconds,
                "train_from_cache": cached_seconds,
                "train_online": live_seconds,
                "online_teacher_share": live.seconds / live_seconds,
            },
        }
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.out or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(json.dumps(run(args, work)))


if __name__ == "__main__":
    main()
