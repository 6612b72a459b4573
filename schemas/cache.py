"""The config of one ``esam3 cache`` run, validated before anything starts."""

from __future__ import annotations

import hashlib
import json
import re
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from esam3.schemas.codecs import FeatureCodec
from esam3.schemas.prompts import PromptConfig
from esam3.schemas.shards import ShardSpec
from esam3.schemas.teacher import TeacherConfig, VideoTargetConfig
from esam3.schemas.errors import Esam3Error


def check_s3_endpoint(value: str | None) -> str | None:
    """An S3 endpoint is http(s)://HOST[:PORT]; the message never echoes it (it could carry a password)."""
    if value is not None and not re.match(r"^https?://[\w.-]+(:\d{1,5})?/?$", value):
        raise ValueError("expected http(s)://HOST[:PORT] (no user or password in the URL)")
    return value


class RunError(Esam3Error):
    """A cache run that cannot finish as asked (incomplete shards, inconsistent accounting): rerun to resume."""

    exit_code = 1


class Target(str, Enum):
    TRUNK = "trunk"  # ViT trunk output (both datasets)
    PROMPTS = "prompts"  # SA-1B: tracker outputs for K sampled prompts
    MEMORY = "memory"  # SA-V: memory targets per (frame, object)


class Inputs(str, Enum):
    """What of the student's input each row keeps (``--inputs``)."""

    STORE = "store"  # SA-1B: the original JPEG; SA-V: each used frame as the teacher saw it (PNG)
    NONE = "none"  # targets only, for users with their own input pipeline (trainers refuse such a store)


DEFAULT_TARGETS = {"sa-1b": ("trunk", "prompts"), "sa-v": ("trunk", "memory")}
_VALID_TARGETS = {"sa-1b": {"trunk", "prompts"}, "sa-v": {"trunk", "memory"}}
_MAX_FAILURES = re.compile(r"^(\d{1,9}(?:\.\d{1,6})?)(%?)$")


class MaxFailures(BaseModel):
    """``N`` failed samples, or ``P%`` of the samples seen, before the run exits non-zero."""

    model_config = ConfigDict(frozen=True)

    count: int | None = None
    percent: float | None = None

    @classmethod
    def parse(cls, text: str) -> MaxFailures:
        match = _MAX_FAILURES.match(text.strip())
        if not match:
            raise ValueError(f"expected a count like 10 or a percentage like 0.5%, got {text!r}") from None
        if match.group(2):
            percent = float(match.group(1))
            if percent > 100:
                raise ValueError(f"a percentage must be at most 100%, got {text!r}")
            return cls(percent=percent)
        if "." in match.group(1):
            raise ValueError(f"a count must be a whole number (or add % for a share), got {text!r}")
        return cls(count=int(match.group(1)))

    def exceeded(self, failures: int, samples: int) -> bool:
        if self.count is not None:
            return failures > self.count
        return samples > 0 and 100.0 * failures / samples > (self.percent or 0.0)

    def __str__(self) -> str:
        return f"{self.count}" if self.count is not None else f"{self.percent:g}%"


_BUDGET_KEYS = {"mask": "mask_iou_loss", "rms": "rel_rms"}


