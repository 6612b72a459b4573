"""What ``--fast-decode`` saves and what it costs: CPU per image, and how far the teacher's input and trunk move.

The default decode is SAM3's own preprocessing (the full JPEG, then the antialiased squash to S x S);
``--fast-decode`` decodes at libjpeg's smallest DCT scale with both sides >= S first. On full-size demo SA-1B
images (short side 1500, ~2250x1500) this times both decodes (CPU seconds of one core), and compares the S x S
inputs (mean / max absolute grey-level difference) at S = 1008 (SAM3) and at the random teachers' sizes, and the
trunk each gives with a random-weight teacher (relative RMS, cosine). Random weights are not SAM3's: the trunk
error is a lower bound of sorts for how a ViT reacts, the pixel difference is the teacher-independent part.

    python benchmarks/fast_decode.py [--images 8] [--teacher small-random]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from esam3.pipeline.demo_data import write_demo_data
from esam3.pipeline.sources import SA1BSource
from esam3.schemas.demo import DemoDataConfig
from esam3.schemas.teacher import RANDOM_TEACHERS, TeacherConfig
from esam3.workers.decode import decode_for_teacher
from esam3.workers.preprocess import normalize
from esam3.workers.teacher import Sam3Teacher


def cpu_ms(fn, repeats: int = 3) -> float:
    start = time.process_time()
    for _ in range(repeats):
        fn()
    return 1000 * (time.process_time() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8, help="full-size demo images (>= 1)")
    parser.add_argument(
        "--teacher",
        choices=[t for t in RANDOM_TEACHERS if t != "full-random"],
        default="small-random",
        help="random teacher whose trunk is compared",
    )
    parser.add_argument("--short-side", type=int, default=1500, help="demo image short side (SA-1B: 1500)")
    args = parser.parse_args()
    if args.images < 1 or args.short_side < 64:
        parser.error("--images must be at least 1 and --short-side at least 64")
    torch.set_num_threads(1)
    out = Path(tempfile.mkdtemp(prefix="esam3-bench-decode-"))
    write_demo_data(DemoDataConfig(out=out, sa1b_shards=1, images_per_shard=args.images, sav_shards=0, image_short_side=args.short_side))
    jpegs = [s.jpeg for s in SA1BSource(str(out / "sa-1b")).iter_samples("all")]
    teacher = Sam3Teacher.load(TeacherConfig(source=args.teacher, batch_size=1))
    result: dict[str, object] = {"benchmark": "fast_decode", "images": len(jpegs), "short_side": args.short_side}
    for size in sorted({1008, teacher.geometry.image_size}):
        exact_ms = np.mean([cpu_ms(lambda j=j: decode_for_teacher(j, size, False)) for j in jpegs])
        fast_ms = np.mean([cpu_ms(lambda j=j: decode_for_teacher(j, size, True)) for j in jpegs])
        diffs, maxes = [], []
        for jpeg in jpegs:
            exact, _, _ = decode_for_teacher(jpeg, size, False)
            fast, _, decoded = decode_for_teacher(jpeg, size, True)
            delta = (exact.int() - fast.int()).abs()
            diffs.append(float(delta.float().mean()))
            maxes.append(int(delta.max()))
        entry: dict[str, object] = {
            "decoded_at": list(decoded),
            "cpu_ms_exact": round(float(exact_ms), 1),
            "cpu_ms_fast": round(float(fast_ms), 1),
            "cpu_saving_ms": round(float(exact_ms - fast_ms), 1),
            "mean_abs_grey_levels": round(float(np.mean(diffs)), 3),
            "max_abs_grey_levels": max(maxes),
        }
        if size == teacher.geometry.image_size:
            errors, cosines = [], []
            for jpeg in jpegs:
                pair = torch.stack([decode_for_teacher(jpeg, size, flag)[0] for flag in (False, True)])
                with torch.inference_mode():
                    exact_trunk, fast_trunk = teacher.trunk_features(normalize(pair)).float()
                errors.append(float((fast_trunk - exact_trunk).norm() / exact_trunk.norm()))
                cosines.append(float(torch.nn.functional.cosine_similarity(fast_trunk.flatten(), exact_trunk.flatten(), dim=0)))
            entry.update(
                teacher=args.teacher,
                trunk_rel_rms_mean=round(float(np.mean(errors)), 4),
                trunk_rel_rms_max=round(float(np.max(errors)), 4),
                trunk_cosine_min=round(float(np.min(cosines)), 5),
            )
        result[f"S={size}"] = entry
    print(json.dumps(result))


if __name__ == "__main__":
    main()
