"""The Ray side of the cache job: starting or joining Ray, the Ray Data plan, the teacher actor pool, and errors
raised inside Ray steps brought back as one line.

``run_cache`` (``pipeline/plan.py``) calls ``run_ray`` for ``executor="ray"``; the in-process loop needs none
of this.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from esam3.pipeline.shards import DatasetName, ShardRef
from esam3.pipeline.stderr_filter import hide_lines
from esam3.schemas.cache import CacheConfig, RunError
from esam3.schemas.errors import Esam3Error, first_line
from esam3.workers.shard_writer import ShardWriter
from esam3.workers.write_step import WriteFragments

if TYPE_CHECKING:
    from esam3.pipeline.plan import Steps

log = logging.getLogger(__name__)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception)): (.+)$", re.MULTILINE)


@contextmanager
def ray_errors() -> Iterator[None]:
    """A step's error reaches the driver wrapped in Ray's errors; raise it as one line instead.

    Our own errors come back as themselves, so the CLI's exit codes hold: from ``RayTaskError.cause`` where Ray
    keeps the original (tasks, actors), else by name from the traceback text (Ray Data's ``UserCodeException``
    keeps only that). Anything else becomes a RunError naming the original error (exit 1: rerun resumes). The full
    traceback goes to the log at debug level.
    """
    try:
        yield
    except Exception as exc:
        from ray.exceptions import RayError

        if not isinstance(exc, RayError):
            raise
        log.debug("a pipeline step failed", exc_info=exc)
        ours = own_cause(exc)
        if ours is not None:
            raise ours from None
        raise step_error(str(exc)) from None


def own_cause(exc: BaseException) -> Esam3Error | None:
    """The esam3 error a Ray error wraps (through ``cause`` and Python's chaining), as it was raised."""
    from ray.exceptions import RayError

    seen, stack = set(), [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, Esam3Error) and not isinstance(current, RayError):  # not Ray's dual-class copy
            return current
        stack.extend(e for e in (getattr(current, "cause", None), current.__cause__, current.__context__) if isinstance(e, BaseException))
    return None


def _own_classes(base: type[Esam3Error] = Esam3Error) -> dict[str, type[Esam3Error]]:
    found = {base.__name__: base}
    for sub in base.__subclasses__():
        found.update(_own_classes(sub))
    return found


def step_error(text: str) -> Esam3Error:
    """The original error in a Ray error's text (its first ``Name: message`` line that Ray did not add): ours by
    its class name, anything else as a RunError naming it."""
    text = _ANSI.sub("", text)
    for match in _ERROR_LINE.finditer(text):
        name, message = match.groups()
        if name in ("RayTaskError", "UserCodeException", "RayError"):
            continue
        if name in (own := _own_classes()):
            return own[name](message)
        return RunError(f"a pipeline step failed: {name}: {message}; rerun the same command to resume")
    return RunError(f"a pipeline step failed: {first_line(text)}; rerun the same command to resume")


@dataclass(frozen=True)
class TeacherPool:
    """How many teacher actors the Ray plan runs and what each asks for."""

    actors: int  # at the start
    per_actor: float  # GPUs (one each) or CPUs
    threads: int | None  # torch threads of a CPU teacher; None on GPUs
    side_cpus: float  # CPUs of each read / write task, which must fit beside the teacher
    max_actors: int | None = None  # GPU pools grow as GPUs join, up to this (None: no bound); CPU pools are fixed

    @property
    def compute(self) -> Any:
        """Ray Data's strategy: an autoscaling pool from the GPUs at the start to ``max_actors`` (Ray Data adds an
        actor where a GPU is free and work is queued), or a fixed one."""
        from ray.data import ActorPoolStrategy

        if self.max_actors == self.actors:
            return ActorPoolStrategy(size=self.actors)
        return ActorPoolStrategy(min_size=self.actors, max_size=self.max_actors)

    @property
    def writers(self) -> int:
        """Shard writers: one per teacher the pool may hold (a shard's writer is fixed for the run: hash of its name)."""
        return self.max_actors or self.actors


def teacher_pool(gpus: int, node_cpus: Sequence[int], max_teachers: int | None = None) -> TeacherPool:
    """One actor per GPU, more as GPUs join (up to ``max_teachers``); without GPUs one actor per big node, given all
    of the smallest big node's cores but one (an actor cannot span nodes, and decode and encode need the last core).
    A node with under half the CPUs of the largest (a small head) gets no teacher, so that it does not shrink every
    actor; it still reads and writes."""
    largest = max(node_cpus, default=0)
    cpu_nodes = [c for c in node_cpus if c >= 1 and 2 * c >= largest]
    cpus = min(cpu_nodes, default=1)
    side_cpus = 0.5 if cpus >= 2 else 0.25
    if gpus:
        actors = min(gpus, max_teachers or gpus)
        return TeacherPool(actors=actors, per_actor=1, threads=None, side_cpus=side_cpus, max_actors=max_teachers)
    actors = min(max(1, len(cpu_nodes)), max_teachers or len(cpu_nodes) or 1)
    return TeacherPool(
        actors=actors,
        per_actor=cpus - 1 if cpus >= 2 else 0.5,
        threads=max(1, cpus - 1),
        side_cpus=side_cpus,
        max_actors=actors,
    )


def run_ray(config: CacheConfig, shards: list[ShardRef], steps: Steps) -> Iterator[pa.Table]:
    import ray
    from ray.data import DataContext

    with ray_session(config.address), hide_lines():
        context = DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # its "progress bars disabled" notice, among others
        gpus = int(ray.cluster_resources().get("GPU", 0))
        node_cpus = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]]
        pool = teacher_pool(gpus, node_cpus, config.max_teachers)
        threads = pool.threads
        teacher_resources: dict[str, Any] = {"num_gpus" if gpus else "num_cpus": pool.per_actor, "compute": pool.compute}
        if not gpus and pool.actors > 1:
            teacher_resources["scheduling_strategy"] = "SPREAD"  # one per node, not two on the biggest
        side_cpus = pool.side_cpus
        items = [{"dataset": s.dataset.value, "shard_id": s.shard_id, "url": s.url} for s in shards]

        read = steps.read

        def read_shard(batch: pa.Table) -> Iterator[pa.Table]:
            for item in batch.to_pylist():
                yield from read(ShardRef(DatasetName(item["dataset"]), item["shard_id"], item["url"]))

        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(read_shard, batch_size=1, batch_format="pyarrow", num_cpus=side_cpus)
        ds = ds.map_batches(
            steps.teacher,
            fn_constructor_kwargs={**steps.teacher_args, "threads": threads},
            batch_size=steps.teacher_batch,
            batch_format="pyarrow",
            **teacher_resources,
        )
        ds = ds.map_batches(steps.encode, batch_size=None, batch_format="pyarrow", num_cpus=side_cpus)
        # One ShardWriter actor per teacher actor the pool may hold (each streams the shards hashed to it into one
        # fragment each); owned by this driver, so they go when it goes
        writers = tuple(
            ray.remote(ShardWriter).options(num_cpus=side_cpus / 2, max_concurrency=1).remote(**steps.writer_args)
            for _ in range(pool.writers)
        )
        try:
            ds = ds.map_batches(WriteFragments(writers), batch_size=None, batch_format="pyarrow", num_cpus=side_cpus)
            yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")
        finally:
            for writer in writers:
                ray.kill(writer)  # open streams of unfinished shards: their files are never committed


