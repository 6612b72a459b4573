"""Teacher targets quantised where the teacher made them (on its GPU when it has one), and sent to the host.

The teacher actor used to send float32 targets through Ray's object store (about 42 MB per image with K=16
prompts), copied one blocking, pageable transfer per tensor, and the CPU encode step quantised them. Now the actor
quantises on its device with the store's codecs (``esam3.schemas.codecs``) and sends codes + scales + the error it
measured: 4x fewer bytes (int8, logit8) or 2x (fp16, bf16). ``schemas.codecs`` stays the reference: on the same
float32 input these give the same codes byte for byte (int8 / logit8 / fp16 / bf16; lowrank up to the matmul's
summation order), so its decoders read them (``tests/test_device_codecs.py``).

``HostCopies`` moves the codes: on CUDA each tensor is copied by a side stream into pinned memory as soon as the
kernels that make it are queued, so the copy runs while the device computes what comes next (the next image's
prompts, the next video frame); the caller waits once per block. On CPU the tensors are the host memory already.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from esam3.schemas.codecs import LOGIT_LIMIT, Basis, CodecError, FeatureCodec


@dataclass(frozen=True)
class DeviceBasis:
    """The store's low-rank basis on the teacher's device."""

    mean: torch.Tensor  # (C,)
    components: torch.Tensor  # (C, r)

    @classmethod
    def of(cls, basis: Basis, device: torch.device) -> DeviceBasis:
        return cls(torch.from_numpy(basis.mean).to(device), torch.from_numpy(basis.components).to(device))


@dataclass(frozen=True)
class Quantised:
    """One target encoded on its device: ``codes`` (int8, or the int16 bits of fp16 / bf16), one fp32 ``scale``
    per map or component (None for casts), and ``meta`` (float64: relative RMS error, 1 if the input held values
    the codec refuses, max |x| for fp16's overflow message)."""

    codec: str
    shape: tuple[int, ...]
    codes: torch.Tensor
    scale: torch.Tensor | None
    meta: torch.Tensor


def quantise_features(x: torch.Tensor, codec: FeatureCodec | str, basis: DeviceBasis | None = None) -> Quantised:
    """A (C, ...) feature map (one per-map scale for (C, H, W) and (N, C, H, W)) as ``schemas.codecs.encode_features``
    encodes it."""
    codec = FeatureCodec(codec)
    x = x.detach().float().contiguous()
    shape = tuple(x.shape)
    scale = None
    if codec in (FeatureCodec.FP16, FeatureCodec.BF16):
        codes = x.to(torch.float16 if codec == FeatureCodec.FP16 else torch.bfloat16)
        residual = codes.float().sub_(x)
    elif codec == FeatureCodec.INT8:
        maps = _as_maps(x)
        codes, scale, residual = _int8_rows(maps)
    else:
        if basis is None:
            raise CodecError("the lowrank codec needs the store's basis")
        channels = shape[0]
        if basis.components.shape[0] != channels:
            raise CodecError(f"basis has {basis.components.shape[0]} channels, features have {channels}")
        columns = x.reshape(channels, -1)
        codes, scale, _ = _int8_rows(basis.components.T @ (columns - basis.mean[:, None]))
        residual = torch.addmm(basis.mean[:, None], basis.components, codes.float() * scale[:, None]).sub_(columns)
    peak = x.abs().amax() if codec == FeatureCodec.FP16 and x.numel() else x.new_zeros(())
    meta = torch.stack([_relative(residual, x), _refused(x), peak.double()])
    if codes.dtype != torch.int8:
        codes = codes.view(torch.int16)  # the 16-bit pattern: numpy and Arrow know no bfloat16
    return Quantised(codec.value, shape, codes, scale, meta)


def quantise_logits(x: torch.Tensor) -> Quantised:
    """Mask logits (..., H, W) as ``schemas.codecs.encode_logits`` quantises them (before its zstd, which the CPU
    encode step applies): clipped to +-16, int8 per map."""
    x = x.detach().float()
    shape = tuple(x.shape)
    clipped = x.clamp(-LOGIT_LIMIT, LOGIT_LIMIT).reshape(-1, shape[-2] * shape[-1])
    codes, scale, residual = _int8_rows(clipped)
    error = _relative(residual, clipped)
    meta = torch.stack([error, _refused(clipped), error.new_zeros(())])
    return Quantised("logit8", shape, codes, scale, meta)


def dequantise(q: Quantised, basis: DeviceBasis | None = None) -> torch.Tensor:
    """The float32 tensor a reader decodes from ``q``, computed on ``q``'s device (the task-level error uses it)."""
    if q.codec in (FeatureCodec.FP16.value, FeatureCodec.BF16.value):
        dtype = torch.float16 if q.codec == FeatureCodec.FP16.value else torch.bfloat16
        return q.codes.view(dtype).float()
    rows = q.codes.float() * q.scale[:, None]
    if q.codec == FeatureCodec.LOWRANK.value:
        if basis is None:
            raise CodecError("the lowrank codec needs the store's basis")
        rows = basis.components @ rows + basis.mean[:, None]
    return rows.reshape(q.shape)


def _refused(x: torch.Tensor) -> torch.Tensor:
    """1.0 (float64, on x's device) when x holds NaN or Inf: its max or min is then not finite (both propagate
    NaN). Two reductions without temporaries, no synchronisation."""
    if not x.numel():
        return x.new_zeros((), dtype=torch.float64)
    return (~torch.isfinite(torch.stack([x.amax(), x.amin()])).all()).double()


def _as_maps(x: torch.Tensor) -> torch.Tensor:
    """One row per 2-D map (``schemas.codecs._maps``): per channel of (C, H, W), per object and channel of (N, C, H, W)."""
    if x.dim() < 3:
        return x.reshape(x.shape[0] if x.dim() else 1, -1)
    return x.reshape(-1, x.shape[-2] * x.shape[-1])


def _int8_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one fp32 scale per row (``absmax / 127``, round half to even, clip +-127), and the
    residual ``dequantised - rows``, made in the buffer the codes were rounded in: one temporary, not three (on a
    CPU each fresh 21 MB buffer costs more than the arithmetic)."""
    if rows.shape[1]:
        absmax = torch.maximum(rows.amax(dim=1), -rows.amin(dim=1))  # no |rows| copy
    else:
        absmax = rows.new_zeros(rows.shape[0])
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    work = rows / scale[:, None]
    work.round_().clamp_(-127, 127)
    codes = work.to(torch.int8)
    return codes, scale, work.mul_(scale[:, None]).sub_(rows)


def _relative(residual: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """``||residual|| / ||original||`` as a float64 0-d tensor (0 when both are zero; NaN or Inf when the original
    holds NaN or Inf). Norms accumulated in float32 by torch's reductions, without temporaries (features beyond
    ~1e19, whose squares overflow float32, read as not finite and are refused)."""
    norm = torch.linalg.vector_norm(original).double()
    diff = torch.linalg.vector_norm(residual).double()
    return torch.where(norm > 0, diff / norm, torch.where(diff > 0, torch.inf, 0.0))


@dataclass
class Sent:
    """A target on its way to the host: host tensors, readable once ``HostCopies.wait`` returned."""

    codec: str
    shape: tuple[int, ...]
    codes: torch.Tensor
    scale: torch.Tensor | None
    meta: torch.Tensor | None

    def fields(self, name: str) -> dict[str, Any]:
        """TARGETS fields of this target: ``name`` (codes), ``name_scale`` and ``name_error``; raw targets give
        ``name`` only. Raises CodecError for values the codec refuses (the row fails, the shard goes on)."""
        if self.meta is None:
            return {name: host_bytes(self.codes)}
        error, refused, peak = self.meta.tolist()
        if refused:
            what = "mask logits hold NaN" if self.codec == "logit8" else "features hold NaN or Inf"
            raise CodecError(f"{what}; refusing to store them")
        if not np.isfinite(error):  # fp16 overflows to Inf above 65504
            raise CodecError(f"features (max |x| = {peak:.4g}) do not fit codec {self.codec}; use bf16 or int8")
        scale = b"" if self.scale is None else host_bytes(self.scale)
        return {name: host_bytes(self.codes), f"{name}_scale": scale, f"{name}_error": error}


class HostCopies:
    """Targets to host memory. CUDA: a side stream copies each into pinned memory (torch's caching host allocator
    reuses the blocks) once the kernels making it are queued, overlapping the compute queued after it; ``wait``
    synchronises once. CPU: the tensors themselves, no copy."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def send(self, q: Quantised) -> Sent:
        return Sent(q.codec, q.shape, self._copy(q.codes), None if q.scale is None else self._copy(q.scale), self._copy(q.meta))

    def send_raw(self, tensor: torch.Tensor) -> Sent:
        """A small target sent as float32, exactly."""
        return Sent("raw", tuple(tensor.shape), self._copy(tensor.detach().float()), None, None)

    def _copy(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        if self.stream is None or tensor.device.type != "cuda":
            return tensor
        self.stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(self.stream):
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor, non_blocking=True)
        tensor.record_stream(self.stream)  # its memory is not reused before the copy has read it
        return host

    def wait(self) -> None:
        """Every target sent so far is in host memory."""
        if self.stream is not None:
            self.stream.synchronize()


def host_bytes(tensor: torch.Tensor) -> memoryview:
    """A host tensor's bytes, without a copy (Arrow copies them once into the block the actor sends)."""
    return memoryview(tensor.numpy().reshape(-1).view(np.uint8))
