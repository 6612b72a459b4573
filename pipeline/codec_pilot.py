"""``--codec auto`` before a run: pilot rows from several shards, the teacher measures every candidate codec on them
(``esam3.workers.codec_choice``), and the run caches with the smallest one within ``--max-error``.

The pilot reads the first rows of up to ``PILOT_SHARDS`` shards spread over the selection (``PILOT_ROWS`` in all),
so the choice, and the low-rank basis of a low-rank choice, see more than one shard's images. It runs in the driver
process on the teacher's device (a GPU when the driver has one; on a CPU-only driver the full-size teacher takes
minutes for the pilot: run ``esam3 plan --source ... --codec auto`` once on a GPU machine and pass the codec it
prints instead). The choice is stored once per dataset (``codec-<dataset>.json``, with every candidate's
measurements); a rerun with the same budget adopts it without measuring again, so resumed runs keep their codec.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from esam3.pipeline.shards import ShardRef
from esam3.pipeline.store import Store
from esam3.schemas.cache import CacheConfig, ErrorBudget
from esam3.schemas.codecs import FeatureCodec
from esam3.schemas.errors import ConfigError
from esam3.schemas.work import KIND_SAMPLE

log = logging.getLogger(__name__)

PILOT_ROWS = 16
PILOT_SHARDS = 8


def spread(shards: list[ShardRef], count: int) -> list[ShardRef]:
    """Up to ``count`` shards evenly spread over ``shards`` (first and last included)."""
    if len(shards) <= count:
        return list(shards)
    step = (len(shards) - 1) / (count - 1) if count > 1 else 0
    return [shards[round(i * step)] for i in range(count)]


def pilot_rows(
    config: CacheConfig, shards: list[ShardRef], image_size: int, storage_options: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """WORK rows with prompts for the pilot: the first ones of each of up to ``PILOT_SHARDS`` spread shards."""
    from esam3.workers.read_step import ReadImages

    picked = spread(shards, PILOT_SHARDS)
    per_shard = math.ceil(PILOT_ROWS / len(picked))
    read = ReadImages(
        config.source,
        image_size,
        config.prompts,
        with_prompts=True,
        dct_scaling=config.dct_scaling,
        store_inputs=False,
        batch_rows=per_shard,
        read_retries=config.read_retries,
        storage_options=storage_options,
    )
    rows: list[dict[str, Any]] = []
    for shard in picked:
        taken = 0
        for table in read(shard):  # a generator over the tar stream: leaving it early stops the read
            for row in table.to_pylist():
                if row["kind"] == KIND_SAMPLE and row["k"] > 0 and taken < per_shard:
                    rows.append(row)
                    taken += 1
            if taken >= per_shard:
                break
    return rows[:PILOT_ROWS]


def choose_codec(config: CacheConfig, shards: list[ShardRef], storage_options: dict[str, Any] | None) -> tuple[Any, Any]:
    """Load the teacher on its device, read the pilot rows and measure: (CodecChoice, Basis or None)."""
    from esam3.workers.codec_choice import measure_codecs
    from esam3.workers.teacher import Sam3Teacher

    teacher = Sam3Teacher.load(config.teacher)
    rows = pilot_rows(config, shards, teacher.geometry.image_size, storage_options)
    if len(rows) < 2:
        raise ConfigError(
            f"--codec auto: the selected shards gave {len(rows)} image(s) with prompts to measure codecs on (2+ needed); "
            "select more shards, or pass --codec"
        )
    choice, basis = measure_codecs(teacher, rows, config.error_budget)
    log.info("codec auto: %s on %d rows of %d shard(s)", choice.chosen.name, choice.rows, len(choice.shards))
    return choice, basis


def resolved(config: CacheConfig, choice: dict[str, Any]) -> CacheConfig:
    """``config`` with the codec and rank a stored choice names (refused if it was made under another budget)."""
    if choice["budget"] != config.error_budget.model_dump():
        raise ConfigError(
            f"--codec auto: this store's codec ({choice['codec']}{' r=' + str(choice['rank']) if choice['rank'] else ''}) "
            f"was chosen under another budget (--max-error {ErrorBudget(**choice['budget'])}); pass the same --max-error, "
            f"or --codec {choice['codec']}"
        )
    update: dict[str, Any] = {"codec": FeatureCodec(choice["codec"])}
    if choice["rank"]:
        update["rank"] = choice["rank"]
    return config.model_copy(update=update)


def settle_codec(config: CacheConfig, store: Store, shards: list[ShardRef], storage_options: dict[str, Any] | None) -> CacheConfig:
    """The run's config with a concrete codec: as given, or (``--codec auto``) the store's earlier choice, or one
    measured now on pilot rows and stored (with its low-rank basis) before any row is written."""
    if config.error_budget is None:
        return config
    stored = store.read_codec_choice(config.dataset)
    if stored is None:
        existing = (store.read_card() or {}).get("targets", {}).get(config.dataset)
        if existing is not None:
            raise ConfigError(
                f"--codec auto: store {store.uri} holds {config.dataset} rows cached with --codec {existing['codec']}; "
                f"pass --codec {existing['codec']} to add to it, or cache into a new --store"
            )
        choice, basis = choose_codec(config, shards, storage_options)
        stored = store.write_codec_choice_once(config.dataset, choice.to_json())
        if basis is not None and (stored["codec"], stored["rank"]) == (choice.codec, choice.rank):
            store.write_basis_once(config.dataset, basis)
    return resolved(config, stored)