class ErrorBudget(BaseModel):
    """``--max-error``: what the trunk codec may cost, as means over the rows measured (see
    ``esam3.workers.codec_choice``): the heads' masks (1 - IoU of the masks from the decoded vs the exact trunk, for
    the row's prompts) and the features (relative RMS error). ``--codec auto`` takes the smallest codec within both."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    mask_iou_loss: float = Field(0.01, gt=0, lt=1, description="mean 1 - IoU of the heads' masks, decoded vs exact trunk")
    rel_rms: float = Field(0.05, gt=0, le=1, description="mean relative RMS error of the trunk")

    @classmethod
    def parse(cls, text: str) -> ErrorBudget:
        """``mask=0.01,rms=0.05`` (either part alone keeps the other's default)."""
        values: dict[str, float] = {}
        for part in (p.strip() for p in text.split(",") if p.strip()):
            key, _, number = part.partition("=")
            if key.strip() not in _BUDGET_KEYS or not number:
                raise ValueError(f"expected mask=X and / or rms=Y (e.g. mask=0.01,rms=0.05), got {text!r}")
            try:
                values[_BUDGET_KEYS[key.strip()]] = float(number)
            except ValueError:
                raise ValueError(f"{key.strip()}: expected a number, got {number!r}") from None
        if not values:
            raise ValueError(f"expected mask=X and / or rms=Y (e.g. mask=0.01,rms=0.05), got {text!r}")
        return cls(**values)

    def __str__(self) -> str:
        return f"mask={self.mask_iou_loss:g},rms={self.rel_rms:g}"


class CacheConfig(BaseModel):
    """Everything one cache run needs; the target part of it is fingerprinted into the ledger."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str = Field(pattern="^(sa-1b|sa-v)$")
    source: str = Field(min_length=1)
    shards: str = "all"
    store: str = Field(min_length=1)
    teacher: TeacherConfig = TeacherConfig()
    targets: tuple[Target, ...] = ()
    prompts: PromptConfig = PromptConfig()
    codec: FeatureCodec = FeatureCodec.FP16
    rank: int = Field(256, ge=1, le=4096, description="lowrank codec: basis size (capped at the trunk width)")
    video: VideoTargetConfig = VideoTargetConfig()
    address: str | None = None
    s3_endpoint: str | None = None  # S3-compatible server for s3:// sources and stores (else AWS_ENDPOINT_URL / AWS)
    max_failures: MaxFailures = MaxFailures(count=0)
    inputs: Inputs = Inputs.STORE
    dct_scaling: bool = False  # --fast-decode: JPEGs decoded at a DCT scale (cheaper; not the teacher's own preprocessing)
    run_id: str = ""
    read_retries: int = Field(
        3, ge=0, le=20, description="reads of a shard again after a transient I/O error, before it is left for a rerun"
    )
    error_budget: ErrorBudget | None = Field(
        None, description="--codec auto: codec and rank are chosen by measuring candidates against this budget (see codec_pilot)"
    )
    max_teachers: int | None = Field(
        None, ge=1, le=4096, description="most teacher actors: GPUs that join the cluster mid-run get one up to this (None: no bound)"
    )

    @field_validator("shards")
    @classmethod
    def _shards(cls, value: str) -> str:
        ShardSpec.parse(value)
        return value

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None and value.startswith("ray://"):
            raise ValueError(
                "Ray Client (ray://) cannot run Ray Data plans; submit the job instead: "
                "ray job submit --address http://HEAD:8265 -- esam3 cache ... --address auto"
            )
        if value is not None and value != "auto" and not re.match(r"^[\w.-]+:\d{1,5}$", value):
            raise ValueError(f"expected auto or HOST:PORT of a running Ray cluster, got {value!r}")
        return value

    @field_validator("s3_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return check_s3_endpoint(value)

    @model_validator(mode="after")
    def _targets(self) -> CacheConfig:
        if self.dct_scaling and self.dataset != "sa-1b":
            raise ValueError("fast decode (DCT-scaled JPEG decoding) applies to sa-1b only: SA-V frames come from video")
        if not self.targets:
            object.__setattr__(self, "targets", tuple(Target(t) for t in DEFAULT_TARGETS[self.dataset]))
        names = {t.value for t in self.targets}
        if self.error_budget is not None and (
            self.dataset != "sa-1b" or Target.PROMPTS.value not in names or Target.TRUNK.value not in names
        ):
            raise ValueError(
                "codec auto measures what each codec costs the heads' masks on SA-1B prompts: it needs --dataset sa-1b "
                "with --targets trunk,prompts; pass --codec fp16|bf16|int8|lowrank otherwise"
            )
        wrong = names - _VALID_TARGETS[self.dataset]
        if wrong:
            raise ValueError(f"targets {sorted(wrong)} do not apply to {self.dataset}; choose from {sorted(_VALID_TARGETS[self.dataset])}")
        return self

    def target_spec(self, teacher_checksum: str) -> dict[str, Any]:
        """What the rows depend on (not where they come from or go to): fingerprinted into the ledger."""
        spec: dict[str, Any] = {
            "dataset": self.dataset,
            "teacher": teacher_checksum,
            "targets": sorted(t.value for t in self.targets),
            "codec": self.codec.value,
            "dct_scaling": self.dct_scaling,
            "inputs": self.inputs.value,
        }
        if self.codec == FeatureCodec.LOWRANK:
            spec["rank"] = self.rank
        if self.dataset == "sa-1b":
            spec["prompts"] = self.prompts.model_dump(mode="json")
        else:
            # the tracker session spans the whole video (all its annotated frames), whatever max_frames uses
            spec["video"] = {**self.video.model_dump(mode="json"), "session": "whole-video"}
        return spec

    def fingerprint(self, teacher_checksum: str) -> str:
        blob = json.dumps(self.target_spec(teacher_checksum), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
