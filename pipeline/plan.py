"""The cache job: shards -> read (CPU) -> teacher (actor pool) -> encode + write fragments (CPU) -> driver commits.

``run_cache(config)`` is the whole job, from Python or from ``esam3 cache``:

1. the driver checks that the store can be written and holds the same settings, then gets the teacher's card
   (checksum, sizes: remembered for the same weight files, else by loading the teacher once on CPU), opens the
   store (creating it, or checking it holds this teacher's targets made the same way), saves the heads there
   (loading the teacher if it must), and reads the commits;
2. shards already committed with the same fingerprint are skipped (a rerun of a finished run is a no-op);
   commits a stopped run left half done are finished (``pipeline/store/commits.py``);
3. the steps run as a Ray Data streaming plan (``executor="ray"``: local Ray by default, or ``--address``; see
   ``pipeline/ray_plan.py``), or as a plain loop in this process (``executor="local"``, for tests and
   debugging): same step objects;
4. the driver commits each shard when all its rows are written (fenced: exactly one run's copy of a shard ever
   becomes visible; see ``pipeline/store/commits.py``).
"""

from __future__ import annotations

import functools
import json
import logging
import queue
import tempfile
import threading
import time
import uuid
import contextlib
from contextlib import closing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from esam3.pipeline.store.claims import ShardClaims, live_claims
from esam3.pipeline.store.runs import RunRecord
from esam3.pipeline.store.commits import (
    ShardCommit,
    commit_shard,
    drop_own_leftovers,
    finished_shards,
    is_committed,
    ledger_entries,
    recover,
)
from esam3.pipeline.object_store import S3Settings
from esam3.pipeline import sources
from esam3.pipeline.shards import DatasetName, ShardRef, select_shards
from esam3.pipeline.codec_pilot import check_basis, resolved, settle_codec, stored_choice
from esam3.pipeline.store import Store
from esam3.pipeline.store.check import budget_check
from esam3.pipeline.store.snapshots import tag_if_complete
from esam3.schemas.cache import CacheConfig, Inputs, RunError, Target
from esam3.schemas.codecs import FeatureCodec
from esam3.schemas.errors import ConfigError
from esam3.schemas.prompts import check_mask_size
from esam3.schemas.store import HEADS_DIR, SCHEMAS, TABLE_OF
from esam3.schemas.teacher import Device, TeacherConfig
from esam3.workers.heads import Geometry
from esam3.workers.teacher_loading import teacher_config
from esam3.workers.teacher_identity import remember_card, remembered_card
from esam3.workers.read_step import ReadImages, ReadVideos
from esam3.workers.teacher_step import TeacherImages, TeacherVideos
from esam3.workers.shard_writer import ShardWriter
from esam3.workers.write_step import EncodeFrames, EncodeImages, WriteFragments

log = logging.getLogger(__name__)


@dataclass
class ShardProgress:
    """What the driver has heard of one shard so far."""

    name: str
    url: str
    fragments: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    rows: int = 0
    bytes: int = 0
    expected: int = -1  # store rows + failure weight, from the shard's end marker
    samples: int = -1

    @property
    def accounted(self) -> int:
        return self.rows + sum(f.get("weight", 1) for f in self.failures)

    @property
    def complete(self) -> bool:
        return self.expected >= 0 and self.accounted == self.expected

    def add(self, entry: dict[str, Any], run_id: str, dataset: str) -> None:
        self.fragments.extend(json.loads(entry["fragments"]))
        self.failures.extend({"dataset": dataset, "shard": self.name, "run_id": run_id, **f} for f in json.loads(entry["failures"]))
        self.keys.extend(json.loads(entry["keys"]))
        self.rows += entry["rows"]
        self.bytes += entry["bytes"]
        if entry["end_count"] >= 0:
            self.expected, self.samples = entry["end_count"], entry["end_samples"]
        if self.expected >= 0 and self.accounted > self.expected:
            raise RunError(f"{self.name}: {self.accounted} rows and failures arrived for {self.expected} expected; rerun the command")


