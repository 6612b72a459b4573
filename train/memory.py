"""The student's memory: an EdgeTAM-style spatial Perceiver that compresses each memory frame, and a light memory attention.

SAM3 keeps, per memory frame, its memory encoder's whole (64, g, g) map (5,184 tokens at g = 72) and lets every
token of the current frame attend to up to 7 such frames plus object pointers in 4 layers. The student keeps:

* :class:`SpatialPerceiver`: ``global_latents`` learned latents that cross-attend to every memory token, and one
  latent per window of a ``window_grid x window_grid`` grid that divides the memory grid (never resized: a window
  is ``g / window_grid`` tokens a side), each attending only to its own window; then self-attention over all latents
  and an MLP, ``depth`` times. Window latents keep their window's centre as their position (used as RoPE keys).
* :class:`StudentMemoryAttention`: ``layers`` layers of self-attention over the current frame's tokens, cross-attention
  to the memory (every kept frame's latents, and the object pointers split into ``memory_dim`` tokens), and an MLP,
  pre-norm; 2D axial rotary positions on the frame's tokens and on the window latents (global latents and pointers
  carry none), a learned embedding per memory slot (the conditioning frame, then 1..6 frames back), and a projected
  sine embedding of each pointer's distance in frames. Its output is the memory-conditioned map SAM3 calls
  ``pix_feat_with_mem`` (hidden, g, g), which the frozen mask decoder reads.

Both are written here for the student (nothing is copied from SAM3's modules); their sizes come from
:class:`esam3.schemas.train.MemoryConfig` and the store's geometry, and :func:`expected_parameters` counts them from
the config alone, which a test checks against the built modules.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from esam3.schemas.train import TrainingInputError


class MemorySpecError(TrainingInputError):
    """Memory sizes that do not fit the teacher's geometry (the message names the flag)."""


