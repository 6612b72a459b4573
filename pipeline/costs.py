"""``esam3 plan``: rows, bytes and GPU-hours of a cache run, before anything runs.

Rows come from the shards selected (counted at ``--source`` when given) times rows per shard: SA-1B has
11,185,362 images in 1000 shards (11,186 per shard); for SA-V a shard is taken as ~903 videos (50,583 training
videos over 56 shards) and each video as ``max_frames`` annotated frames with ``max_objects`` objects — both
upper-bound-ish estimates, override with ``--rows-per-shard``. Bytes per row follow from the teacher's config
(no weights are loaded) and the codecs. Mask logits (``logit8d``: int8 + row differences + zstd) compress by
content: they are counted at the bytes per value ``benchmarks/codecs.py`` measures on SAM-like logits, or at the
rate a pilot store's rows measured (``--measured-in``). GPU-hours need a measured rate (``--rows-per-sec``, e.g.
from ``benchmarks/gpu_teacher.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from esam3.schemas.cache import CacheConfig, Inputs, Target
from esam3.schemas.codecs import FeatureCodec, map_codec
from esam3.schemas.prompts import MaskOutputs
from esam3.workers.heads import Geometry

SA1B_IMAGES_PER_SHARD = 11_186
SAV_VIDEOS_PER_SHARD = 903
PUBLIC_BYTES_PER_IMAGE = 10.6e6  # the public recipe's stage-1 file per image (trunk fp16 + header)
#: Estimates of the inputs kept per row (``--inputs store``): an SA-1B JPEG (~1500 x 2250), and PNG bytes per pixel
#: value of an S x S frame (0.46 measured on demo frames with sensor-like grain at 1008; natural video compresses
#: better); a COCO RLE string of one object's mask.
SA1B_JPEG_BYTES = 700_000
PNG_BYTES_PER_VALUE = 0.46
RLE_BYTES = 2_000


#: logit8d bytes per map of SAM-like logits (benchmarks/codecs.py at full size: 0.155 B/value at 288 px, 0.235 at
#: 144, 0.359 at 72, with the 4-byte scale): the boundaries, not the flat areas, cost bytes, so a map of side s takes
#: about LOGIT_MAP_BYTES * (s / 288) ** LOGIT_SIDE_POWER.
LOGIT_MAP_BYTES, LOGIT_SIDE_POWER = 12_900, 1.4


def logit_bytes(maps: int, side: int, bytes_per_value: float | None = None) -> int:
    """Bytes of ``maps`` logit8d maps of side x side: at a measured rate, else the benchmark's SAM-like estimate."""
    if bytes_per_value is not None:
        return int(maps * (bytes_per_value * side * side + 4))
    return int(maps * LOGIT_MAP_BYTES * (side / 288) ** LOGIT_SIDE_POWER)


def feature_bytes(maps: int, pixels: int, codec: FeatureCodec) -> int:
    """Bytes of ``maps`` feature maps of ``pixels`` values each under a feature codec."""
    if codec == FeatureCodec.INT8:
        return maps * pixels + 4 * maps
    return 2 * maps * pixels


def bytes_per_row(config: CacheConfig, geometry: Geometry, logit_rate: float | None = None) -> dict[str, int]:
    """Bytes of each stored tensor column of one row; mask logits at ``logit_rate`` bytes per value when measured."""
    g, m, hidden = geometry.grid, geometry.mask_size, geometry.hidden
    codec = map_codec(config.codec)  # the per-object maps: low-rank applies to the trunk only
    out: dict[str, int] = {}
    if config.inputs == Inputs.STORE:
        s = geometry.image_size
        out["input"] = SA1B_JPEG_BYTES if config.dataset == "sa-1b" else int(PNG_BYTES_PER_VALUE * 3 * s * s)
    if Target.TRUNK in config.targets:
        if config.codec == FeatureCodec.LOWRANK:
            rank = min(config.rank, geometry.trunk_width)
            out["trunk"] = rank * g * g + 4 * rank
        else:
            out["trunk"] = feature_bytes(geometry.trunk_width, g * g, codec)
    if config.dataset == "sa-1b" and Target.PROMPTS in config.targets:
        k, p = config.prompts.num_prompts, 1 + config.prompts.max_negative_points
        side = config.prompts.mask_size or m
        if config.prompts.mask_outputs == MaskOutputs.CHOSEN:
            out["chosen_logits"] = logit_bytes(k, side, logit_rate)
        else:
            out["multi_logits"] = logit_bytes(3 * k, side, logit_rate)
            out["single_logits"] = logit_bytes(k, side, logit_rate)
        out["prompts"] = k * (4 + 1 + 8 * p + p + 16 + 1)
        out["iou_score_pointer"] = k * (16 + 4 + 4 * hidden)
        out["gt_masks"] = k * RLE_BYTES
    if config.dataset == "sa-v" and Target.MEMORY in config.targets:
        n = config.video.max_objects
        out["mask_logits"] = logit_bytes(n, m, logit_rate)
        out["maskmem_features"] = feature_bytes(n * geometry.memory_channels, g * g, codec)
        out["pix_feat_with_mem"] = feature_bytes(n * hidden, g * g, codec)
        out["score_pointer"] = n * (4 + 4 * hidden)
        out["gt_masks"] = n * RLE_BYTES
    return out


@dataclass(frozen=True)
class Plan:
    dataset: str
    shards: int
    rows_per_shard: int
    rows: int
    bytes_per_row: dict[str, int]
    rows_per_sec: float | None

    @property
    def row_bytes(self) -> int:
        return sum(self.bytes_per_row.values())

    @property
    def total_bytes(self) -> int:
        return self.rows * self.row_bytes

    @property
    def gpu_hours(self) -> float | None:
        return None if not self.rows_per_sec else self.rows / self.rows_per_sec / 3600

    def to_json(self) -> dict[str, Any]:
        public = self.rows * PUBLIC_BYTES_PER_IMAGE if self.dataset == "sa-1b" else None
        return {
            **self.__dict__,
            "row_bytes": self.row_bytes,
            "total_bytes": self.total_bytes,
            "gpu_hours": self.gpu_hours,
            "public_recipe_bytes": public,
        }


def codec_choices(config: CacheConfig, geometry: Geometry, plan: Plan, logit_rate: float | None = None) -> dict[str, dict[str, Any]]:
    """The same run under every feature codec: bytes per row per column, per row and in all (next to the public
    recipe's 10.6 MB per SA-1B image), so a user sees what each choice costs before picking one."""
    out = {}
    for codec in FeatureCodec:
        columns = bytes_per_row(config.model_copy(update={"codec": codec}), geometry, logit_rate)
        row = sum(columns.values())
        out[codec.value] = {"bytes_per_row": columns, "row_bytes": row, "total_bytes": row * plan.rows}
    return out


def make_plan(
    config: CacheConfig,
    geometry: Geometry,
    shards: int,
    rows_per_shard: int | None,
    rows_per_sec: float | None,
    logit_rate: float | None = None,
) -> Plan:
    if rows_per_shard is None:
        if config.dataset == "sa-1b":
            rows_per_shard = SA1B_IMAGES_PER_SHARD
        else:
            rows_per_shard = SAV_VIDEOS_PER_SHARD * config.video.max_frames
    return Plan(config.dataset, shards, rows_per_shard, shards * rows_per_shard, bytes_per_row(config, geometry, logit_rate), rows_per_sec)
