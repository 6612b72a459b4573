"""Pipeline efficiency: end-to-end cache rows/s divided by the teacher's own rows/s, same teacher and machine.

The cache must hide JPEG decode, resize, prompt sampling, encoding and Lance writes behind the teacher. Here:
SA-1B demo shards at full size (short side 1500), the ``small-random`` teacher (a 336 px SAM3 whose forward
takes ~190 ms per image on this CPU), trunk + prompt targets, int8 codec, local Ray.

* teacher-only: the teacher actor's own work (trunk + prompt decoding on ready pixels and prompts), timed in a
  Ray task with the same torch threads and CPUs the plan gives the actor (all cores but one on a CPU machine),
  and again with all cores;
* end-to-end: ``run_cache`` on fresh stores over half the shards and over all of them; rows/s of the full run,
  and the steady-state (marginal) rate = extra rows / extra seconds between the two runs, in which start-up
  (driver teacher load, actor start, teacher load) cancels out.

Prints one JSON line.

    python benchmarks/cache.py [--shards 4] [--images-per-shard 8] [--teacher small-random]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from esam3.pipeline.demo_data import write_demo_data
from esam3.pipeline.plan import run_cache
from esam3.pipeline.shards import DatasetName, select_shards
from esam3.schemas.cache import CacheConfig
from esam3.schemas.demo import DemoDataConfig
from esam3.schemas.prompts import PromptConfig
from esam3.schemas.teacher import TeacherConfig
from esam3.workers.read_step import ReadImages
from esam3.workers.teacher import Sam3Teacher
from esam3.workers.teacher_step import TeacherImages


def teacher_only_rows_per_s(config: CacheConfig, source: Path, threads: int, cpus: int) -> float:
    """The teacher actor's own throughput on ready WORK rows (read beforehand, not timed), measured inside a
    Ray actor with the resources the plan gives it."""
    import ray

    card = Sam3Teacher.load(config.teacher.model_copy(update={"device": "cpu"})).card
    read = ReadImages(str(source), card.geometry.image_size, config.prompts, True, config.dct_scaling)
    work = [batch for shard in select_shards(str(source), DatasetName.SA1B, "all") for batch in read(shard)]
    checksum = card.checksum

    @ray.remote(num_cpus=min(threads, cpus))
    def timed(batches: list[Any]) -> float:
        actor = TeacherImages(config.teacher, checksum, with_prompts=True, threads=threads)
        actor(batches[0].slice(0, 1))  # warm-up
        start = time.perf_counter()
        for batch in batches:
            actor(batch)
        return sum(b.num_rows for b in batches) / (time.perf_counter() - start)

    return ray.get(timed.remote(work))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=4, help="SA-1B demo shards (even, >= 2)")
    parser.add_argument("--images-per-shard", type=int, default=8, help="images per shard (full size)")
    parser.add_argument("--teacher", default="small-random", help="random teacher (forward >= 150 ms per image)")
    parser.add_argument("--codec", default="int8", choices=["fp16", "bf16", "int8"], help="feature codec")
    parser.add_argument("--out", type=Path, default=None, help="working folder (default: a temp dir)")
    args = parser.parse_args()
    if args.shards < 2 or args.shards % 2:
        parser.error("--shards must be even and at least 2")
    out = args.out or Path(tempfile.mkdtemp(prefix="esam3-bench-cache-"))
    write_demo_data(DemoDataConfig(out=out / "data", sa1b_shards=args.shards, images_per_shard=args.images_per_shard, sav_shards=0))
    source = out / "data" / "sa-1b"
    cpus = os.cpu_count() or 1
    actor_threads = max(1, cpus - 1)
    config = CacheConfig(
        dataset="sa-1b",
        source=str(source),
        store=str(out / "store"),
        codec=args.codec,
        teacher=TeacherConfig(source=args.teacher, batch_size=4),
        prompts=PromptConfig(num_prompts=16),
    )
    import ray

    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=False, configure_logging=False)
    teacher_same_threads = teacher_only_rows_per_s(config, source, actor_threads, cpus)
    teacher_all_cores = teacher_only_rows_per_s(config, source, cpus, cpus)
    runs = []
    for shards, store in ((f"0-{args.shards // 2 - 1}", "store-half"), ("all", "store-all")):
        run_config = config.model_copy(update={"shards": shards, "store": str(out / store)})
        start = time.perf_counter()
        report = run_cache(run_config, executor="ray")
        runs.append((report, time.perf_counter() - start))
    (half, t_half), (report, total) = runs
    rows = report.rows
    # Marginal rate: the extra rows of the full run over its extra time (start-up costs cancel out).
    steady = (rows - half.rows) / (total - t_half)
    result: dict[str, Any] = {
        "benchmark": "cache",
        "cpus": cpus,
        "teacher": args.teacher,
        "codec": args.codec,
        "rows": rows,
        "shards": report.shards_committed,
        "teacher_actor_threads": actor_threads,
        "teacher_only_rows_per_s": round(teacher_same_threads, 3),
        "teacher_only_all_cores_rows_per_s": round(teacher_all_cores, 3),
        "end_to_end_rows_per_s": round(rows / total, 3),
        "steady_state_rows_per_s": round(steady, 3),
        "efficiency_steady": round(steady / teacher_same_threads, 3),
        "efficiency_end_to_end": round(rows / total / teacher_same_threads, 3),
        "efficiency_steady_vs_all_cores": round(steady / teacher_all_cores, 3),
        "bytes_per_row": round(report.bytes / max(1, rows)),
        "seconds": round(total, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
