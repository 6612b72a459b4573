"""Store codecs: exact inverses up to the quantisation they report, sizes, and ViT-like features with outlier channels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esam3.schemas.codecs import (
    LOGIT_LIMIT,
    Basis,
    CodecError,
    Encoded,
    FeatureCodec,
    decode_features,
    decode_logits,
    encode_features,
    encode_logits,
    fit_basis,
    relative_rms,
)


def vit_like(rng: np.random.Generator, n: int = 1, channels: int = 256, side: int = 24, rank: int = 48) -> np.ndarray:
    """Features shaped like a ViT trunk's: low-rank spatial structure + noise, and a few channels ~100x larger."""
    basis = rng.normal(size=(channels, rank))
    maps = rng.normal(size=(n, rank, side * side))
    x = np.einsum("cr,nrp->ncp", basis, maps) / np.sqrt(rank) + 0.1 * rng.normal(size=(n, channels, side * side))
    outliers = rng.choice(channels, 4, replace=False)
    x[:, outliers] *= 100.0
    x[:, outliers] += 300.0
    return x.reshape(n, channels, side, side).astype(np.float32)


@pytest.mark.parametrize("codec", [FeatureCodec.FP16, FeatureCodec.BF16, FeatureCodec.INT8])
def test_feature_codecs_round_trip_with_reported_error(codec: FeatureCodec) -> None:
    x = vit_like(np.random.default_rng(0))[0]
    encoded, error = encode_features(x, codec)
    decoded = decode_features(encoded)
    assert decoded.shape == x.shape and decoded.dtype == np.float32
    assert error == pytest.approx(relative_rms(decoded, x))
    bound = {FeatureCodec.FP16: 1e-3, FeatureCodec.BF16: 5e-3, FeatureCodec.INT8: 1e-2}[codec]
    assert 0 < error < bound
    assert np.array_equal(decode_features(encode_features(decoded, codec)[0]), decoded), "decode is a fixed point"
    per_value = {FeatureCodec.FP16: 2, FeatureCodec.BF16: 2, FeatureCodec.INT8: 1}[codec]
    assert encoded.nbytes == per_value * x.size + (4 * x.shape[0] if codec == FeatureCodec.INT8 else 0)


def test_bf16_matches_torch_rounding() -> None:
    x = np.random.default_rng(1).normal(size=(8, 33)).astype(np.float32) * 1e3
    expected = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(decode_features(encode_features(x, "bf16")[0]), expected)


def test_int8_per_channel_keeps_ordinary_channels_precise_next_to_outliers() -> None:
    x = vit_like(np.random.default_rng(2))[0]
    decoded = decode_features(encode_features(x, "int8")[0])
    ordinary = np.abs(x).reshape(x.shape[0], -1).max(axis=1) < 50
    per_channel = [relative_rms(decoded[c], x[c]) for c in np.flatnonzero(ordinary)]
    assert max(per_channel) < 0.02  # one global scale would lose them entirely
    one_scale = np.abs(x).max() / 127
    coarse = np.rint(x / one_scale) * one_scale
    assert relative_rms(coarse[ordinary], x[ordinary]) > 10 * relative_rms(decoded[ordinary], x[ordinary])


def test_lowrank_codec_with_a_fitted_basis() -> None:
    rows = vit_like(np.random.default_rng(3), n=9)  # one "model": shared channel structure and outliers
    train, held_out = rows[:8], rows[8]
    rank = 64
    basis = fit_basis(train, rank)
    assert basis.components.shape == (256, rank)
    np.testing.assert_allclose(basis.components.T @ basis.components, np.eye(rank), atol=1e-4)
    assert Basis.from_bytes(basis.to_bytes()).components.tobytes() == basis.components.tobytes()
    encoded, error = encode_features(held_out, "lowrank", basis)
    assert encoded.nbytes == rank * 24 * 24 + 4 * rank
    assert error == pytest.approx(relative_rms(decode_features(encoded, basis), held_out))
    assert error < 0.05
    noise = np.random.default_rng(4).normal(size=(256, 24, 24)).astype(np.float32)
    assert encode_features(noise, "lowrank", basis)[1] > 0.5, "error is measured, not assumed"
    with pytest.raises(CodecError, match="basis"):
        encode_features(held_out, "lowrank")
    with pytest.raises(CodecError, match="channels"):
        encode_features(held_out[:10], "lowrank", basis)


def float64_rms(decoded: np.ndarray, original: np.ndarray) -> float:
    original = original.astype(np.float64)
    return float(np.linalg.norm(decoded.astype(np.float64) - original) / np.linalg.norm(original))