@dataclass(frozen=True)
class MemorySpec:
    """Every size of the student memory: the config's choices resolved against the teacher's geometry."""

    grid: int  # g: the memory map's side (the teacher's token grid)
    hidden: int  # width of the frame tokens (the tracker's hidden size: the mask decoder's input)
    memory_dim: int  # width of memory tokens (the memory encoder's output channels)
    memory_frames: int  # spatial memories a frame attends to: the conditioning frame + the most recent others
    max_pointers: int  # object pointers kept (the teacher's max_object_pointers_in_encoder)
    global_latents: int
    window_grid: int  # window latents per side; g % window_grid == 0
    perceiver_depth: int
    perceiver_heads: int
    attention_layers: int
    attention_heads: int
    attention_ffn: int
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.grid % self.window_grid:
            raise MemorySpecError(
                f"--window-grid {self.window_grid} does not divide the memory grid {self.grid}; choose one of {divisors(self.grid)}"
            )
        for name, width, heads in (("perceiver", self.memory_dim, self.perceiver_heads), ("attention", self.hidden, self.attention_heads)):
            if width % heads or (width // heads) % 4:
                raise MemorySpecError(
                    f"--{name.replace('attention', 'memory')}-heads {heads}: the width {width} must split into heads of a multiple of 4 channels"
                )
        if self.hidden % self.memory_dim:
            raise MemorySpecError(f"the tracker's hidden width {self.hidden} is not a multiple of its memory width {self.memory_dim}")

    @property
    def window(self) -> int:
        """Memory tokens per window side."""
        return self.grid // self.window_grid

    @property
    def tokens_per_frame(self) -> int:
        """Memory tokens one frame keeps (SAM3: grid x grid)."""
        return self.global_latents + self.window_grid**2

    @property
    def pointer_tokens(self) -> int:
        """Tokens one object pointer becomes (hidden / memory_dim, as in SAM3)."""
        return self.hidden // self.memory_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MemorySpec:
        return cls(**values)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def default_window_grid(grid: int, window: int = 6) -> int:
    """The window grid giving windows of ``window`` tokens a side (SAM3's 72 -> 12 x 12 windows of 6 x 6), or the
    divisor of ``grid`` whose windows come closest to that when 6 does not divide it."""
    return min(divisors(grid), key=lambda d: (abs(grid / d - window), -d))


# ---- positions ----------------------------------------------------------------------------------------------


def axial_rope(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin (L, head_dim) of 2D axial rotary positions (x, y) (L, 2): the first half of each head's channels
    turns with x, the second with y, in pairs of channels."""
    quarter = head_dim // 4
    inverse = 1.0 / theta ** (torch.arange(quarter, dtype=torch.float32, device=positions.device) / quarter)
    angles = torch.cat([positions[:, :1].float() * inverse, positions[:, 1:].float() * inverse], dim=-1)  # (L, head_dim / 2)
    angles = angles.repeat_interleave(2, dim=-1)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of ``x`` (..., L, d) by the angles behind ``cos`` / ``sin`` (L, d)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    turned = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return (x.float() * cos + turned * sin).to(x.dtype)


def grid_positions(side: int, step: float = 1.0, offset: float = 0.0, device: Any = None) -> torch.Tensor:
    """(side^2, 2) (x, y) of a side x side grid in row-major order: ``offset + index * step``."""
    index = torch.arange(side, dtype=torch.float32, device=device) * step + offset
    y, x = torch.meshgrid(index, index, indexing="ij")
    return torch.stack([x.flatten(), y.flatten()], dim=-1)


def sine_embedding(values: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(N,) -> (N, dim) sine / cosine embedding of scalar positions."""
    half = dim // 2
    frequencies = temperature ** (torch.arange(half, dtype=torch.float32, device=values.device) / half)
    angles = values.float()[:, None] / frequencies
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


# ---- building blocks ----------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head attention with separate query / key widths, optional rotary positions on the query and on the
    first keys (the rest, e.g. global latents and pointers, carry none)."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None) -> None:
        super().__init__()
        kv_dim = dim if kv_dim is None else kv_dim
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(kv_dim, dim)
        self.v = nn.Linear(kv_dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        query_rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        def split(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, heads, L, head_dim)

        q, k, v = split(self.q(query)), split(self.k(key)), split(self.v(value))
        if query_rope is not None:
            q = rotate(q, *query_rope)
        if key_rope is not None:
            turned = key_rope[0].shape[0]
            k = torch.cat([rotate(k[:, :, :turned], *key_rope), k[:, :, turned:]], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out(out.transpose(1, 2).flatten(-2))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class PerceiverLayer(nn.Module):
    """Global latents read every token, window latents their window; then all latents talk; then an MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm_tokens = nn.LayerNorm(dim)
        self.norm_global = nn.LayerNorm(dim)
        self.read_global = Attention(dim, heads)
        self.norm_window = nn.LayerNorm(dim)
        self.read_window = Attention(dim, heads)
        self.norm_self = nn.LayerNorm(dim)
        self.self_attention = Attention(dim, heads)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = MLP(dim, 4 * dim)

    def forward(self, latents: torch.Tensor, tokens: torch.Tensor, side: int, window: int, n_global: int) -> torch.Tensor:
        """``latents`` (B, G + W, d); ``tokens`` (B, g*g, d), normalised here and read whole and by window."""
        tokens = self.norm_tokens(tokens)
        windows = by_window(tokens, side, window)
        batch = latents.shape[0]
        glob, win = latents[:, :n_global], latents[:, n_global:]
        if n_global:
            q = self.norm_global(glob)
            glob = glob + self.read_global(q, tokens, tokens)
        q = self.norm_window(win).reshape(-1, 1, win.shape[-1])  # one query per window
        win = win + self.read_window(q, windows, windows).reshape(batch, -1, win.shape[-1])
        latents = torch.cat([glob, win], dim=1)
        q = self.norm_self(latents)
        latents = latents + self.self_attention(q, q, q)
        return latents + self.mlp(self.norm_mlp(latents))


def by_window(tokens: torch.Tensor, side: int, window: int) -> torch.Tensor:
    """(B, g*g, d) row-major tokens -> (B * side^2, window^2, d): window (i, j) of each row holds the tokens of rows
    i*window .. (i+1)*window - 1 and columns j*window .. (j+1)*window - 1, windows in row-major order."""
    batch, _, d = tokens.shape
    blocks = tokens.reshape(batch, side, window, side, window, d).permute(0, 1, 3, 2, 4, 5)
    return blocks.reshape(batch * side * side, window * window, d)


class SpatialPerceiver(nn.Module):
    """(B, memory_dim, g, g) memory + its position encoding -> (B, global_latents + window_grid^2, memory_dim) tokens."""

    def __init__(self, spec: MemorySpec) -> None:
        super().__init__()
        self.spec = spec
        d = spec.memory_dim
        self.global_latents = nn.Parameter(torch.randn(spec.global_latents, d) * 0.02)
        self.window_latents = nn.Parameter(torch.randn(spec.window_grid**2, d) * 0.02)
        self.layers = nn.ModuleList([PerceiverLayer(d, spec.perceiver_heads) for _ in range(spec.perceiver_depth)])
        self.norm = nn.LayerNorm(d)

    def forward(self, memory: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        batch, d, g, _ = memory.shape
        w, side = self.spec.window, self.spec.window_grid
        tokens = (memory + position).flatten(2).transpose(1, 2)  # (B, g*g, d)
        latents = torch.cat([self.global_latents, self.window_latents]).expand(batch, -1, -1)
        for layer in self.layers:
            latents = layer(latents, tokens, side, w, self.spec.global_latents)
        return self.norm(latents)

    def window_positions(self, device: Any = None) -> torch.Tensor:
        """(window_grid^2, 2) centres of the windows in memory-token coordinates (what the frame's tokens use)."""
        w = self.spec.window
        return grid_positions(self.spec.window_grid, step=w, offset=(w - 1) / 2, device=device)


class MemoryAttentionLayer(nn.Module):
    def __init__(self, spec: MemorySpec) -> None:
        super().__init__()
        d = spec.hidden
        self.norm_self = nn.LayerNorm(d)
        self.self_attention = Attention(d, spec.attention_heads)
        self.norm_cross = nn.LayerNorm(d)
        self.cross_attention = Attention(d, spec.attention_heads, kv_dim=spec.memory_dim)
        self.norm_mlp = nn.LayerNorm(d)
        self.mlp = MLP(d, spec.attention_ffn)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        memory_position: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        memory_rope: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        q = self.norm_self(x)
        x = x + self.self_attention(q, q, q, rope, rope)
        q = self.norm_cross(x)
        x = x + self.cross_attention(q, memory + memory_position, memory, rope, memory_rope)
        return x + self.mlp(self.norm_mlp(x))


@dataclass
class MemoryBank:
    """What one frame of B tracks attends to, built by :meth:`StudentMemory.bank`."""

    tokens: torch.Tensor  # (B, M, memory_dim): window latents of every frame first (rotated), then the rest
    positions: torch.Tensor  # (B, M, memory_dim) additive: slot and pointer-distance embeddings
    rotated_positions: torch.Tensor  # (R, 2) (x, y) of the first R tokens (the window latents)


class StudentMemory(nn.Module):
    """The Perceiver + the memory attention + the small embeddings they need: everything stage 2 trains."""

    def __init__(self, spec: MemorySpec) -> None:
        super().__init__()
        self.spec = spec
        self.perceiver = SpatialPerceiver(spec)
        self.layers = nn.ModuleList([MemoryAttentionLayer(spec) for _ in range(spec.attention_layers)])
        self.norm = nn.LayerNorm(spec.hidden)
        # slot 0: a conditioning frame; slot k: k frames back (1 .. memory_frames - 1)
        self.slot_embedding = nn.Parameter(torch.zeros(spec.memory_frames, spec.memory_dim))
        self.pointer_projection = nn.Linear(spec.hidden, spec.memory_dim)

    @staticmethod
    def no_weight_decay() -> tuple[str, ...]:
        """Learned latents and embeddings: weight decay would pull them to zero (parameter names in this module)."""
        return ("perceiver.global_latents", "perceiver.window_latents", "slot_embedding")

    def compress(self, memory: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """One memory frame per row: (B, memory_dim, g, g) -> (B, tokens_per_frame, memory_dim)."""
        return self.perceiver(memory, position)

    def bank(self, frames: list[tuple[int, torch.Tensor]], pointers: list[tuple[int, torch.Tensor]]) -> MemoryBank:
        """``frames``: (slot, compressed memory (B, T, d)) with slot 0 for a conditioning frame and k for k frames back;
        ``pointers``: (frames back, object pointer (B, hidden)), 0 for a conditioning frame's."""
        spec = self.spec
        n_global = spec.global_latents
        if not frames:
            raise ValueError("a memory bank needs at least one memory frame (the conditioning frame)")
        windows, rest, window_positions, rest_positions = [], [], [], []
        centres = self.perceiver.window_positions(frames[0][1].device)
        for slot, latents in frames:
            embedding = self.slot_embedding[slot].expand(latents.shape[0], latents.shape[1], -1)
            windows.append(latents[:, n_global:])
            window_positions.append(embedding[:, n_global:])
            rest.append(latents[:, :n_global])
            rest_positions.append(embedding[:, :n_global])
        if pointers:
            distance = torch.tensor([d for d, _ in pointers], device=centres.device, dtype=torch.float32)
            sine = sine_embedding(distance / max(1, spec.max_pointers - 1), spec.hidden)  # (P, hidden)
            embedding = self.pointer_projection(sine.to(self.pointer_projection.weight.dtype))  # (P, memory_dim)
            stacked = torch.stack([p for _, p in pointers], dim=1)  # (B, P, hidden)
            batch, count = stacked.shape[:2]
            rest.append(stacked.reshape(batch, count * spec.pointer_tokens, spec.memory_dim))
            rest_positions.append(embedding.repeat_interleave(spec.pointer_tokens, dim=0).expand(batch, -1, -1))
        return MemoryBank(
            tokens=torch.cat(windows + rest, dim=1),
            positions=torch.cat(window_positions + rest_positions, dim=1),
            rotated_positions=centres.repeat(len(frames), 1),
        )

    def forward(self, frame: torch.Tensor, frame_position: torch.Tensor, bank: MemoryBank) -> torch.Tensor:
        """The current frame's top-level features (B, hidden, g, g) and their position encoding, conditioned on the
        bank -> (B, hidden, g, g): the student's ``pix_feat_with_mem``."""
        batch, hidden, g, _ = frame.shape
        x = (frame + 0.1 * frame_position).flatten(2).transpose(1, 2)  # (B, g*g, hidden), as SAM3 mixes position in
        head_dim = hidden // self.spec.attention_heads
        rope = axial_rope(grid_positions(g, device=frame.device), head_dim, self.spec.rope_theta)
        memory_rope = axial_rope(bank.rotated_positions, head_dim, self.spec.rope_theta)
        for layer in self.layers:
            x = layer(x, bank.tokens, bank.positions, rope, memory_rope)
        return self.norm(x).transpose(1, 2).reshape(batch, hidden, g, g)


# ---- counts -------------------------------------------------------------------------------------------------


def expected_parameters(spec: MemorySpec) -> dict[str, int]:
    """Parameters of each part, counted from the spec alone (a test holds the built modules to these numbers)."""

    def linear(i: int, o: int) -> int:
        return i * o + o

    def norm(d: int) -> int:
        return 2 * d

    def attention(d: int, kv: int) -> int:
        return linear(d, d) + 2 * linear(kv, d) + linear(d, d)

    d = spec.memory_dim
    perceiver_layer = norm(d) * 5 + 3 * attention(d, d) + linear(d, 4 * d) + linear(4 * d, d)
    perceiver = (spec.global_latents + spec.window_grid**2) * d + spec.perceiver_depth * perceiver_layer + norm(d)
    h = spec.hidden
    attention_layer = 3 * norm(h) + attention(h, h) + attention(h, d) + linear(h, spec.attention_ffn) + linear(spec.attention_ffn, h)
    memory_attention = spec.attention_layers * attention_layer + norm(h)
    embeddings = spec.memory_frames * d + linear(h, d)
    return {
        "perceiver": perceiver,
        "memory_attention": memory_attention,
        "embeddings": embeddings,
        "total": perceiver + memory_attention + embeddings,
    }


def attention_cost(spec: MemorySpec, pointers: int | None = None) -> dict[str, float]:
    """Memory tokens one frame attends to and the multiply-adds of its memory attention's cross-attention, for the
    student and for SAM3's dense memory (the same frames and pointers, each frame's g x g map kept whole). The
    self-attention and MLP over the frame's own tokens cost the same per layer in both and are counted apart."""
    pointers = spec.max_pointers if pointers is None else pointers
    queries, h = spec.grid**2, spec.hidden
    pointer_tokens = pointers * spec.pointer_tokens

    def cross(keys: int) -> float:  # q, k, v, out projections + scores + weighted sum
        return queries * h * h * 2 + keys * spec.memory_dim * h * 2 + 2 * queries * keys * h

    student_keys = spec.memory_frames * spec.tokens_per_frame + pointer_tokens
    dense_keys = spec.memory_frames * queries + pointer_tokens
    return {
        "tokens_per_frame": spec.tokens_per_frame,
        "dense_tokens_per_frame": queries,
        "memory_keys": student_keys,
        "dense_memory_keys": dense_keys,
        "cross_attention_macs": cross(student_keys),
        "dense_cross_attention_macs": cross(dense_keys),
        "self_attention_macs": 4 * queries * h * h + 2 * queries * queries * h,
    }


def describe(spec: MemorySpec) -> str:
    counts = expected_parameters(spec)
    return (
        f"memory: Perceiver {spec.global_latents} global + {spec.window_grid}x{spec.window_grid} window latents "
        f"({spec.window}x{spec.window} tokens each), depth {spec.perceiver_depth}: {spec.tokens_per_frame} tokens per "
        f"memory frame (SAM3: {spec.grid**2}); memory attention {spec.attention_layers} layers; "
        f"{counts['total'] / 1e6:.2f}M parameters ({counts['perceiver'] / 1e6:.2f}M Perceiver, "
        f"{counts['memory_attention'] / 1e6:.2f}M attention)"
    )