@dataclass
class CacheReport:
    """What a run did; ``exit_code`` follows ``--max-failures``."""

    run_id: str
    dataset: str
    store: str
    teacher: str
    shards_selected: int
    shards_skipped: int
    shards_committed: int = 0
    rows_written: int = 0  # written to fragments, committed or not (progress)
    rows: int = 0  # committed
    failures: int = 0
    read_retries: int = 0  # shards read again after a transient I/O error (see workers/read_step.py)
    bytes: int = 0
    seconds: float = 0.0
    store_version: int = 0
    failure_samples: list[dict[str, Any]] = field(default_factory=list)
    aborted: dict[str, str] = field(default_factory=dict)  # shard -> why it stays uncommitted (I/O; a rerun does it)
    codec: str = ""  # the trunk codec the rows use (``--codec auto``: the one chosen)
    budget: dict[str, Any] | None = None  # --codec auto: this run's rows against --max-error (``check.budget_check``)
    exit_code: int = 0

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    @property
    def nothing_to_do(self) -> bool:
        return self.shards_selected == self.shards_skipped

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "rows_per_s": round(self.rows_per_s, 3), "nothing_to_do": self.nothing_to_do}


ProgressCallback = Callable[[CacheReport], None]


def run_cache(config: CacheConfig, executor: str = "ray", on_progress: ProgressCallback | None = None) -> CacheReport:
    """Run (or resume) one cache job; see the module docstring."""
    start = time.perf_counter()
    config = config.model_copy(update={"source": absolute(config.source), "store": absolute(config.store)})
    run_id = config.run_id or uuid.uuid4().hex[:12]
    dataset = DatasetName(config.dataset)
    s3 = S3Settings.from_environment(config.s3_endpoint)
    shards = select_shards(config.source, dataset, config.shards, s3.fsspec_options(config.source))
    store = Store(config.store, s3)
    fenced = store.check_writable()  # a store that cannot be written or reached, or other settings: said before
    if config.prompts.mask_size is not None:  # the teacher's config alone says its decoder's size
        check_mask_size(config.prompts.mask_size, Geometry.from_config(teacher_config(config.teacher.source)).mask_size)
    choice = stored_choice(config, store) if config.error_budget is not None else None  # --codec auto, chosen before
    if choice is not None:
        config = resolved(config, choice)
    store.check_settings(config.target_spec(""))  # the teacher loads (a minute with real weights)
    card, teacher = driver_card(config.teacher)
    checksum, geometry = card["checksum"], Geometry.from_dict(card["geometry"])
    store.check_teacher(card)  # before a pilot writes its choice into the store
    if config.error_budget is not None:  # --codec auto: the stored choice (same teacher) or a pilot's
        config = settle_codec(config, store, shards, s3.fsspec_options(config.source), checksum, choice, executor)
    check_basis(config, store, geometry.trunk_width)
    if dataset == DatasetName.SAV:
        _check_video_memory(config.video.max_frames, geometry.image_size)
    fingerprint = config.fingerprint(checksum)
    store.open_for(
        {k: v for k, v in card.items() if k not in ("device", "precision")}, {**config.target_spec(checksum), "fingerprint": fingerprint}
    )
    if not fenced:
        log.warning(
            "store %s: its server ignores conditional writes (If-None-Match), so two runs caching the same shards "
            "at once are not fenced: run one at a time",
            store.uri,
        )
    _save_heads_once(store, teacher, config.teacher)
    del teacher  # the driver needs only the card; actors load their own copy
    table = TABLE_OF[dataset.value]
    if recover(store, table, dataset.value, fingerprint, [s.name for s in shards], {c.run_id for c in live_claims(store)}):
        store.index_keys(table)
        tag_if_complete(store, table)
    done = finished_shards(store, dataset.value, fingerprint)
    todo = [s for s in shards if s.name not in done]
    report = CacheReport(run_id, dataset.value, config.store, checksum, len(shards), len(shards) - len(todo))
    report.codec = config.codec.value + (f" r={config.rank}" if config.codec == FeatureCodec.LOWRANK else "")
    report.store_version = store.dataset(table).version
    if not todo:
        report.seconds = time.perf_counter() - start
        report.exit_code = 1 if _failures_exceeded(store, config, fingerprint, {s.name for s in shards}) else 0
        return report
    with ShardClaims(store, run_id, dataset.value, [s.name for s in todo]) as claims:
        elsewhere = claims.held_elsewhere()
        # Read the commits again after claiming: a run that finished a shard meanwhile committed it before it
        # dropped its claim, so every shard is either claimed elsewhere, done, or left for this run.
        done = finished_shards(store, dataset.value, fingerprint)
        report.shards_skipped += sum(1 for s in todo if s.name in done)
        todo = [s for s in todo if s.name not in elsewhere and s.name not in done]
        claims.narrow([s.name for s in todo])
        if config.run_id:  # an id the caller chose may be a crashed run's: what it left of these shards is not ours
            drop_own_leftovers(store, table, [s.name for s in todo], run_id)
        for shard, other in sorted(elsewhere.items()):
            log.warning("%s is being cached by run %s (%s, pid %d): left to it", shard, other.run_id, other.host, other.pid)
        if todo:
            record = RunRecord(
                store, run_id, {**config.model_dump(mode="json"), "fingerprint": fingerprint, "teacher_checksum": checksum}, executor
            )
            try:
                _run_shards(Run(config, store, geometry, checksum, run_id, fingerprint), executor, todo, report, on_progress)
            except BaseException as exc:
                record.end(_counts(report), exc)
                raise
            record.end(_counts(report))
    report.seconds = time.perf_counter() - start
    if elsewhere:
        runs = sorted({c.run_id for c in elsewhere.values()})
        raise RunError(
            f"{len(elsewhere)} shard(s) are being cached by another run ({', '.join(runs)}): {sorted(elsewhere)[:5]}; "
            "this run left them to it: rerun when it has finished"
        )
    exceeded = _failures_exceeded(store, config, fingerprint, {s.name for s in shards})
    report.exit_code = 1 if exceeded or report.aborted else 0
    if config.error_budget is not None:
        report.budget = budget_check(store.dataset(table), config.error_budget, run_id)
    return report


