"""Tensor codecs of the store: how teacher targets become bytes, and back, with the error each one costs.

Feature maps (C, H, W) — trunk output, neck levels, memory features:

* ``fp16`` / ``bf16``: a cast (fp16 saturates beyond +-65504; bf16 keeps fp32's range with 8 bits of mantissa);
* ``int8``: symmetric per-channel scales (``absmax / 127`` per 2-D map, fp32: per channel of (C, H, W), per
  object and channel of (N, C, H, W)), so a few huge-magnitude channels — real ViT trunks have them — do not
  crush the resolution of the others;
* ``lowrank``: coefficients on a basis fitted on the first rows of a run and stored once in the store
  (``Basis``: mean (C,) + orthonormal components (C, r)), int8 per-component scales. Lossy by design: its
  per-row error is measured and stored so a user sees whether it holds on their features.

Mask logits (..., H, W): ``logit8d`` clips to +-16, quantises each map to int8 with its own scale
(``min(absmax, 16) / 127``: steps of at most 0.126), replaces each row by its differences (mod 256: the smooth ramps
of low-res SAM masks become runs of small values) and zstd-compresses; 18% smaller than ``logit8`` (the same
without the differences, what stores written before it hold; still read) on the SAM-like logits of
``benchmarks/codecs.py``. sigmoid(16) = 1 - 1.1e-7, so clipping changes no probability that matters.

Every ``encode_*`` returns the encoded record and the **relative RMS error** ``||decode(x) - x|| / ||x||`` it
measured on that very row; ``decode`` of an encoded record is exact up to that quantisation. Records are plain
bytes + small metadata (never pickled), so any reader can decode them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np
import pyarrow as pa


class FeatureCodec(str, Enum):
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"
    LOWRANK = "lowrank"


LOGIT_LIMIT = 16.0
#: Mask-logit codecs the store reads, and the one the cache writes.
LOGIT_CODECS = ("logit8", "logit8d")
LOGIT_CODEC = "logit8d"


def map_codec(codec: FeatureCodec | str) -> FeatureCodec:
    """Codec of the per-object feature maps (SA-V memory targets): low-rank applies to the trunk only, the rest go int8."""
    codec = FeatureCodec(codec)
    return FeatureCodec.INT8 if codec == FeatureCodec.LOWRANK else codec


_ZSTD_LEVEL = 3


class CodecError(ValueError):
    """An encoded record that cannot be decoded (wrong size, unknown codec, missing basis)."""


@dataclass(frozen=True)
class Encoded:
    """One encoded tensor: ``data`` (the payload), ``scale`` (fp32 per channel / component, or empty)."""

    codec: str
    shape: tuple[int, ...]
    data: bytes
    scale: bytes = b""

    @property
    def nbytes(self) -> int:
        return len(self.data) + len(self.scale)


@dataclass(frozen=True)
class Basis:
    """A low-rank basis for (C, ...) features: ``mean`` (C,) and orthonormal ``components`` (C, r), float32."""

    mean: np.ndarray
    components: np.ndarray

    @property
    def rank(self) -> int:
        return self.components.shape[1]

    def to_bytes(self) -> bytes:
        channels, rank = self.components.shape
        header = np.array([channels, rank], dtype=np.int64).tobytes()
        return header + self.mean.astype(np.float32).tobytes() + self.components.astype(np.float32).tobytes()

    @classmethod
    def from_bytes(cls, blob: bytes) -> Basis:
        channels, rank = np.frombuffer(blob[:16], dtype=np.int64)
        body = np.frombuffer(blob[16:], dtype=np.float32)
        if body.size != channels + channels * rank:
            raise CodecError(f"basis of {len(blob)} bytes does not hold {channels} channels x rank {rank}")
        return cls(body[:channels].copy(), body[channels:].reshape(channels, rank).copy())


def relative_rms(decoded: np.ndarray, original: np.ndarray) -> float:
    """``||decoded - original|| / ||original||`` (0 for an all-zero original decoded exactly).

    Squares in float32, sums in float64: no float64 copies of a 21 MB trunk (this runs on every stored row).
    The difference of two close float32 values is exact, so the error is the one a float64 pass would give.
    """
    original = np.asarray(original, dtype=np.float32)
    norm = float(np.sqrt(np.sum(np.square(original), dtype=np.float64)))
    residual = np.subtract(decoded, original, dtype=np.float32)
    np.square(residual, out=residual)
    diff = float(np.sqrt(np.sum(residual, dtype=np.float64)))
    if norm == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / norm


def fit_basis(samples: np.ndarray, rank: int) -> Basis:
    """PCA over channels of N feature maps (N, C, H, W): the ``rank`` directions holding the most energy."""
    n, channels = samples.shape[:2]
    if not 0 < rank <= channels:
        raise ValueError(f"rank must be in 1..{channels}, got {rank}")
    columns = np.moveaxis(samples.reshape(n, channels, -1), 1, 0).reshape(channels, -1).astype(np.float64)
    mean = columns.mean(axis=1)
    centred = columns - mean[:, None]
    covariance = centred @ centred.T / max(1, centred.shape[1] - 1)
    values, vectors = np.linalg.eigh(covariance)
    order = np.argsort(values)[::-1][:rank]
    return Basis(mean.astype(np.float32), vectors[:, order].astype(np.float32))


def _per_row_int8(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one fp32 scale per row of a 2-D array."""
    absmax = np.maximum(rows.max(axis=1, initial=0.0), -rows.min(axis=1, initial=0.0))  # no |rows| copy
    scale = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
    scaled = np.divide(rows, scale[:, None], dtype=np.float32)
    np.rint(scaled, out=scaled)
    np.clip(scaled, -127, 127, out=scaled)
    return scaled.astype(np.int8), scale