@pytest.mark.parametrize("codec", ["fp16", "bf16", "int8"])
def test_stored_error_equals_a_float64_measure(codec: str) -> None:
    """The per-row error is computed in float32 with float64 sums (speed); it must equal the float64 formula."""
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((64, 24, 24)) * rng.lognormal(0, 2, (64, 1, 1))).astype(np.float32)
    encoded, error = encode_features(x, codec)
    assert error == pytest.approx(float64_rms(decode_features(encoded), x), rel=1e-6)


def test_logit_codec() -> None:
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:96, :96]
    smooth = (20 - np.hypot(yy - 40, xx - 50)).astype(np.float32)[None].repeat(4, 0)  # a blob, saturated outside
    encoded, error = encode_logits(smooth)
    decoded = decode_logits(encoded)
    assert np.abs(decoded - np.clip(smooth, -LOGIT_LIMIT, LOGIT_LIMIT)).max() <= LOGIT_LIMIT / 127 / 2 + 1e-6
    assert error < 0.01 and encoded.nbytes < smooth.size / 4, "smooth masks compress well below int8"
    assert np.array_equal((decoded > 0), (smooth > 0))
    assert error == pytest.approx(float64_rms(decoded, np.clip(smooth, -LOGIT_LIMIT, LOGIT_LIMIT)), rel=1e-6), (
        "the stored error is the decoded one"
    )
    small = 1e-3 * rng.normal(size=(3, 32, 32)).astype(np.float32)  # a random teacher's logits: tiny
    encoded, error = encode_logits(small)
    assert decode_logits(encoded).shape == small.shape and error < 0.01, "each map gets its own scale"
    with pytest.raises(CodecError, match="NaN"):
        encode_logits(np.full((2, 2), np.nan, np.float32))


def test_row_differences_shrink_smooth_logits_and_change_no_value() -> None:
    """logit8d (what the cache writes) decodes to exactly what logit8 (what older stores hold, still read) does, and
    is smaller on logits with smooth ramps; ragged shapes and wrap-around differences (-127 next to 127) included."""
    yy, xx = np.mgrid[:96, :96]
    ramps = np.stack([(20 - np.hypot(yy - 40, xx - 50)), (xx - 48.0) / 3, np.where(xx % 2, 16.0, -16.0)]).astype(np.float32)
    for x in (ramps, ramps[:, :7, :5], ramps[:1].reshape(96, 96)):
        old, old_error = encode_logits(x, "logit8")
        new, new_error = encode_logits(x)
        assert (old.codec, new.codec) == ("logit8", "logit8d") and old_error == new_error
        assert np.array_equal(decode_logits(old), decode_logits(new)) and new.scale == old.scale
    old, new = encode_logits(ramps[:2], "logit8")[0], encode_logits(ramps[:2])[0]
    assert len(new.data) < 0.8 * len(old.data)
    with pytest.raises(CodecError, match="unknown logit codec"):
        encode_logits(ramps, "logit4")


def test_bad_records_are_errors_not_garbage() -> None:
    x = np.ones((4, 3, 3), np.float32)
    good, _ = encode_features(x, "int8")
    with pytest.raises(CodecError, match="data has 35 bytes, expected 36"):
        decode_features(Encoded("int8", good.shape, good.data[:-1], good.scale))
    with pytest.raises(CodecError, match="scale"):
        decode_features(Encoded("int8", good.shape, good.data, good.scale[:-4]))
    with pytest.raises(CodecError, match="unknown feature codec"):
        decode_features(Encoded("zip", good.shape, good.data))
    with pytest.raises(CodecError, match="NaN or Inf"):
        encode_features(np.array([[np.inf]], np.float32), "fp16")
    logits, _ = encode_logits(x)
    with pytest.raises(CodecError, match="decompress"):
        decode_logits(Encoded("logit8d", logits.shape, logits.data[:-3], logits.scale))
    with pytest.raises(CodecError, match="do not fit codec fp16; use bf16 or int8"):
        encode_features(np.array([[7e4, 1.0]], np.float32), "fp16")  # finite, but Inf in fp16
    assert encode_features(np.array([[7e4, 1.0]], np.float32), "bf16")[1] < 0.01
    zero, error = encode_features(np.zeros((2, 5), np.float32), "int8")
    assert error == 0.0 and not decode_features(zero).any()


def test_empty_tensors_round_trip() -> None:
    """A video frame before any object appears has zero objects: its tensors are empty, not an error."""
    for codec in ("fp16", "bf16", "int8"):
        encoded, error = encode_features(np.zeros((0, 64, 8, 8), np.float32), codec)
        assert decode_features(encoded).shape == (0, 64, 8, 8) and error == 0.0
    encoded, error = encode_logits(np.zeros((0, 32, 32), np.float32))
    assert decode_logits(encoded).shape == (0, 32, 32) and error == 0.0