@dataclass(frozen=True)
class Run:
    """What one cache run makes and where: its config, the store, the teacher's sizes and checksum, its ids."""

    config: CacheConfig
    store: Store
    geometry: Any
    checksum: str
    run_id: str
    fingerprint: str

    @property
    def table(self) -> str:
        return TABLE_OF[self.config.dataset]


def _run_shards(run: Run, executor: str, todo: list[ShardRef], report: CacheReport, on_progress: ProgressCallback | None) -> None:
    """Stream the shards through the steps; commit each shard as soon as all of its rows are written."""
    config, run_id = run.config, run.run_id
    steps = build_steps(run)
    if executor == "ray":
        from esam3.pipeline.ray_plan import ray_errors, run_ray

        runner, errors = run_ray, ray_errors
    else:
        runner, errors = _run_local, contextlib.nullcontext
    progress = {s.name: ShardProgress(s.name, s.url) for s in todo}
    written_so_far: dict[str, int] = {}  # rows of each shard its writer has reported as progress
    done: set[str] = set()
    committer = Committer(functools.partial(_commit, run, report=report))
    with committer, closing(runner(config, todo, steps)) as stream, errors():
        for written in stream:
            committer.check()
            for entry in written.to_pylist():
                name = entry["shard"]
                if name in report.aborted or name in done:
                    continue  # pieces of an aborted shard still in flight, or a retried task re-reporting a shard
                state = progress.get(name)
                if state is None:
                    raise RunError(f"rows of {name}, which this run does not cache, reached the driver; rerun the command")
                if not entry["final"]:
                    written_so_far[name] = written_so_far.get(name, 0) + entry["rows"]
                    report.rows_written += entry["rows"]
                elif entry["aborted"]:
                    report.aborted[name] = entry["aborted"]
                    del progress[name]
                    log.warning("%s stays uncommitted in this run (%s); rerun to finish it", name, entry["aborted"])
                else:
                    report.read_retries += entry["read_retries"] or 0
                    state.add(entry, run_id, config.dataset)
                    report.rows_written += entry["rows"] - written_so_far.pop(name, 0)
                    if not state.complete:
                        raise RunError(
                            f"{name}: its writer finished it with {state.accounted} rows and failures of "
                            f"{state.expected}; rerun the command"
                        )
                    committer.submit(state)
                    del progress[name]
                    done.add(name)
                if on_progress:
                    on_progress(report)
    if progress:
        raise RunError(f"the plan ended with {len(progress)} shard(s) incomplete: {sorted(progress)[:5]}; rerun to finish them")


