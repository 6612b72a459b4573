"""How fast the sources stream and validate demo shards on one core: SA-1B images/s and SA-V frames/s.

The cache must hide this work behind the teacher (~60 images/s per H100 is the goal), so it tells how many
CPU cores per GPU the read + check step needs. Prints one JSON line.

    python benchmarks/sources.py [--images 64] [--videos 4] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


from esam3.pipeline.demo_data import write_demo_data
from esam3.pipeline.sources import SA1BSource, SAVSource
from esam3.schemas.demo import DemoDataConfig


def _rate(items: int, seconds: float) -> float:
    return round(items / seconds, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="SA-1B images (full size) to generate and read")
    parser.add_argument("--videos", type=int, default=4, help="SA-V videos (640x480, 10 s) to generate and read")
    parser.add_argument("--out", type=Path, default=None, help="where to write the shards (default: a temp dir)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="esam3-bench-"))
    config = DemoDataConfig(
        out=out, sa1b_shards=1, images_per_shard=args.images, sav_shards=1, videos_per_shard=args.videos, video_seconds=10.0
    )
    write_demo_data(config)
    results: dict[str, object] = {"benchmark": "sources", "images": args.images, "videos": args.videos}
    for check in (False, True):
        start = time.perf_counter()
        n = sum(1 for _ in SA1BSource(str(out / "sa-1b"), check_pixels=check).iter_samples("all"))
        results[f"sa1b_images_per_s_check_pixels_{str(check).lower()}"] = _rate(n, time.perf_counter() - start)
    tar = out / "sa-1b" / "sa_000000.tar"
    results["sa1b_mb_per_image"] = round(tar.stat().st_size / args.images / 1e6, 3)
    for frames in ("annotated", "all"):
        start = time.perf_counter()
        kept = sum(len(v.frames) for v in SAVSource(str(out / "sa-v"), frames=frames).iter_samples("all"))
        elapsed = time.perf_counter() - start
        results[f"sav_{frames}_frames_kept_per_s"] = _rate(kept, elapsed)
        results[f"sav_{frames}_video_frames_decoded_per_s"] = _rate(args.videos * config.video_frames, elapsed)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
