"""Bytes per cached image and measured error of each feature codec, at SAM3's full trunk size (1024 x 72 x 72).

The public recipe stores the trunk output as fp16: 10.6 MB per image. Real SAM3 weights cannot be downloaded
here, so the features are synthetic but shaped like a ViT trunk's: a power-law channel spectrum
(singular values ~ k^-alpha), spatially smooth maps, a little white noise, and a few channels ~100x larger
than the rest (real ViTs have such outlier channels; they defeat a single int8 scale). The low-rank basis is
fitted on the first ``--fit-rows`` rows and measured on the others, as the cache does. Also times encode and
decode on one core. Prints one JSON line.

    python benchmarks/codecs.py [--rows 12] [--fit-rows 8] [--rank 256] [--alpha 1.0]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from esam3.schemas.codecs import FeatureCodec, decode_features, encode_features, fit_basis

PUBLIC_BYTES_PER_IMAGE = 10.6e6


def synthetic_trunk(rng: np.random.Generator, rows: int, channels: int, side: int, alpha: float) -> np.ndarray:
    """(rows, C, side, side) float32 with a power-law spectrum, smooth maps, noise and 4 outlier channels."""
    latent = channels  # full rank: a rank-r basis must drop real energy
    mixing = np.linalg.qr(rng.normal(size=(channels, latent)))[0] * (np.arange(1, latent + 1) ** -alpha)
    maps = rng.normal(size=(rows, latent, side, side)).astype(np.float32)
    smooth = torch.nn.functional.avg_pool2d(torch.from_numpy(maps), 5, stride=1, padding=2).numpy()
    x = np.einsum("cl,nlp->ncp", mixing, smooth.reshape(rows, latent, -1)) * np.sqrt(channels)
    x += 0.02 * x.std() * rng.normal(size=x.shape)
    outliers = rng.choice(channels, 4, replace=False)
    x[:, outliers] = x[:, outliers] * 100 + 50 * x.std()
    return x.reshape(rows, channels, side, side).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=12, help="feature maps to generate")
    parser.add_argument("--fit-rows", type=int, default=8, help="rows the low-rank basis is fitted on")
    parser.add_argument("--rank", type=int, default=256, help="low-rank basis size")
    parser.add_argument("--alpha", type=float, default=1.0, help="power-law exponent of the channel spectrum")
    parser.add_argument("--channels", type=int, default=1024, help="trunk width (SAM3: 1024)")
    parser.add_argument("--side", type=int, default=72, help="token grid side (SAM3: 72)")
    args = parser.parse_args()
    if not 0 < args.fit_rows < args.rows:
        parser.error("--fit-rows must be between 1 and --rows - 1")
    torch.set_num_threads(1)
    features = synthetic_trunk(np.random.default_rng(0), args.rows, args.channels, args.side, args.alpha)
    start = time.perf_counter()
    basis = fit_basis(features[: args.fit_rows], args.rank)
    fit_s = time.perf_counter() - start
    held_out = features[args.fit_rows :]
    result: dict[str, object] = {
        "benchmark": "codecs", "shape": list(features.shape[1:]), "rows_measured": len(held_out),
        "public_fp16_mb_per_image": PUBLIC_BYTES_PER_IMAGE / 1e6, "alpha": args.alpha,
    }
    for codec in FeatureCodec:
        extra = basis if codec == FeatureCodec.LOWRANK else None
        start = time.perf_counter()
        encoded = [encode_features(x, codec, extra) for x in held_out]
        encode_s = (time.perf_counter() - start) / len(held_out)
        start = time.perf_counter()
        for record, _ in encoded:
            decode_features(record, extra)
        decode_s = (time.perf_counter() - start) / len(held_out)
        errors = [error for _, error in encoded]
        entry = {
            "mb_per_image": round(encoded[0][0].nbytes / 1e6, 3),
            "vs_public": round(encoded[0][0].nbytes / PUBLIC_BYTES_PER_IMAGE, 3),
            "rel_rms_error_mean": float(f"{np.mean(errors):.3g}"),
            "rel_rms_error_max": float(f"{np.max(errors):.3g}"),
            "encode_ms": round(1000 * encode_s, 1),  # includes measuring the error (a decode)
            "decode_ms": round(1000 * decode_s, 1),
        }
        if codec == FeatureCodec.LOWRANK:
            entry.update(rank=args.rank, basis_mb=round(len(basis.to_bytes()) / 1e6, 2), fit_s=round(fit_s, 2))
        result[codec.value] = entry
    print(json.dumps(result))


if __name__ == "__main__":
    main()
