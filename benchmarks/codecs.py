"""Bytes per cached image and measured error of each feature codec, at SAM3's full trunk size (1024 x 72 x 72).

The public recipe stores the trunk output as fp16: 10.6 MB per image. Real SAM3 weights cannot be downloaded
here, so the features are synthetic but shaped like a ViT trunk's: a power-law channel spectrum
(singular values ~ k^-alpha), spatially smooth maps, a little white noise, a few channels ~100x larger than the
rest (outlier channels defeat a single int8 scale), and — measured separately in the same run — a few *tokens*
per image with massive activations (~100x the typical magnitude in a few channels, as real ViTs have at a few
positions), which inflate exactly the per-channel int8 scales of the channels they sit in.

Mask logits (``logit8d``: int8 per map, row differences, zstd; and ``logit8`` without the differences) are
measured on logits shaped like a trained SAM decoder's: a flat, confident background, objects confidently
positive, sharp boundaries a few pixels wide, mild texture; K = 16 prompts x 4 outputs (3 multimask + 1) at
288 x 288 per image. Reported: bytes per image, relative RMS error, the IoU of the masks (logits > 0) before and
after, and what ``--mask-outputs chosen`` (only the output a student is trained on, the default) stores at 288, 144
and 72 px a side, with the mask IoU after bringing it back to 288. Random-weight teachers give neither these
features nor these logits: the real ratios are those each run measures and stores per row.

Rows come from ``--shards`` synthetic shards, each with its own shift (a mean offset and extra energy in a
random subspace, as different image collections give). The low-rank basis is fitted on ``--fit-rows`` rows drawn
round-robin from every shard and measured on held-out rows of all shards; for comparison also fitted on the first
``--fit-rows`` rows of one shard (what a run that fits on its first teacher batch does). Also times encode and
decode on one core. ``budget``: the low-rank candidates ``--codec auto`` would measure (1/16 .. 1/2 of the
width), each one's held-out error, the smallest within the default budget's relative RMS, and the bytes of a full
SA-1B row with it (``esam3 plan``'s columns, the logits at the rate measured here). Prints one JSON line.

    python benchmarks/codecs.py [--rows 16] [--shards 4] [--fit-rows 8] [--rank 256] [--alpha 1.0] [--massive-tokens 4]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from esam3.pipeline.costs import bytes_per_row
from esam3.schemas.cache import CacheConfig, ErrorBudget, Inputs
from esam3.schemas.codecs import (
    Basis,
    FeatureCodec,
    compress_logits,
    decode_features,
    decode_logits,
    encode_features,
    encode_logits,
    fit_basis,
)
from esam3.schemas.prompts import MaskOutputs, PromptConfig
from esam3.workers.codec_choice import candidate_ranks
from esam3.workers.device_codecs import quantise_logits
from esam3.workers.heads import Geometry
from esam3.workers.mask_targets import logits_mask_iou, stored_logits
from esam3.workers.teacher_loading import random_config

PUBLIC_BYTES_PER_IMAGE = 10.6e6


def synthetic_trunk(
    rng: np.random.Generator, rows: int, channels: int, side: int, alpha: float, shards: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, C, side, side) float32 with a power-law spectrum, smooth maps, noise and 4 outlier channels; row i is
    from shard ``i % shards`` (each shard shifted its own way). Returns the features and each row's shard."""
    latent = channels  # full rank: a rank-r basis must drop real energy
    mixing = np.linalg.qr(rng.normal(size=(channels, latent)))[0] * (np.arange(1, latent + 1) ** -alpha)
    maps = rng.normal(size=(rows, latent, side, side)).astype(np.float32)
    smooth = torch.nn.functional.avg_pool2d(torch.from_numpy(maps), 5, stride=1, padding=2).numpy()
    x = np.einsum("cl,nlp->ncp", mixing, smooth.reshape(rows, latent, -1)) * np.sqrt(channels)
    x += 0.02 * x.std() * rng.normal(size=x.shape)
    shard_of = np.arange(rows) % shards
    std = x.std()
    for shard in range(shards):  # each shard: its own mean offset and extra energy in a random 32-dim subspace
        subspace = np.linalg.qr(rng.normal(size=(channels, 32)))[0]
        offset = 0.3 * std * rng.normal(size=(channels, 1))
        mine = shard_of == shard
        x[mine] += (
            offset + 0.5 * np.einsum("cl,nlp->ncp", subspace, smooth[mine, :32].reshape(int(mine.sum()), 32, -1)) * np.sqrt(channels) * std
        )
    outliers = rng.choice(channels, 4, replace=False)
    x[:, outliers] = x[:, outliers] * 100 + 50 * std
    return x.reshape(rows, channels, side, side).astype(np.float32), shard_of


