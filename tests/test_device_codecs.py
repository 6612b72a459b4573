"""Targets quantised on the teacher's device: the store's decoders read them, and on the same input they are the
reference codecs' bytes (``esam3.schemas.codecs``), errors included."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from esam3.schemas.codecs import (
    CodecError,
    compress_logits,
    Encoded,
    decode_features,
    decode_logits,
    encode_features,
    encode_logits,
    fit_basis,
)
from esam3.workers.device_codecs import DeviceBasis, HostCopies, dequantise, quantise_features, quantise_logits


def trunk_like(rng: np.random.Generator, shape: tuple[int, ...] = (48, 8, 8)) -> np.ndarray:
    """Per-channel scales over four decades and one outlier channel, as real ViT trunks have."""
    x = rng.normal(size=shape) * rng.lognormal(0, 1, (*shape[:-2], 1, 1))
    x.reshape(-1, *shape[-2:])[5] *= 100
    return x.astype(np.float32)


def received(q, name: str = "t") -> dict:
    """What the write step receives for a target: through ``HostCopies`` as the actor sends it."""
    copies = HostCopies(q.codes.device)
    sent = copies.send(q)
    copies.wait()
    return sent.fields(name)


@pytest.mark.parametrize("codec", ["fp16", "bf16", "int8"])
@pytest.mark.parametrize("shape", [(48, 8, 8), (3, 16, 8, 8), (0, 16, 8, 8)])
def test_feature_codes_are_the_reference_codecs_bytes(codec: str, shape: tuple[int, ...]) -> None:
    """Trunks (C, g, g) and per-object maps (N, C, g, g), zero objects included."""
    x = trunk_like(np.random.default_rng(1), shape) if shape[0] else np.zeros(shape, np.float32)
    reference, error = encode_features(x, codec)
    fields = received(quantise_features(torch.from_numpy(x), codec))
    assert bytes(fields["t"]) == reference.data and bytes(fields["t_scale"]) == reference.scale
    assert fields["t_error"] == pytest.approx(error, rel=1e-6, abs=1e-12)
    decoded = decode_features(Encoded(codec, shape, bytes(fields["t"]), bytes(fields["t_scale"])))
    assert np.array_equal(decoded, decode_features(reference))


def test_lowrank_codes_decode_with_the_stored_basis() -> None:
    """Only the matmul's summation order differs from the reference: codes within one step, same error."""
    rng = np.random.default_rng(2)
    x = trunk_like(rng)
    basis = fit_basis(np.stack([x, trunk_like(rng)]), 12)
    reference, error = encode_features(x, "lowrank", basis)
    q = quantise_features(torch.from_numpy(x), "lowrank", DeviceBasis.of(basis, torch.device("cpu")))
    fields = received(q)
    codes, ref_codes = np.frombuffer(bytes(fields["t"]), np.int8), np.frombuffer(reference.data, np.int8)
    assert codes.shape == ref_codes.shape and np.abs(codes.astype(int) - ref_codes).max() <= 1
    decoded = decode_features(Encoded("lowrank", x.shape, bytes(fields["t"]), bytes(fields["t_scale"])), basis)
    assert fields["t_error"] == pytest.approx(error, rel=1e-3)
    assert np.allclose(decoded, dequantise(q, DeviceBasis.of(basis, torch.device("cpu"))).numpy(), atol=1e-5 * np.abs(x).max())


@pytest.mark.parametrize("shape", [(4, 3, 32, 32), (2, 32, 32), (0, 32, 32)])
def test_logit_codes_are_the_reference_codecs_before_its_zstd(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(3)
    x = (rng.normal(0, 8, shape)).astype(np.float32)
    if x.size:
        x.reshape(-1)[:10] = -1024.0  # the tracker's "absent" value: clipped to -16
    reference, error = encode_logits(x)
    fields = received(quantise_logits(torch.from_numpy(x)))
    encoded = Encoded("logit8d", shape, compress_logits(fields["t"], shape), bytes(fields["t_scale"]))
    assert np.array_equal(decode_logits(encoded), decode_logits(reference))
    assert encoded.scale == reference.scale and fields["t_error"] == pytest.approx(error, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("codec", ["fp16", "bf16", "int8", "lowrank"])
def test_dequantise_is_what_a_reader_decodes(codec: str) -> None:
    """The task-level error decodes the trunk on the device: it must be the trunk the store gives back."""
    rng = np.random.default_rng(4)
    x = trunk_like(rng)
    basis = fit_basis(np.stack([x, x * 0.5 + 1]), 12) if codec == "lowrank" else None
    device_basis = DeviceBasis.of(basis, torch.device("cpu")) if basis else None
    q = quantise_features(torch.from_numpy(x), codec, device_basis)
    fields = received(q)
    stored = decode_features(Encoded(codec, x.shape, bytes(fields["t"]), bytes(fields.get("t_scale") or b"")), basis)
    assert np.allclose(dequantise(q, device_basis).numpy(), stored, rtol=1e-6, atol=1e-6 * np.abs(stored).max())


@pytest.mark.parametrize(
    "target, message",
    [
        (lambda x: x.__setitem__((0, 0, 0), float("nan")) or quantise_features(x, "int8"), "features hold NaN or Inf"),
        (lambda x: x.__setitem__((0, 0, 0), float("inf")) or quantise_features(x, "bf16"), "features hold NaN or Inf"),
        (lambda x: x.__setitem__((0, 0, 0), 7e4) or quantise_features(x, "fp16"), "(max |x| = 7e+04) do not fit codec fp16"),
        (lambda x: x.__setitem__((0, 0, 0), float("nan")) or quantise_logits(x), "mask logits hold NaN"),
    ],
)
def test_values_a_codec_cannot_hold_are_refused_when_received(target, message: str) -> None:
    """The actor learns it with the codes (no synchronisation of its own); the write step never sees the row."""
    x = torch.randn(4, 8, 8)
    with pytest.raises(CodecError, match=re.escape(message)):
        received(target(x))


def test_logits_with_infinities_are_clipped_not_refused() -> None:
    x = torch.randn(2, 8, 8)
    x[0, 0, 0] = -float("inf")
    fields = received(quantise_logits(x))
    assert np.frombuffer(bytes(fields["t"]), np.int8)[0] == -127


def test_raw_targets_travel_as_float32_bytes_exactly() -> None:
    x = torch.randn(3, 4, dtype=torch.float64)
    copies = HostCopies(torch.device("cpu"))
    sent = copies.send_raw(x)
    copies.wait()
    assert bytes(sent.fields("iou")["iou"]) == x.float().numpy().tobytes()


def test_the_write_step_refuses_codes_that_do_not_hold_the_shape() -> None:
    """Codes are wrapped, not decoded, on their way to the store: their sizes are checked there (a row fails)."""
    from esam3.workers.write_step import received_tensor

    fields = received(quantise_features(torch.randn(4, 8, 8), "int8"))
    assert received_tensor(fields, "t", "int8", (4, 8, 8))["error"] == fields["t_error"]
    with pytest.raises(CodecError, match=r"t: 256 \+ 16 bytes of int8 codes and scales do not hold \(4, 8, 4\)"):
        received_tensor(fields, "t", "int8", (4, 8, 4))
    logits = received(quantise_logits(torch.randn(2, 8, 8)))
    with pytest.raises(CodecError, match="do not hold"):
        received_tensor(logits, "t", "logit8", (3, 8, 8))