@contextmanager
def ray_session(address: str | None, enabled: bool = True) -> Iterator[None]:
    """Ray for the duration: join ``address`` or start a lean local Ray, unless one is already up (then reuse
    it and leave it running). Stops only what it started."""
    import ray

    started = enabled and _init_ray(address)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _init_ray(address: str | None) -> bool:
    """Join ``address``, or start a lean local Ray bound to loopback. Returns whether this call started it."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        if address != "auto":
            _check_reachable(address)
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except ConnectionError as exc:
            raise RunError(f"--address {address}: no Ray cluster answers ({first_line(exc)}); start one with 'ray start --head'") from None
        return True
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not log.isEnabledFor(logging.INFO):  # Ray's notice that a local cluster uses token auth: shown with -v only
        logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    object_store = _object_store_bytes()
    try:
        ray.init(
            num_cpus=os.cpu_count() or 1,
            include_dashboard=False,
            object_store_memory=object_store,
            logging_level=logging.WARNING,
            log_to_driver=False,
            configure_logging=False,
        )
    except ValueError as exc:  # Ray refuses a store larger than the memory it sees
        raise RunError(
            f"a local Ray could not start with a {object_store / 2**30:.1f} GiB object store ({first_line(exc)}); "
            "start Ray yourself ('ray start --head --object-store-memory BYTES') and pass --address auto"
        ) from None
    return True


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds when nothing listens at HOST:PORT (Ray itself retries for minutes before it gives up)."""
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise RunError(
            f"--address {address}: no Ray cluster answers ({exc.strerror or type(exc).__name__}); "
            "start one with 'ray start --head', or pass auto on a cluster node"
        ) from None


def _object_store_bytes() -> int:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 8 * 2**30
    return object_store_bytes(min(total, _container_limit() or total))


def _container_limit() -> int | None:
    """The cgroup memory limit of this container (v2, else v1), if one is set: pods see the host's RAM otherwise."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            value = Path(path).read_text().strip()
        except OSError:
            continue
        if value.isdigit() and int(value) < 2**60:  # v1 says "no limit" with a huge number, v2 with "max"
            return int(value)
    return None


def object_store_bytes(ram: int) -> int:
    """Object store of a local Ray: 10% of RAM, at least 1 GiB (but never over Ray's own default of 30%).

    The pipeline streams, but blocks in flight are big at full size (8 images of quantised targets ~72 MB per
    teacher actor, 8 SA-V frames ~165 MB), so a big GPU machine gets a store that grows with it instead of spilling to disk.
    """
    return int(min(0.3 * ram, max(2**30, 0.1 * ram)))