def encode_features(x: np.ndarray, codec: FeatureCodec | str, basis: Basis | None = None) -> tuple[Encoded, float]:
    """Encode a (C, ...) float feature map; returns the record and its measured relative RMS error."""
    codec = FeatureCodec(codec)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise CodecError("features hold NaN or Inf; refusing to store them")
    channels = x.shape[0]
    if codec == FeatureCodec.FP16:
        encoded = Encoded(codec.value, x.shape, x.astype(np.float16).tobytes())
    elif codec == FeatureCodec.BF16:
        bits = x.view(np.uint32)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
        encoded = Encoded(codec.value, x.shape, rounded.tobytes())
    elif codec == FeatureCodec.INT8:
        maps = _maps(x.shape)
        q, scale = _per_row_int8(x.reshape(maps, x.size // maps if maps else 0))
        encoded = Encoded(codec.value, x.shape, q.tobytes(), scale.tobytes())
    else:
        if basis is None:
            raise CodecError("the lowrank codec needs the store's basis")
        if basis.components.shape[0] != channels:
            raise CodecError(f"basis has {basis.components.shape[0]} channels, features have {channels}")
        coefficients = basis.components.T @ (x.reshape(channels, -1) - basis.mean[:, None])
        q, scale = _per_row_int8(coefficients)
        encoded = Encoded(codec.value, x.shape, q.tobytes(), scale.tobytes())
    error = relative_rms(decode_features(encoded, basis), x)
    if not np.isfinite(error):  # fp16 overflows to Inf above 65504
        raise CodecError(f"features (max |x| = {float(np.abs(x).max()):.4g}) do not fit codec {codec.value}; use bf16 or int8")
    return encoded, error


def decode_features(encoded: Encoded, basis: Basis | None = None) -> np.ndarray:
    """The float32 (C, ...) feature map of a record."""
    shape = tuple(encoded.shape)
    count = int(np.prod(shape))
    channels = shape[0] if shape else 0
    try:
        codec = FeatureCodec(encoded.codec)
    except ValueError:
        raise CodecError(f"unknown feature codec {encoded.codec!r}") from None
    _expect(encoded.data, {FeatureCodec.FP16: 2 * count, FeatureCodec.BF16: 2 * count, FeatureCodec.INT8: count}.get(codec), codec)
    if codec == FeatureCodec.FP16:
        return np.frombuffer(encoded.data, dtype=np.float16).astype(np.float32).reshape(shape)
    if codec == FeatureCodec.BF16:
        bits = np.frombuffer(encoded.data, dtype=np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    scale = np.frombuffer(encoded.scale, dtype=np.float32)
    if codec == FeatureCodec.INT8:
        maps = _maps(shape)
        _expect(encoded.scale, 4 * maps, codec, "scale")
        q = np.frombuffer(encoded.data, dtype=np.int8).reshape(maps, count // maps if maps else 0)
        return (q.astype(np.float32) * scale[:, None]).reshape(shape)
    if basis is None:
        raise CodecError("the lowrank codec needs the store's basis")
    rank = basis.rank
    _expect(encoded.data, rank * (count // max(channels, 1)), codec)
    _expect(encoded.scale, 4 * rank, codec, "scale")
    q = np.frombuffer(encoded.data, dtype=np.int8).reshape(rank, -1)
    coefficients = q.astype(np.float32) * scale[:, None]
    return (basis.components @ coefficients + basis.mean[:, None]).reshape(shape).astype(np.float32)


def _maps(shape: tuple[int, ...]) -> int:
    """int8 scales: one per 2-D map, i.e. per channel of (C, H, W), per (object, channel) of (N, C, H, W)."""
    return int(np.prod(shape[:-2])) if len(shape) >= 3 else (shape[0] if shape else 1)


def payload_bytes(codec: str, shape: tuple[int, ...], rank: int = 0) -> tuple[int, int]:
    """(data, scale) bytes of a record of ``codec`` and ``shape`` before compression (``logit8``'s codes before zstd;
    ``lowrank`` with ``rank`` components)."""
    count = int(np.prod(shape))
    if codec in (FeatureCodec.FP16.value, FeatureCodec.BF16.value):
        return 2 * count, 0
    if codec == FeatureCodec.INT8.value:
        return count, 4 * _maps(shape)
    if codec in LOGIT_CODECS:
        plane = shape[-2] * shape[-1] if len(shape) >= 2 else count
        return count, 4 * (count // plane if plane else 0)
    if codec == FeatureCodec.LOWRANK.value:
        return rank * (count // max(shape[0], 1)), 4 * rank
    raise CodecError(f"unknown codec {codec!r}")


def _expect(blob: bytes, size: int | None, codec: FeatureCodec | str, part: str = "data") -> None:
    if size is not None and len(blob) != size:
        raise CodecError(f"{codec} {part} has {len(blob)} bytes, expected {size}")


def encode_logits(x: np.ndarray, codec: str = LOGIT_CODEC) -> tuple[Encoded, float]:
    """Mask logits (..., H, W) -> int8 per map (scale = min(absmax, 16) / 127), compressed as ``codec``.

    Error measured against the logits clipped to +-16 (sigmoid(16) = 1 - 1.1e-7: nothing a mask loss sees).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if np.isnan(x).any():
        raise CodecError("mask logits hold NaN; refusing to store them")
    plane = x.shape[-2] * x.shape[-1] if x.ndim >= 2 else x.size
    count = x.size // plane if plane else 0
    maps = np.clip(x, -LOGIT_LIMIT, LOGIT_LIMIT).reshape(count, plane)
    q, scale = _per_row_int8(maps)
    encoded = Encoded(codec, x.shape, compress_logits(q, x.shape, codec), scale.tobytes())
    dequantized = np.multiply(q, scale[:, None], dtype=np.float32)  # what decode_logits gives (zstd is lossless)
    return encoded, relative_rms(dequantized, maps)


def compress_logits(codes: bytes | memoryview | np.ndarray, shape: tuple[int, ...], codec: str = LOGIT_CODEC) -> bytes:
    """The int8 codes of mask-logit maps of ``shape`` -> the payload of ``codec`` (lossless): ``logit8d`` each row's
    differences (mod 256), then zstd; ``logit8`` zstd alone."""
    if codec not in LOGIT_CODECS:
        raise CodecError(f"unknown logit codec {codec!r}")
    if codec == "logit8d":
        rows = _logit_rows(codes, shape)
        codes = np.diff(rows, axis=1, prepend=np.zeros((len(rows), 1), np.uint8))
    return pa.Codec("zstd", compression_level=_ZSTD_LEVEL).compress(codes, asbytes=True)


def _logit_rows(blob: bytes | memoryview | np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Logit codes as uint8 rows (the last axis of ``shape``): what ``logit8d`` takes differences along."""
    flat = np.frombuffer(blob, dtype=np.uint8)
    if flat.size != int(np.prod(shape)):
        raise CodecError(f"{flat.size} logit codes do not hold {tuple(shape)}")
    return flat.reshape(-1, shape[-1] if shape and shape[-1] else 1)


def decode_logits(encoded: Encoded) -> np.ndarray:
    q, scale = logit_codes(encoded)
    if q.ndim < 2:  # fewer than two dimensions: one map, one scale (none if empty)
        return q.astype(np.float32) * (scale[0] if scale.size else np.float32(1.0))
    return q.astype(np.float32) * scale[..., None, None]


def logit_codes(encoded: Encoded) -> tuple[np.ndarray, np.ndarray]:
    """A ``logit8`` / ``logit8d`` record decompressed but not dequantised: int8 codes of its shape (..., H, W) and
    one float32 scale per map (...,); ``codes * scale[..., None, None]`` is the decoded logits (on any device)."""
    if encoded.codec not in LOGIT_CODECS:
        raise CodecError(f"unknown logit codec {encoded.codec!r}")
    shape = tuple(encoded.shape)
    count, scale_bytes = payload_bytes(encoded.codec, shape)
    _expect(encoded.scale, scale_bytes, encoded.codec, "scale")
    try:
        raw = pa.decompress(encoded.data, decompressed_size=count, codec="zstd", asbytes=True)
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise CodecError(f"{encoded.codec} payload does not decompress to {count} bytes ({exc})") from None
    _expect(raw, count, encoded.codec)
    scale = np.frombuffer(encoded.scale, dtype=np.float32)
    if encoded.codec == "logit8d":  # undo the row differences: a running sum mod 256
        raw = np.cumsum(_logit_rows(raw, shape), axis=1, dtype=np.uint8)
    q = np.frombuffer(raw, dtype=np.int8).reshape(shape)
    return q, scale.reshape(shape[:-2]) if len(shape) >= 2 else scale


def encode_png(image: np.ndarray) -> Encoded:
    """A uint8 (H, W, 3) RGB image -> lossless PNG (zlib level 1: ~80 ms and 1.4 MB for a 1008 x 1008 frame here,
    against ~350 ms and 1.2 MB at the default level 6)."""
    import io

    from PIL import Image

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise CodecError(f"png input must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG", compress_level=1)
    return Encoded("png", image.shape, buffer.getvalue())


def decode_image(codec: str, data: bytes | memoryview, shape: tuple[int, ...]) -> np.ndarray:
    """An ``input`` record (``jpeg`` file bytes or ``png``) -> uint8 (H, W, 3), decoded in full, checked against its shape."""
    import io

    import simplejpeg
    from PIL import Image

    try:
        if codec == "jpeg":
            image = simplejpeg.decode_jpeg(bytes(data), colorspace="RGB")
        elif codec == "png":
            image = np.array(Image.open(io.BytesIO(bytes(data))).convert("RGB"))
        else:
            raise CodecError(f"unknown image codec {codec!r}")
    except (ValueError, OSError, RuntimeError) as exc:
        raise CodecError(f"{codec} input does not decode ({exc})") from None
    if tuple(image.shape) != tuple(shape):
        raise CodecError(f"{codec} input decodes to {tuple(image.shape)}, the row says {tuple(shape)}")
    return image
