"""The cache costs the memory nothing: the same stage-2 student trained from the cache and with the live teacher.

Demo SA-V videos are cached by a random SAM3 teacher (``--teacher``) once per codec (``--codecs``); a stage-1
student (``--student``) is trained ``--stage1-steps`` steps on a demo SA-1B store of the same teacher. Then for each
SA-V store the same stage-2 run (same seed, clips, objects, teacher-forcing draws) trains ``--steps`` steps
(a) from the store and (b) with the teacher tracking every clip's video online from the store's frames and the
cache's prompts (``esam3.train.fidelity.LiveVideoTargets``). Reported per codec: how far the two runs' losses are
apart step by step (the total relative, each term absolute); both students' J&F on the videos (against the ground
truth and the fp16 store's teacher masks) and their memory map's cosine with the teacher's; the teacher's frame
passes (cache: once; online: every epoch) and the wall-clock of each arm. One JSON line.

    python benchmarks/fidelity_memory.py [--teacher small-random] [--student es-ev-s] [--steps 16] [--codecs fp16,int8]
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
from esam3.schemas.teacher import TeacherConfig  # noqa: E402
from esam3.schemas.train import Stage1Config, Stage2Config  # noqa: E402
from esam3.train.fidelity import LiveVideoTargets  # noqa: E402
from esam3.train.stage1 import run_stage1  # noqa: E402
from esam3.train.stage2 import run_stage2  # noqa: E402
from esam3.train.students import REGISTRY  # noqa: E402
from esam3.train.video_eval import evaluate_video_store  # noqa: E402
from esam3.train.video_model import VideoStudentModel  # noqa: E402
from esam3.workers.teacher import Sam3Teacher  # noqa: E402

CODECS = ("fp16", "bf16", "int8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="small-random", choices=["tiny-random", "small-random"], help="random SAM3 teacher")
    parser.add_argument("--student", default="es-ev-s", choices=sorted(REGISTRY), help="stage-1 student encoder")
    parser.add_argument("--steps", type=int, default=16, help="stage-2 steps of each run (>= 1)")
    parser.add_argument("--stage1-steps", type=int, default=4, help="stage-1 steps of the encoder both runs start from (>= 1)")
    parser.add_argument("--clip-length", type=int, default=4, help="frames per clip (>= 2)")
    parser.add_argument("--batch", type=int, default=2, help="clips per step (>= 1)")
    parser.add_argument("--videos", type=int, default=2, help="demo videos of 1.5 s (9 annotated frames) to cache (>= 1)")
    parser.add_argument("--codecs", default="fp16,int8", help=f"comma-separated store codecs ({', '.join(CODECS)}); fp16 always runs")
    parser.add_argument("--out", type=Path, default=None, help="working folder (default: a temp dir)")
    args = parser.parse_args(argv)
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    if not codecs or any(c not in CODECS for c in codecs):
        parser.error(f"--codecs: expected a comma-separated list of {', '.join(CODECS)}, got {args.codecs!r}")
    args.codecs = ["fp16", *[c for c in dict.fromkeys(codecs) if c != "fp16"]]
    for name, low in (("steps", 1), ("stage1_steps", 1), ("clip_length", 2), ("batch", 1), ("videos", 1)):
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be at least {low}")
    return args


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    os.environ["ESAM3_CACHE"] = str(work / "teachers")
    data = DemoDataConfig(
        out=work / "data",
        sa1b_shards=1,
        images_per_shard=8,
        sav_shards=1,
        videos_per_shard=args.videos,
        image_short_side=320,
        video_width=320,
        video_height=240,
        video_seconds=1.5,
    )
    write_demo_data(data)
    teacher_config = TeacherConfig(source=args.teacher, batch_size=4)
    teacher = Sam3Teacher.load(teacher_config)
    images = work / "store-sa1b"
    run_cache(CacheConfig(dataset="sa-1b", source=str(data.out / "sa-1b"), store=str(images), teacher=teacher_config), executor="local")
    stage1 = work / "stage1"
    run_stage1(
        Stage1Config(
            store=str(images),
            out=stage1,
            student=args.student,
            steps=args.stage1_steps,
            batch_size=4,
            val_percent=0,
            loader_workers=0,
            lr=1e-3,
        )
    )
    result: dict[str, Any] = {
        "teacher": args.teacher,
        "student": args.student,
        "steps": args.steps,
        "clip_length": args.clip_length,
        "batch": args.batch,
        "videos": args.videos,
        "codecs": {},
    }
    stores: dict[str, Path] = {}
    for codec in args.codecs:
        started = time.perf_counter()
        stores[codec] = work / f"store-{codec}"
        run_cache(
            CacheConfig(dataset="sa-v", source=str(data.out / "sa-v"), store=str(stores[codec]), codec=codec, teacher=teacher_config),
            executor="local",
        )
        cache_seconds = time.perf_counter() - started
        base = dict(
            store=str(stores[codec]),
            init=stage1,
            steps=args.steps,
            batch_size=args.batch,
            clip_length=args.clip_length,
            val_percent=0,
            loader_workers=0,
            checkpoint_every=args.steps,
            seed=1,
            lr=1e-3,
            global_latents=16,
            memory_ffn=512,
        )
        arms: dict[str, list[dict[str, float]]] = {"cached": [], "live": []}
        seconds: dict[str, float] = {}
        lives: list[LiveVideoTargets] = []

        def live_targets(clips: Any) -> LiveVideoTargets:
            lives.append(LiveVideoTargets(teacher, clips))
            return lives[-1]

        for arm, targets in (("cached", None), ("live", live_targets)):
            started = time.perf_counter()
            run_stage2(
                Stage2Config(out=work / f"{arm}-{codec}", **base), on_step=lambda r, arm=arm: arms[arm].append(r.terms), targets=targets
            )
            seconds[arm] = time.perf_counter() - started
        cached, live = arms["cached"], arms["live"]
        total = [abs(a["total"] - b["total"]) / abs(b["total"]) for a, b in zip(cached, live)]
        evals = {
            arm: evaluate_video_store(VideoStudentModel.from_checkpoint(work / f"{arm}-{codec}"), str(stores["fp16"]), split="all")
            for arm in arms
        }
        result["codecs"][codec] = {
            "loss_relative_difference": {"first_step": total[0], "max": max(total), "last_step": total[-1]},
            "term_max_absolute_difference": {k: max(abs(a[k] - b[k]) for a, b in zip(cached, live)) for k in cached[0]},
            "loss": {arm: [t["total"] for t in terms] for arm, terms in arms.items()},
            "jf_vs_gt": {arm: e.jf_gt["J&F"] for arm, e in evals.items()},
            "jf_vs_teacher": {arm: e.jf_teacher["J&F"] for arm, e in evals.items()},
            "memory_cosine": {arm: e.memory_cosine for arm, e in evals.items()},
            "teacher_frame_passes": {"cache_once": evals["cached"].frames, "online": lives[0].frame_forwards},
            "seconds": {
                "cache": cache_seconds,
                "train_from_cache": seconds["cached"],
                "train_online": seconds["live"],
                "online_teacher_share": lives[0].seconds / seconds["live"],
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