class Committer:
    """Commits complete shards on a thread of its own, one after the other, so the driver keeps draining the plan's
    output while a commit (append, duplicate check, ledger, indexes, snapshot tag) takes its seconds: a stalled
    driver would back-pressure the plan up to the teacher. The first error stops it and is raised on the driver
    (``check``, and on leaving the ``with`` block, which waits for the commits in hand)."""

    def __init__(self, commit: Callable[[ShardProgress], None]) -> None:
        self._commit = commit
        self._queue: queue.Queue[ShardProgress | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="esam3-commits", daemon=True)

    def __enter__(self) -> Committer:
        self._thread.start()
        return self

    def __exit__(self, kind: Any, *_: Any) -> None:
        self._queue.put(None)
        self._thread.join()
        if kind is None:
            self.check()

    def _work(self) -> None:
        while (state := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._commit(state)
                except BaseException as exc:  # noqa: BLE001 - raised again on the driver thread
                    self._error = exc

    def submit(self, state: ShardProgress) -> None:
        self.check()
        self._queue.put(state)

    def check(self) -> None:
        if self._error is not None:
            raise self._error


def absolute(uri: str) -> str:
    """Local paths made absolute (Ray workers do not share the driver's working directory); URLs unchanged."""
    return uri if "://" in uri else str(Path(uri).expanduser().resolve())


def _commit(run: Run, state: ShardProgress, *, report: CacheReport) -> None:
    """Commit one complete shard (fenced: see ``pipeline/store/commits.py``); keys already stored elsewhere become
    failures."""
    store, table, dataset = run.store, run.table, run.config.dataset
    if is_committed(store, dataset, run.fingerprint, state.name):
        log.warning("%s was committed by another run meanwhile; this run's copy is dropped", state.name)
        return
    done = commit_shard(
        store,
        ShardCommit(
            table,
            dataset,
            state.name,
            state.url,
            run.run_id,
            run.fingerprint,
            fragments=state.fragments,
            failures=state.failures,
            keys=state.keys,
            rows=state.rows,
            bytes=state.bytes,
            samples=state.samples,
        ),
    )
    report.store_version = done.version
    if not done.won:
        return
    store.index_keys(table)
    tag_if_complete(store, table)  # the version a trainer may read, unless another run is mid-commit
    report.shards_committed += 1
    report.rows += done.rows
    report.bytes += state.bytes
    report.failures += done.failures
    report.failure_samples.extend(state.failures[: max(0, 20 - len(report.failure_samples))])


def _failures_exceeded(store: Store, config: CacheConfig, fingerprint: str, shards: set[str]) -> bool:
    """--max-failures over every selected shard in the ledger (this run's and earlier ones'), in samples."""
    ledger = ledger_entries(store, f"dataset = '{config.dataset}' AND fingerprint = '{fingerprint}'", ["shard", "samples", "failures"])
    rows = [r for r in ledger if r["shard"] in shards]
    return config.max_failures.exceeded(sum(r["failures"] for r in rows), sum(r["samples"] for r in rows))


@dataclass(frozen=True)
class Steps:
    """The steps of a run: read (a callable per shard), the teacher actor class and its arguments, encode (per teacher
    block), and the arguments of the ``ShardWriter``s the executor starts for the write step."""

    read: Callable[[ShardRef], Iterator[pa.Table]]
    teacher: type
    teacher_args: dict[str, Any]
    teacher_batch: int
    encode: Callable[[pa.Table], pa.Table]
    writer_args: dict[str, Any]


def build_steps(run: Run) -> Steps:
    config, store, geometry, checksum, run_id = run.config, run.store, run.geometry, run.checksum, run.run_id
    store_trunk = Target.TRUNK in config.targets
    lowrank = config.codec == FeatureCodec.LOWRANK
    basis = (store.uri, config.dataset, config.rank, store.s3) if lowrank else None
    source_options = store.s3.fsspec_options(config.source)
    table = TABLE_OF[config.dataset]
    writer_args = {"table_uri": store.table_uri(table), "schema": SCHEMAS[table], "s3": store.s3}
    store_inputs = config.inputs == Inputs.STORE
    if config.dataset == DatasetName.SA1B.value:
        with_prompts = Target.PROMPTS in config.targets
        return Steps(
            read=ReadImages(
                config.source,
                geometry.image_size,
                config.prompts,
                with_prompts,
                config.dct_scaling,
                store_inputs=store_inputs,
                storage_options=source_options,
                read_retries=config.read_retries,
            ),
            teacher=TeacherImages,
            teacher_args={
                "config": config.teacher,
                "checksum": checksum,
                "with_prompts": with_prompts,
                "codec": config.codec,
                "store_trunk": store_trunk,
                "basis": basis,
                "mask_outputs": config.prompts.mask_outputs,
                "mask_size": config.prompts.mask_size,
            },
            teacher_batch=config.teacher.batch_size,
            encode=EncodeImages(
                geometry,
                config.codec,
                checksum,
                run_id,
                config.prompts.seed,
                store_trunk=store_trunk,
                mask_outputs=config.prompts.mask_outputs,
                mask_size=config.prompts.mask_size,
            ),
            writer_args=writer_args,
        )
    return Steps(
        read=ReadVideos(
            config.source,
            geometry.image_size,
            config.video,
            store_inputs=store_inputs,
            storage_options=source_options,
            read_retries=config.read_retries,
        ),
        teacher=TeacherVideos,
        teacher_args={"config": config.teacher, "checksum": checksum, "codec": config.codec, "store_trunk": store_trunk, "basis": basis},
        teacher_batch=1,  # one video per call: its frames are batched through the trunk inside
        encode=EncodeFrames(geometry, config.codec, checksum, run_id, config.video.seed, store_trunk=store_trunk),
        writer_args=writer_args,
    )


def _counts(report: CacheReport) -> dict[str, Any]:
    """What a run record keeps of the report."""
    return {
        "shards_committed": report.shards_committed,
        "rows": report.rows,
        "failures": report.failures,
        "bytes": report.bytes,
        "read_retries": report.read_retries,
        "aborted": sorted(report.aborted),
    }


def _check_video_memory(max_frames: int, image_size: int) -> None:
    """``--max-frames`` sets how many teacher frames (uint8, S x S) one video holds in an actor: bounded like a
    decoded video (``sources.MAX_VIDEO_BYTES``), before any work."""
    per_frame = 3 * image_size * image_size
    if max_frames * per_frame > sources.MAX_VIDEO_BYTES:
        raise ConfigError(
            f"--max-frames {max_frames}: as many teacher frames of {image_size}x{image_size} hold "
            f"{max_frames * per_frame / 1e9:.1f} GB per video, over the {sources.MAX_VIDEO_BYTES / 1e9:.1f} GB a video may "
            f"take; at most {sources.MAX_VIDEO_BYTES // per_frame} fit"
        )


def _on_cpu(teacher: TeacherConfig) -> TeacherConfig:
    return teacher.model_copy(update={"device": Device.CPU})


def driver_card(teacher: TeacherConfig) -> tuple[dict[str, Any], Any]:
    """The teacher's card for the driver, and the teacher if it had to be loaded: a card remembered for the same
    weight files (``workers/teacher_identity.py``) spares the load; else the teacher is loaded on the CPU once."""
    from esam3.workers.teacher import Sam3Teacher

    cpu = _on_cpu(teacher)
    card = remembered_card(cpu)
    if card is not None:
        return card, None
    loaded = Sam3Teacher.load(cpu)
    card = loaded.card.to_dict()
    remember_card(cpu, card)
    return card, loaded


def _save_heads_once(store: Store, loaded: Any, teacher: TeacherConfig) -> None:
    """Put the teacher's heads in the store (once; loading the teacher if the driver has not): written locally, then
    copied to the store's filesystem."""
    from esam3.workers.teacher import Sam3Teacher, save_heads

    target = f"{store.path}/{HEADS_DIR}"
    if store.fs.exists(f"{target}/heads.json"):
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_heads(loaded or Sam3Teacher.load(_on_cpu(teacher)), Path(tmp))
        store.fs.makedirs(target, exist_ok=True)
        for name in ("heads.safetensors", "heads.json"):  # the json last: its presence means complete
            store.fs.put_file(str(Path(tmp) / name), f"{target}/{name}")


def _run_local(config: CacheConfig, shards: list[ShardRef], steps: Steps) -> Iterator[pa.Table]:
    """Every step in this process, in order, with one ``ShardWriter``: the same step code as the Ray plan."""
    del config  # same signature as run_ray; the local loop needs no cluster settings
    teacher = steps.teacher(**steps.teacher_args)
    writer = ShardWriter(**steps.writer_args)
    write = WriteFragments((writer,))
    try:
        for shard in shards:
            for work in steps.read(shard):
                out = teacher(work)
                for batch in [out] if isinstance(out, pa.Table) else out:  # teacher steps may yield several batches
                    yield write(steps.encode(batch))
    finally:
        writer.close()
