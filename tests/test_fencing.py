"""Fenced commits on a real S3 server: a run that stalls past its claim's expiry, with its rows of a shard already
appended, while a second run takes the shard over, caches and commits it. When the first run goes on, exactly one
copy of the shard is visible, the ledger holds one entry, and ``store verify`` passes.

(Before fencing, the second run deleted the first one's rows at its start and the first then ledgered rows that
were gone: two ledger entries, a shard counted twice.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest

from esam3.pipeline.plan import run_cache
from esam3.pipeline.store import Store, claims
from esam3.pipeline.store.check import verify_store
from esam3.pipeline.store.commits import ledger_entries
from esam3.pipeline.store.rows import StoreRows
from tests.test_cache import config

ROOT = Path(__file__).resolve().parents[1]
#: Run A: caches shard 0 into the store and stops itself (SIGSTOP) right after its rows' Append, before it commits.
RUN_A = """
import json, logging, os, signal, sys
from lance import LanceDataset
from esam3.pipeline.plan import run_cache
from tests.test_cache import config

logging.basicConfig(level=logging.WARNING)
append = LanceDataset.commit

def append_then_stall(*args, **kwargs):
    result = append(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGSTOP)  # a brown-out: no heartbeat, no request, until SIGCONT
    return result

LanceDataset.commit = staticmethod(append_then_stall)
report = run_cache(config(sys.argv[1], sys.argv[2], shards="0", codec="fp16", run_id="run-a"), executor="local")
print(json.dumps(report.to_json(), default=str))
"""


def _wait(condition, what: str, timeout: float = 120.0) -> None:
    """Poll ``condition`` until it holds (a safety deadline only; nothing here is timed)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def _stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def _rows(store: Store) -> dict[str, tuple[str, bytes]]:
    """key -> (shard, the teacher's IoU predictions' bytes) of every row at the head."""
    rows = StoreRows(store, "images").where(None)
    return {r["key"]: (r["shard"], r["iou"]["data"]) for r in rows}


def test_a_stalled_run_cannot_undo_or_double_the_commit_of_the_run_that_took_its_shard_over(
    s3, demo_root: Path, sa1b_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = fsspec.filesystem("s3", **s3.storage_options)
    fs.mkdir("fencing")
    uri = "s3://fencing/store"
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run_a = subprocess.Popen(
        [sys.executable, "-c", RUN_A, str(demo_root / "sa-1b"), uri],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait(lambda: run_a.poll() is not None or _stopped(run_a.pid), "run A to stall after appending its rows")
        assert run_a.poll() is None, run_a.communicate()[1][-3000:]
        store = Store(uri)
        assert store.dataset("images").count_rows() == 3, "run A's rows of shard 0 are in the table, uncommitted"
        monkeypatch.setattr(claims, "STALE_AFTER", 1.0)  # rather than a minute of brown-out
        _wait(lambda: not claims.live_claims(store), "run A's claim to expire")
        report_b = run_cache(config(demo_root / "sa-1b", uri, shards="0", codec="fp16", run_id="run-b"), executor="local")
        assert report_b.shards_committed == 1
    finally:
        os.kill(run_a.pid, signal.SIGCONT)
        out, err = run_a.communicate(timeout=300)
    assert run_a.returncode == 0, err[-3000:]
    report_a = json.loads(out.strip().splitlines()[-1])
    assert report_a["shards_committed"] == 0 and "committed by run run-b first" in err
    store = Store(uri)
    expected = {k: v for k, v in _rows(Store(str(sa1b_store))).items() if v[0] == "sa_000000.tar"}
    assert _rows(store) == expected, "the store equals an uninterrupted run's"
    ledger = ledger_entries(store)
    assert [(e["shard"], e["run_id"]) for e in ledger] == [("sa_000000.tar", "run-b")]
    assert store.dataset("ledger").count_rows() == 1
    report = verify_store(store)
    assert report.ok and report.rows_checked == 3, report.problems
    fs.invalidate_cache()
    assert not [p for p in fs.find("fencing/store/commits") if "/pending/" in p], "every pending note was cleared"