def with_massive_tokens(rng: np.random.Generator, x: np.ndarray, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """A copy with ``tokens`` positions per row carrying ~100x activations in 3 channels (the same channels for
    every row, as in real ViTs), signs random; and the (rows, positions) mask of those tokens."""
    out = x.copy()
    mask = np.zeros((x.shape[0], x.shape[2] * x.shape[3]), dtype=bool)
    channels = rng.choice(x.shape[1], 3, replace=False)
    scale = 100 * float(np.median(np.abs(x)))
    for row, flags in zip(out, mask):
        flat = row.reshape(row.shape[0], -1)
        for position in rng.choice(flat.shape[1], tokens, replace=False):
            flat[channels, position] = scale * rng.choice([-1.0, 1.0], size=3) * rng.uniform(0.7, 1.3, size=3)
            flags[position] = True
    return out, mask


def other_token_error(codec: FeatureCodec, x: np.ndarray, mask: np.ndarray, basis: object) -> float:
    """Relative RMS error over the tokens that are *not* massive: what the massive ones cost everything else (a
    whole-map error hides it, the massive tokens' own energy dominating its denominator)."""
    errors = []
    for row, flags in zip(x, mask):
        decoded = decode_features(encode_features(row, codec, basis)[0], basis)
        keep = ~flags
        a = decoded.reshape(row.shape[0], -1)[:, keep]
        b = row.reshape(row.shape[0], -1)[:, keep]
        errors.append(float(np.linalg.norm(a - b) / np.linalg.norm(b)))
    return float(np.mean(errors))


def measure(codec: FeatureCodec, held_out: np.ndarray, basis: object) -> dict[str, object]:
    start = time.perf_counter()
    encoded = [encode_features(x, codec, basis) for x in held_out]
    encode_s = (time.perf_counter() - start) / len(held_out)
    start = time.perf_counter()
    for record, _ in encoded:
        decode_features(record, basis)
    decode_s = (time.perf_counter() - start) / len(held_out)
    errors = [error for _, error in encoded]
    return {
        "mb_per_image": round(encoded[0][0].nbytes / 1e6, 3),
        "vs_public": round(encoded[0][0].nbytes / PUBLIC_BYTES_PER_IMAGE, 3),
        "rel_rms_error_mean": float(f"{np.mean(errors):.3g}"),
        "rel_rms_error_max": float(f"{np.max(errors):.3g}"),
        "encode_ms": round(1000 * encode_s, 1),  # includes measuring the error (a decode)
        "decode_ms": round(1000 * decode_s, 1),
    }


def sam_like_logits(rng: np.random.Generator, maps: int, size: int) -> np.ndarray:
    """(maps, size, size) float32 logits like a trained SAM mask decoder's: background flat near -12 to -20,
    1-3 elliptical objects rising to +8 to +20 inside, a boundary ~3 px wide (slope ~4 logits per px), and a
    smooth texture (sigma ~1, varying over ~size/16 px: the decoder's upsampling leaves no pixel noise)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    coarse = torch.from_numpy(rng.normal(0, 1, (maps, 1, 16, 16)).astype(np.float32))
    texture = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()
    out = np.empty((maps, size, size), np.float32)
    for i in range(maps):
        distance = np.full((size, size), np.inf, np.float32)  # ~signed distance to the nearest object, px (< 0 inside)
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0.15, 0.85, 2) * size
            a, b = rng.uniform(0.05, 0.3, 2) * size
            radius = np.sqrt(((yy - cy) / a) ** 2 + ((xx - cx) / b) ** 2)
            distance = np.minimum(distance, (radius - 1.0) * min(a, b))
        low, high = -rng.uniform(12, 20), rng.uniform(8, 20)
        out[i] = np.clip(-4.0 * distance, low, high) + texture[i]
    return out


def measure_logits(rng: np.random.Generator, prompts: int, size: int) -> dict[str, object]:
    """logit8d (the cache's) and logit8 (without row differences) on one image's worth of SAM-like logits (prompts
    x 4 outputs: ``--mask-outputs all``), and the layouts ``--mask-outputs chosen`` stores at the decoder's size and
    smaller (``--mask-size``), through the cache's own code (resize, device quantiser, mask IoU back at full size)."""
    x = sam_like_logits(rng, 4 * prompts, size).reshape(prompts, 4, size, size)
    start = time.perf_counter()
    record, error = encode_logits(x)
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    decode_logits(record)
    decode_s = time.perf_counter() - start
    plain, _ = encode_logits(x, "logit8")
    decoded = decode_logits(record)
    inter = ((decoded > 0) & (x > 0)).sum(axis=(-2, -1))
    union = ((decoded > 0) | (x > 0)).sum(axis=(-2, -1))
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    logits = torch.from_numpy(x)
    pick = torch.from_numpy(rng.integers(0, 4, prompts))  # which output each prompt keeps: SAM-like maps are alike
    chosen = {}
    for side in (size, size // 2, size // 4):
        original, stored = stored_logits(logits[:, :1], logits[:, 1:], pick, MaskOutputs.CHOSEN, side)["chosen_logits"]
        q = quantise_logits(stored)
        nbytes = len(compress_logits(q.codes.numpy(), q.shape)) + 4 * prompts
        chosen[str(side)] = {
            "mb_per_image": round(nbytes / 1e6, 3),
            "bytes_per_value": round(nbytes / stored.numel(), 3),
            "mask_iou_mean": round(float(logits_mask_iou([(original, q)])), 5),
        }
    return {
        "prompts": prompts,
        "size": size,
        "int8_mb_per_image": round(x.size / 1e6, 3),
        "mb_per_image": round(record.nbytes / 1e6, 3),
        "ratio": round(x.size / len(record.data), 1),
        "logit8_mb_per_image": round(plain.nbytes / 1e6, 3),
        "encode_ms": round(1000 * encode_s, 1),
        "decode_ms": round(1000 * decode_s, 1),
        "rel_rms_error": float(f"{error:.3g}"),
        "mask_iou_mean": round(float(iou.mean()), 5),
        "mask_iou_min": round(float(iou.min()), 5),
        "chosen_by_size": chosen,  # --mask-outputs chosen at --mask-size side: bytes, and mask IoU back at full size
    }


def budget_choice(fit: np.ndarray, held_out: np.ndarray, logits: dict[str, object], prompts: int) -> dict[str, object]:
    """What ``--codec auto`` can tell on these features without real heads: the low-rank candidates' relative RMS
    on held-out rows, the smallest one within the default budget's ``rms``, and what a full SA-1B row then costs
    (``esam3 plan``'s columns, the mask logits at the rate measured above). The budget's mask part needs real
    SAM3 heads (random ones give meaningless masks): a real run measures it on its pilot rows."""
    budget = ErrorBudget()
    channels = fit.shape[1]
    full = fit_basis(fit, max(candidate_ranks(channels)))
    ranks = {}
    for rank in candidate_ranks(channels):
        basis = Basis(full.mean, full.components[:, :rank])
        errors = [encode_features(x, FeatureCodec.LOWRANK, basis)[1] for x in held_out]
        ranks[str(rank)] = {
            "trunk_mb_per_image": round(rank * held_out[0, 0].size / 1e6, 3),
            "rel_rms_error_mean": float(f"{np.mean(errors):.3g}"),
        }
    within = [int(r) for r, v in ranks.items() if v["rel_rms_error_mean"] <= budget.rel_rms]
    out: dict[str, object] = {"rel_rms_budget": budget.rel_rms, "lowrank": ranks, "smallest_within_rms": min(within) if within else None}
    if within:
        rate = logits["chosen_by_size"][str(logits["size"])]["bytes_per_value"]
        config = CacheConfig(
            dataset="sa-1b", source="-", store="-", codec="lowrank", rank=min(within), prompts=PromptConfig(num_prompts=prompts)
        )
        geometry = Geometry.from_config(random_config("full-random"))
        for name, inputs in (("row_mb_with_inputs", Inputs.STORE), ("row_mb_targets_only", Inputs.NONE)):
            columns = bytes_per_row(config.model_copy(update={"inputs": inputs}), geometry, rate)
            out[name] = round(sum(columns.values()) / 1e6, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16, help="feature maps to generate")
    parser.add_argument("--shards", type=int, default=4, help="synthetic shards the rows come from (each shifted its own way)")
    parser.add_argument("--fit-rows", type=int, default=8, help="rows the low-rank basis is fitted on (drawn from every shard)")
    parser.add_argument("--rank", type=int, default=256, help="low-rank basis size")
    parser.add_argument("--alpha", type=float, default=1.0, help="power-law exponent of the channel spectrum")
    parser.add_argument("--massive-tokens", type=int, default=4, help="tokens per image with massive activations (second measurement)")
    parser.add_argument("--channels", type=int, default=1024, help="trunk width (SAM3: 1024)")
    parser.add_argument("--side", type=int, default=72, help="token grid side (SAM3: 72)")
    parser.add_argument("--prompts", type=int, default=16, help="mask logits: prompts per image (K), 4 outputs each")
    parser.add_argument("--mask-size", type=int, default=288, help="mask logits: side of each map (SAM3: 288; even)")
    args = parser.parse_args()
    if not 0 < args.fit_rows < args.rows:
        parser.error("--fit-rows must be between 1 and --rows - 1")
    if not 1 <= args.shards <= args.fit_rows:
        parser.error("--shards must be between 1 and --fit-rows (the basis sees every shard)")
    if not 0 <= args.massive_tokens <= args.side * args.side:
        parser.error("--massive-tokens must be between 0 and the tokens per image")
    if not 0 < args.rank <= args.channels:
        parser.error("--rank must be between 1 and --channels")
    if args.prompts < 1:
        parser.error("--prompts must be at least 1")
    if args.mask_size < 16 or args.mask_size % 2:
        parser.error("--mask-size must be an even number of at least 16")
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    features, shard_of = synthetic_trunk(rng, args.rows, args.channels, args.side, args.alpha, args.shards)
    # fit rows round-robin over the shards (row i is from shard i % shards): the first fit-rows rows see every shard
    fit, held_out = features[: args.fit_rows], features[args.fit_rows :]
    start = time.perf_counter()
    basis = fit_basis(fit, args.rank)
    fit_s = time.perf_counter() - start
    one_shard = features[shard_of == 0]
    one_shard_basis = fit_basis(one_shard[: min(args.fit_rows, len(one_shard) - 1)], min(args.rank, args.channels))
    massive, massive_mask = with_massive_tokens(rng, held_out, args.massive_tokens)
    result: dict[str, object] = {
        "benchmark": "codecs",
        "shape": list(features.shape[1:]),
        "rows_measured": len(held_out),
        "shards": args.shards,
        "fit_rows": args.fit_rows,
        "public_fp16_mb_per_image": PUBLIC_BYTES_PER_IMAGE / 1e6,
        "alpha": args.alpha,
        "massive_tokens": args.massive_tokens,
    }
    for codec in FeatureCodec:
        extra = basis if codec == FeatureCodec.LOWRANK else None
        entry = measure(codec, held_out, extra)
        with_tokens = measure(codec, massive, extra)
        entry["with_massive_tokens"] = {k: with_tokens[k] for k in ("rel_rms_error_mean", "rel_rms_error_max")}
        entry["with_massive_tokens"]["rel_rms_error_other_tokens"] = float(f"{other_token_error(codec, massive, massive_mask, extra):.3g}")
        if codec == FeatureCodec.LOWRANK:
            lone = measure(codec, held_out[shard_of[args.fit_rows :] != 0], one_shard_basis)
            entry.update(
                rank=args.rank,
                basis_mb=round(len(basis.to_bytes()) / 1e6, 2),
                fit_s=round(fit_s, 2),
                fitted_on_one_shard={
                    "rel_rms_error_mean_other_shards": lone["rel_rms_error_mean"],
                    "rel_rms_error_max_other_shards": lone["rel_rms_error_max"],
                },
            )
        result[codec.value] = entry
    result["logit8d"] = measure_logits(rng, args.prompts, args.mask_size)
    result["budget"] = budget_choice(fit, held_out, result["logit8d"], args.prompts)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
