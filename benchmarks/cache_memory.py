"""Does the cache job stream? Peak RSS of the driver and of the Ray workers for 1 shard vs 4 shards.

Each run is a fresh process (so its peak RSS is its own) caching full-size SA-1B demo shards with the tiny
teacher on a local Ray; a thread samples the RSS of every ``ray::`` worker process from /proc (Linux) every
50 ms. Flat numbers from 1 to 4 shards mean nothing accumulates per shard (no ``materialize()``, fragments
committed as shards finish). Prints one JSON line.

    python benchmarks/cache_memory.py [--images-per-shard 16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, os, resource, sys, threading, time
from pathlib import Path
from esam3.pipeline.plan import run_cache
from esam3.schemas.cache import CacheConfig

peak = {"workers": 0}
stop = threading.Event()

def sample():
    while not stop.is_set():
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if b"ray::" not in (entry / "cmdline").read_bytes():
                    continue
                for line in (entry / "status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        peak["workers"] = max(peak["workers"], int(line.split()[1]) // 1024)
            except OSError:
                continue
        time.sleep(0.05)

thread = threading.Thread(target=sample, daemon=True)
thread.start()
source, store, shards = sys.argv[1:4]
report = run_cache(CacheConfig(dataset="sa-1b", source=source, store=store, shards=shards), executor="ray")
stop.set()
thread.join()
print(json.dumps({"rows": report.rows, "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                  "worker_peak_rss_mb": peak["workers"]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images-per-shard", type=int, default=16, help="full-size images per SA-1B shard")
    parser.add_argument("--out", type=Path, default=None, help="working folder (default: a temp dir)")
    args = parser.parse_args()
    from esam3.pipeline.demo_data import write_demo_data
    from esam3.schemas.demo import DemoDataConfig

    out = args.out or Path(tempfile.mkdtemp(prefix="esam3-bench-memory-"))
    write_demo_data(DemoDataConfig(out=out / "data", sa1b_shards=4, images_per_shard=args.images_per_shard, sav_shards=0))
    result: dict[str, object] = {"benchmark": "cache_memory", "images_per_shard": args.images_per_shard}
    for shards, label in (("0", "1_shard"), ("0-3", "4_shards")):
        run = subprocess.run(
            [sys.executable, "-c", CHILD, str(out / "data" / "sa-1b"), str(out / f"store-{label}"), shards],
            capture_output=True,
            text=True,
            check=True,
        )
        result[label] = json.loads(run.stdout.strip().splitlines()[-1])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
