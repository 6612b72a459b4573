"""Shard claims: a shard another live run is caching is left to it; dead or stale claims are ignored; a run's
claim lives exactly as long as the run; two runs on the same shards at once store every key once."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from esam3.pipeline.store.claims import CLAIMS_DIR, STALE_AFTER
from esam3.pipeline.plan import run_cache
from esam3.pipeline.store import Store
from esam3.pipeline.store.commits import ledger_entries
from esam3.pipeline.store.check import verify_store
from esam3.schemas.cache import RunError
from esam3.schemas.store import StoreError
from tests.test_cache import config, keys


def _claim(store: Path, run_id: str, shards: list[str], pid: int, host: str | None = None, age: float = 0.0) -> None:
    folder = store / CLAIMS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{run_id}.json").write_text(
        json.dumps(
            {
                "run_id": run_id,
                "host": host or socket.gethostname(),
                "pid": pid,
                "dataset": "sa-1b",
                "shards": shards,
                "heartbeat": time.time() - age,
            }
        )
    )


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _open_store(demo_root: Path, store: Path) -> None:
    """Create the store (card, tables) with an empty shard selection's worth of work: run shard 1 only."""
    run_cache(config(demo_root / "sa-1b", store, shards="1"), executor="local")


def test_a_shard_claimed_by_a_live_run_is_left_to_it(demo_root: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    _claim(store, "other-run", ["sa_000000.tar"], pid=1)  # pid 1 is alive
    with pytest.raises(RunError, match=r"being cached by another run \(other-run\).*sa_000000.tar.*rerun when it has finished"):
        run_cache(config(demo_root / "sa-1b", store), executor="local")
    assert keys(store) == ["sa1b/4", "sa1b/5", "sa1b/6"]  # shard 1 done, shard 0 left alone
    (store / CLAIMS_DIR / "other-run.json").unlink()  # that run ended
    report = run_cache(config(demo_root / "sa-1b", store), executor="local")
    assert report.shards_committed == 1 and keys(store) == [f"sa1b/{i}" for i in range(1, 7)]
    assert verify_store(Store(str(store))).ok


@pytest.mark.parametrize(
    "claim",
    [
        {"pid": "dead"},  # its process is gone on this host: no waiting
        {"pid": 1, "host": "another-machine", "age": STALE_AFTER + 5},  # no heartbeat for too long
    ],
)
def test_dead_and_stale_claims_are_ignored(demo_root: Path, tmp_path: Path, claim: dict) -> None:
    store = tmp_path / "store"
    store.mkdir()
    pid = _dead_pid() if claim["pid"] == "dead" else claim["pid"]
    _claim(store, "gone-run", ["sa_000000.tar", "sa_000001.tar"], pid=pid, host=claim.get("host"), age=claim.get("age", 0.0))
    report = run_cache(config(demo_root / "sa-1b", store), executor="local")
    assert report.shards_committed == 2 and keys(store) == [f"sa1b/{i}" for i in range(1, 7)]


def test_a_fresh_claim_from_another_machine_is_honoured(demo_root: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    _claim(store, "remote-run", ["sa_000001.tar"], pid=999999, host="another-machine", age=STALE_AFTER / 2)
    with pytest.raises(RunError, match="remote-run"):
        run_cache(config(demo_root / "sa-1b", store), executor="local")
    assert keys(store) == ["sa1b/1", "sa1b/2", "sa1b/3"]


def test_the_run_claims_its_shards_while_it_runs(demo_root: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    seen: list[dict] = []

    def look(_report) -> None:
        seen.extend(json.loads(p.read_text()) for p in (store / CLAIMS_DIR).glob("*.json"))

    report = run_cache(config(demo_root / "sa-1b", store), executor="local", on_progress=look)
    assert seen and {c["run_id"] for c in seen} == {report.run_id}
    assert set(seen[0]["shards"]) == {"sa_000000.tar", "sa_000001.tar"} and seen[0]["dataset"] == "sa-1b"
    assert not list((store / CLAIMS_DIR).glob("*.json"))  # removed at the end


def test_two_runs_on_the_same_shards_at_once_store_every_key_once(demo_root: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    _open_store(demo_root, store)  # both runs then find a store and one shard (0) to do, plus shard 1 done
    errors: list[BaseException] = []

    def run() -> None:
        try:
            run_cache(config(demo_root / "sa-1b", store), executor="local")  # each run gets its own run id
        except BaseException as exc:  # noqa: BLE001 - every error is checked below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(isinstance(e, RunError) and "being cached by another run" in str(e) for e in errors), errors
    if len(errors) == 2:  # both started together and left the shard to each other: a rerun does it
        run_cache(config(demo_root / "sa-1b", store), executor="local")
    assert keys(store) == [f"sa1b/{i}" for i in range(1, 7)]
    ledger = ledger_entries(Store(str(store)))
    assert sorted(r["shard"] for r in ledger) == ["sa_000000.tar", "sa_000001.tar"]
    assert verify_store(Store(str(store))).ok


def test_a_run_id_in_use_by_a_live_run_is_refused(demo_root: Path, tmp_path: Path) -> None:
    """The claim is created once: a second live run with the same --run-id is refused; a dead one's id is reused."""
    store = tmp_path / "store"
    _claim(store, "same-id", ["sa_000001.tar"], pid=1)  # alive
    with pytest.raises(StoreError, match="run id same-id is in use by a live run .* give this run another run_id"):
        run_cache(config(demo_root / "sa-1b", store, shards="1", run_id="same-id"), executor="local")
    _claim(store, "same-id", ["sa_000001.tar"], pid=_dead_pid())
    report = run_cache(config(demo_root / "sa-1b", store, shards="1", run_id="same-id"), executor="local")
    assert report.shards_committed == 1 and not (store / CLAIMS_DIR / "same-id.json").exists()


def test_rows_a_stalled_run_appends_after_the_winner_cleaned_up_are_removed_at_the_next_start(demo_root: Path, tmp_path: Path) -> None:
    """Run A noted shard 0 and stalled inside its Append; run B cached and committed shard 0 meanwhile (deleting
    what A had); A's Append then landed and A died. Its note outlived B's cleanup, so the next run's start deletes
    A's late rows and then forgets the note (A can no longer write)."""
    import pyarrow as pa

    from esam3.pipeline.store.commits import note_pending
    from esam3.schemas.store import IMAGES

    store_path = tmp_path / "store"
    _open_store(demo_root, store_path)  # shard 1 committed; the store exists
    store = Store(str(store_path))
    fingerprint = json.loads((store_path / "targets-sa-1b.json").read_text())["fingerprint"]
    _claim(store_path, "stalled-a", ["sa_000000.tar"], pid=1, host="elsewhere", age=120)  # stalled: stale but there
    note_pending(store, "sa-1b", fingerprint, "sa_000000.tar", "stalled-a")
    run_cache(config(demo_root / "sa-1b", store_path, run_id="run-b"), executor="local")  # B commits shard 0
    notes = store_path / "commits" / "sa-1b" / fingerprint / "pending" / "sa_000000.tar"
    assert [p.name for p in notes.iterdir()] == ["stalled-a"], "A may still write: its note outlives B's cleanup"
    rows = store.dataset("images").to_table(filter="shard = 'sa_000000.tar'", blob_handling="all_binary")
    late = rows.set_column(rows.schema.get_field_index("run_id"), "run_id", pa.array(["stalled-a"] * rows.num_rows))
    store.append("images", pa.Table.from_pylist(late.to_pylist(), schema=IMAGES))  # A's Append lands late
    assert not verify_store(store).ok
    (store_path / CLAIMS_DIR / "stalled-a.json").unlink()  # A is gone for good
    report = run_cache(config(demo_root / "sa-1b", store_path), executor="local")
    assert report.nothing_to_do and verify_store(Store(str(store_path))).ok
    assert keys(store_path) == [f"sa1b/{i}" for i in range(1, 7)] and not list(notes.iterdir())


def test_a_run_id_reused_after_a_crash_does_not_adopt_the_rows_the_crashed_run_left(
    demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run under --run-id X died after its Append, before its commit point; a new run under the same X must not
    take those rows for its own (before: two copies of the shard, verify failed)."""
    from esam3.pipeline.store import commits

    store = tmp_path / "store"
    original = commits.create_once

    def dies_at_the_commit_point(fs, path, data):
        if "/commits/" in path:
            raise KeyboardInterrupt("killed between the Append and the commit marker")
        return original(fs, path, data)

    monkeypatch.setattr(commits, "create_once", dies_at_the_commit_point)
    with pytest.raises(KeyboardInterrupt):
        run_cache(config(demo_root / "sa-1b", store, shards="0", run_id="same-id"), executor="local")
    monkeypatch.setattr(commits, "create_once", original)
    assert Store(str(store)).dataset("images").count_rows() == 3  # its rows are there, uncommitted
    report = run_cache(config(demo_root / "sa-1b", store, shards="0", run_id="same-id"), executor="local")
    assert report.shards_committed == 1 and report.rows == 3
    assert keys(store) == ["sa1b/1", "sa1b/2", "sa1b/3"] and verify_store(Store(str(store))).ok
