"""``--codec auto`` before a run: pilot rows from several shards, the teacher measures every candidate codec on them
(``esam3.workers.codec_choice``), and the run caches with the smallest one within ``--max-error``.

The pilot reads the first rows of up to ``PILOT_SHARDS`` shards spread over the selection (``PILOT_ROWS`` in all),
so the choice, and the low-rank basis of a low-rank choice, see more than one shard's images. With the Ray executor
on a cluster with GPUs it runs as a Ray task holding one GPU (the driver may sit on a CPU head node); otherwise in
the driver process on the teacher's device (on a CPU a full-size teacher takes minutes for the pilot). The choice
is stored once per dataset (``codec-<dataset>.json``: every candidate's measurements, the teacher's checksum, where
it ran), after the store's teacher is checked and after its low-rank basis; a rerun with the same budget adopts it
without measuring again, so resumed runs keep their codec.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from typing import Any

from esam3.pipeline.shards import ShardRef
from esam3.pipeline.store import Store
from esam3.schemas.cache import CacheConfig, ErrorBudget, RunError
from esam3.schemas.codecs import Basis, FeatureCodec
from esam3.schemas.errors import ConfigError
from esam3.schemas.teacher import TeacherLoadError
from esam3.schemas.work import KIND_ABORT, KIND_SAMPLE

log = logging.getLogger(__name__)

PILOT_ROWS = 16
PILOT_SHARDS = 8


def spread(shards: list[ShardRef], count: int) -> list[ShardRef]:
    """Up to ``count`` shards evenly spread over ``shards`` (first and last included)."""
    if len(shards) <= count:
        return list(shards)
    step = (len(shards) - 1) / (count - 1) if count > 1 else 0
    return [shards[round(i * step)] for i in range(count)]


def quotas(shards: int, rows: int = PILOT_ROWS) -> list[int]:
    """Pilot rows asked of each of ``shards`` shards: ``rows`` split as evenly as whole rows allow."""
    return [rows // shards + (i < rows % shards) for i in range(shards)]


def pilot_rows(
    config: CacheConfig, shards: list[ShardRef], image_size: int, storage_options: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """WORK rows with prompts for the pilot: the first ones of up to ``PILOT_SHARDS`` spread shards, ``quotas``
    of each; what a shard cannot give (few images, none with prompts) is asked of the shards after it."""
    from esam3.workers.read_step import ReadImages

    picked = spread(shards, PILOT_SHARDS)
    read = ReadImages(
        config.source,
        image_size,
        config.prompts,
        with_prompts=True,
        dct_scaling=config.dct_scaling,
        store_inputs=False,
        batch_rows=4,
        read_retries=config.read_retries,
        storage_options=storage_options,
    )
    rows: list[dict[str, Any]] = []
    owed = 0
    for shard, quota in zip(picked, quotas(len(picked))):
        wanted, taken = quota + owed, 0
        for table in read(shard):  # a generator over the tar stream: leaving it early stops the read
            for row in table.to_pylist():
                if row["kind"] == KIND_ABORT:
                    raise RunError(f"--codec auto: the pilot could not read {shard.name} ({row['reason']}); rerun")
                if row["kind"] == KIND_SAMPLE and row["k"] > 0 and taken < wanted:
                    rows.append(row)
                    taken += 1
            if taken >= wanted:
                break
        owed = wanted - taken
    return rows


def choose_codec(
    config: CacheConfig, shards: list[ShardRef], storage_options: dict[str, Any] | None, checksum: str | None = None
) -> tuple[Any, Any]:
    """Load the teacher on its device, read the pilot rows and measure: (CodecChoice, Basis or None). The teacher
    must be the run's (``checksum``; another copy of the checkpoint on a worker is refused). It and its device
    memory are let go before returning (on one GPU, the run's teacher actor needs it next)."""
    import torch

    from esam3.workers.codec_choice import measure_codecs
    from esam3.workers.teacher import Sam3Teacher

    teacher = Sam3Teacher.load(config.teacher)
    if checksum is not None and teacher.card.checksum != checksum:
        raise TeacherLoadError(
            f"teacher {config.teacher.source} loaded for the pilot on {socket.gethostname()} has checksum "
            f"{teacher.card.checksum}, the run expects {checksum}: every worker must see the same checkpoint"
        )
    where = {"host": socket.gethostname(), "pid": os.getpid(), "device": str(teacher.device)}
    try:
        rows = pilot_rows(config, shards, teacher.geometry.image_size, storage_options)
        if len(rows) < 2:
            raise ConfigError(
                f"--codec auto: the selected shards gave {len(rows)} image(s) with prompts to measure codecs on (2+ "
                "needed); select more shards, or pass --codec"
            )
        choice, basis = measure_codecs(teacher, rows, config.error_budget)
    finally:
        del teacher
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return dataclasses.replace(choice, measured_on=where), basis


def run_pilot(
    config: CacheConfig, shards: list[ShardRef], storage_options: dict[str, Any] | None, checksum: str, executor: str
) -> tuple[Any, Any]:
    """:func:`choose_codec` where the teacher is best run: with the Ray executor on a cluster with GPUs, as a Ray task
    holding one (the driver may sit on a CPU head node; a single-use worker, so its CUDA context goes with it);
    else in this process. What it found is logged here, on the driver."""
    if executor != "ray":
        choice, basis = choose_codec(config, shards, storage_options, checksum)
    else:
        import ray

        from esam3.pipeline.ray_plan import ray_errors, ray_session

        with ray_session(config.address), ray_errors():
            if ray.cluster_resources().get("GPU", 0) < 1:
                choice, basis = choose_codec(config, shards, storage_options, checksum)
            else:
                task = ray.remote(num_gpus=1, num_cpus=1, max_retries=0)(choose_codec)
                choice, basis = ray.get(task.remote(config, shards, storage_options, checksum))
                if basis is not None:  # own the arrays: they may be views into Ray's object store, which may stop now
                    basis = Basis(basis.mean.copy(), basis.components.copy())
    if not choice.chosen.within:
        log.warning(
            "codec auto: no codec is within --max-error %s on the pilot rows; taking the most exact, %s",
            config.error_budget,
            choice.chosen.name,
        )
    log.info("codec auto: %s on %d rows of %d shard(s) (%s)", choice.chosen.name, choice.rows, len(choice.shards), choice.measured_on)
    return choice, basis


def named(choice: dict[str, Any]) -> str:
    """The flags that give a stored choice's codec explicitly."""
    return f"--codec {choice['codec']}" + (f" --rank {choice['rank']}" if choice["rank"] else "")


def stored_choice(config: CacheConfig, store: Store) -> dict[str, Any] | None:
    """``--codec auto``: the store's earlier choice for the dataset (None: the pilot must choose). A store whose rows
    were cached with an explicit codec is refused, naming it."""
    stored = store.read_codec_choice(config.dataset)
    if stored is None:
        existing = (store.read_card() or {}).get("targets", {}).get(config.dataset)
        if existing is not None:
            given = named({"codec": existing["codec"], "rank": existing.get("rank")})
            raise ConfigError(
                f"--codec auto: store {store.uri} holds {config.dataset} rows cached with {given}; pass {given} to add to it, "
                "or cache into a new --store"
            )
    return stored


def resolved(config: CacheConfig, choice: dict[str, Any], teacher: str | None = None) -> CacheConfig:
    """``config`` with the codec and rank a stored choice names; refused if it was made under another budget, or
    (``teacher``: this run's checksum) for another teacher."""
    if choice["budget"] != config.error_budget.model_dump():
        raise ConfigError(
            f"--codec auto: this store's codec ({named(choice)}) was chosen under another budget (--max-error "
            f"{ErrorBudget(**choice['budget'])}); pass the same --max-error, or {named(choice)}"
        )
    if teacher is not None and choice.get("teacher") != teacher:
        raise ConfigError(f"--codec auto: this store's codec was chosen for teacher {choice['teacher']}, this run's is {teacher}")
    update: dict[str, Any] = {"codec": FeatureCodec(choice["codec"])}
    if choice["rank"]:
        update["rank"] = choice["rank"]
    return config.model_copy(update=update)


def settle_codec(
    config: CacheConfig,
    store: Store,
    shards: list[ShardRef],
    storage_options: dict[str, Any] | None,
    teacher: str,
    stored: dict[str, Any] | None,
    executor: str = "local",
) -> CacheConfig:
    """``--codec auto`` once the run's teacher (checksum ``teacher``) is known to be the store's: the ``stored``
    choice (:func:`stored_choice`), or one measured now on pilot rows and stored, its low-rank basis first (a stored
    choice always has its basis), before any row is written."""
    if stored is None:
        choice, basis = run_pilot(config, shards, storage_options, teacher, executor)
        if basis is not None:
            store.write_basis_once(config.dataset, basis)
        stored = store.write_codec_choice_once(config.dataset, {**choice.to_json(), "teacher": teacher})
    return resolved(config, stored, teacher)


def check_basis(config: CacheConfig, store: Store, trunk_width: int) -> None:
    """Before a low-rank run writes its card: a basis already in the store must have the run's rank (a pilot of
    another run, racing or cut short, may have left another one); refused with the fix, before any row."""
    if config.codec != FeatureCodec.LOWRANK:
        return
    found = store.read_basis(config.dataset)
    if found is not None and found.rank != min(config.rank, trunk_width):
        raise ConfigError(
            f"store {store.uri} holds a {config.dataset} low-rank basis of rank {found.rank}, this run's codec has rank "
            f"{min(config.rank, trunk_width)}: pass --codec lowrank --rank {found.rank}, or cache into a new --store"
        )
