"""``--codec auto``: measure every candidate trunk codec on pilot rows and take the smallest within the budget.

A user should not have to guess a low-rank rank without knowing what it costs a student. On a few rows drawn from
several shards (``esam3.pipeline.codec_pilot`` reads them) the teacher computes the exact trunk and the heads'
outputs for each row's prompts; then, for every candidate (fp16, bf16, int8, and low-rank at a range of ranks),
the trunk is quantised and decoded with the device codecs the cache uses, the prompts are decoded again from it,
and the candidate gets the mean relative RMS error of the trunk and the mean mask-IoU loss of the heads' masks
(``esam3.workers.task_error``). The smallest candidate (stored bytes per row) within both budgets wins.

The low-rank basis is fitted on half of the pilot rows (every other one, so both halves span the shards) and
measured on the other half, so its error is a held-out one; the run then uses a basis fitted on all of them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from esam3.schemas.cache import ErrorBudget
from esam3.schemas.codecs import Basis, FeatureCodec, fit_basis, payload_bytes
from esam3.workers.device_codecs import DeviceBasis, dequantise, quantise_features
from esam3.workers.preprocess import normalize
from esam3.workers.task_error import task_error
from esam3.workers.teacher import Sam3Teacher
from esam3.workers.teacher_step import prompt_set

#: Low-rank candidates as shares of the trunk width (SAM3's 1024: 64, 128, 192, 256, 384, 512).
RANK_SHARES = (1 / 16, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2)


@dataclass(frozen=True)
class Candidate:
    """One codec as measured on the pilot rows."""

    codec: str
    rank: int | None  # low-rank only
    trunk_bytes: int  # stored bytes of one row's trunk (codes + scales)
    rel_rms: float  # mean relative RMS error of the trunk
    mask_iou_loss: float  # mean 1 - IoU of the heads' masks, decoded vs exact trunk
    within: bool  # both means within the budget

    @property
    def name(self) -> str:
        return f"lowrank r={self.rank}" if self.rank else self.codec


@dataclass(frozen=True)
class CodecChoice:
    """What ``--codec auto`` measured and chose; stored once per dataset in the store (``codec-<dataset>.json``)."""

    budget: dict[str, float]
    codec: str
    rank: int | None
    rows: int  # pilot rows measured
    shards: list[str]  # the shards they came from
    candidates: list[Candidate]
    teacher: str = ""  # the checksum of the teacher that measured (set where the choice is stored)
    measured_on: dict[str, Any] | None = None  # host, pid and device of the pilot

    @property
    def chosen(self) -> Candidate:
        return next(c for c in self.candidates if (c.codec, c.rank) == (self.codec, self.rank))

    def to_json(self) -> dict[str, Any]:
        """As plain JSON: an error that is not finite (fp16 overflowing on some feature) is written as null."""
        candidates = [
            {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in asdict(c).items()} for c in self.candidates
        ]
        return {**asdict(self), "candidates": candidates}


def candidate_ranks(channels: int) -> list[int]:
    """The low-rank candidates for a trunk of ``channels`` channels (distinct, at least 1)."""
    return sorted({max(1, round(share * channels)) for share in RANK_SHARES})


@torch.inference_mode()
def measure_codecs(teacher: Sam3Teacher, rows: list[dict[str, Any]], budget: ErrorBudget) -> tuple[CodecChoice, Basis | None]:
    """Measure every candidate on WORK ``rows`` (samples with prompts) and choose; returns the choice and, when a
    low-rank codec won, the basis of its rank fitted on all rows (for the store)."""
    if len(rows) < 2:
        raise ValueError(f"codec auto needs at least 2 pilot rows with prompts, got {len(rows)}")
    g = teacher.geometry
    pixels = torch.stack([torch.frombuffer(bytearray(r["pixels"]), dtype=torch.uint8).reshape(3, g.image_size, g.image_size) for r in rows])
    trunks = teacher.trunk_features(normalize(pixels.to(teacher.device))).float()
    prompts = [prompt_set(r, g.image_size) for r in rows]
    exact = [teacher.prompt_targets(t, p, on_device=True) for t, p in zip(trunks, prompts)]
    shape = tuple(trunks.shape[1:])
    full = fit_basis(trunks[0::2].cpu().numpy(), max(candidate_ranks(g.trunk_width)))  # PCA: a rank-r basis is its first r

    def measure(codec: FeatureCodec, rank: int | None = None) -> Candidate:
        basis = None if rank is None else DeviceBasis.of(Basis(full.mean, full.components[:, :rank]), teacher.device)
        measured = range(1, len(rows), 2) if rank else range(len(rows))  # low-rank: the rows the basis has not seen
        rms, loss = [], []
        for i in measured:
            q = quantise_features(trunks[i], codec, basis)
            approx = teacher.prompt_targets(dequantise(q, basis), prompts[i], on_device=True)
            rms.append(float(q.meta[0]))
            loss.append(1.0 - float(task_error(exact[i], approx)[0]))
        data, scale = payload_bytes(codec.value, shape, rank or 0)
        mean_rms, mean_loss = float(np.mean(rms)), float(np.mean(loss))
        within = mean_rms <= budget.rel_rms and mean_loss <= budget.mask_iou_loss
        return Candidate(codec.value, rank, data + scale, round(mean_rms, 6), round(mean_loss, 6), within)

    candidates = [measure(FeatureCodec.LOWRANK, r) for r in candidate_ranks(g.trunk_width)]
    candidates += [measure(c) for c in (FeatureCodec.INT8, FeatureCodec.BF16, FeatureCodec.FP16)]
    candidates.sort(key=lambda c: (c.trunk_bytes, c.rel_rms))
    fitting = [c for c in candidates if c.within]
    # none within the budget: the most exact one (the budget is then reported as missed, row by row)
    chosen = fitting[0] if fitting else min(candidates, key=lambda c: (c.mask_iou_loss, c.rel_rms))
    choice = CodecChoice(
        budget=budget.model_dump(),
        codec=chosen.codec,
        rank=chosen.rank,
        rows=len(rows),
        shards=sorted({r["shard"] for r in rows}),
        candidates=candidates,
    )
    basis = fit_basis(trunks.cpu().numpy(), chosen.rank) if chosen.rank else None
    return choice, basis
