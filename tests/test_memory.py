"""The student memory (stage 2): Perceiver windows, rotary positions, parameter counts and costs from the config."""

from __future__ import annotations

import pytest
import torch

from esam3.train.memory import (
    MemorySpec,
    StudentMemory,
    attention_cost,
    axial_rope,
    by_window,
    default_window_grid,
    describe,
    expected_parameters,
    rotate,
)


def spec(**overrides: object) -> MemorySpec:
    values = dict(
        grid=8,
        hidden=128,
        memory_dim=64,
        memory_frames=7,
        max_pointers=16,
        global_latents=4,
        window_grid=2,
        perceiver_depth=2,
        perceiver_heads=1,
        attention_layers=2,
        attention_heads=1,
        attention_ffn=256,
    )
    values.update(overrides)
    return MemorySpec(**values)  # type: ignore[arg-type]


SAM3 = dict(grid=72, hidden=256, memory_dim=64, global_latents=256, window_grid=12, attention_ffn=2048)


@pytest.mark.parametrize("overrides", [{}, {"perceiver_depth": 1, "attention_layers": 3, "attention_heads": 2}, SAM3])
def test_parameter_count_follows_the_config(overrides: dict) -> None:
    """The public stage-2 branch silently builds another Perceiver than it documents; here the count is derived from
    the config alone and must equal the built modules'."""
    s = spec(**overrides)
    memory = StudentMemory(s)
    counts = expected_parameters(s)
    assert sum(p.numel() for p in memory.perceiver.parameters()) == counts["perceiver"]
    assert (
        sum(p.numel() for p in memory.layers.parameters()) + sum(p.numel() for p in memory.norm.parameters()) == counts["memory_attention"]
    )
    assert sum(p.numel() for p in memory.parameters()) == counts["total"]
    assert f"{s.tokens_per_frame} tokens per memory frame (SAM3: {s.grid**2})" in describe(s)


def test_window_grid_must_divide_the_memory_grid() -> None:
    assert default_window_grid(72) == 12 and default_window_grid(64) == 16 and default_window_grid(8) == 2
    with pytest.raises(ValueError, match=r"--window-grid 5 does not divide the memory grid 72; choose one of \[1, 2, 3, 4, 6, 8, 9, 12"):
        spec(grid=72, window_grid=5)
    with pytest.raises(ValueError, match="--perceiver-heads 3"):
        spec(perceiver_heads=3)


def test_windows_hold_exactly_their_block_of_tokens() -> None:
    g, side = 6, 3
    index = torch.arange(g * g, dtype=torch.float32).reshape(1, g * g, 1)
    windows = by_window(index, side, g // side).reshape(side, side, 4)
    for i in range(side):
        for j in range(side):
            rows, cols = range(2 * i, 2 * i + 2), range(2 * j, 2 * j + 2)
            assert sorted(windows[i, j].tolist()) == sorted(float(r * g + c) for r in rows for c in cols)


def test_rotary_scores_depend_only_on_the_offset() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)

    def score(p: tuple[float, float], r: tuple[float, float]) -> float:
        qp, kp = axial_rope(torch.tensor([p]), 32, 100.0), axial_rope(torch.tensor([r]), 32, 100.0)
        return float((rotate(q, *qp) * rotate(k, *kp)).sum())

    assert score((1, 2), (3, 5)) == pytest.approx(score((11, -4), (13, -1)), rel=1e-5)
    assert score((1, 2), (3, 5)) != pytest.approx(score((1, 2), (4, 5)), rel=1e-3)


def test_a_window_latent_reads_only_its_window() -> None:
    """With no global latents, one layer and the self-attention's output projection at zero, a change inside one
    window moves that window's latent only."""
    s = spec(global_latents=0, perceiver_depth=1)
    memory = StudentMemory(s).eval()
    layer = memory.perceiver.layers[0]
    for module in (layer.self_attention.out, layer.mlp.fc2):
        torch.nn.init.zeros_(module.weight)
        torch.nn.init.zeros_(module.bias)
    torch.manual_seed(1)
    x, position = torch.randn(1, 64, 8, 8), torch.zeros(1, 64, 8, 8)
    y = x.clone()
    y[0, :, 5, 1] += 3.0 * torch.randn(64)  # row 5, column 1: window (1, 0) of the 2 x 2 grid of 4 x 4 windows
    with torch.no_grad():
        a, b = memory.compress(x, position), memory.compress(y, position)
    moved = (a - b).abs().amax(dim=-1)[0] > 1e-6
    assert moved.tolist() == [False, False, True, False]


def test_memory_attention_conditions_the_frame_on_frames_and_pointers() -> None:
    s = spec()
    memory = StudentMemory(s)
    torch.manual_seed(2)
    frame, position = torch.randn(3, 128, 8, 8), torch.randn(3, 128, 8, 8)
    latents = [memory.compress(torch.randn(3, 64, 8, 8), torch.randn(3, 64, 8, 8)) for _ in range(2)]
    assert latents[0].shape == (3, s.tokens_per_frame, 64)
    bank = memory.bank([(0, latents[0]), (1, latents[1])], [(0, torch.randn(3, 128)), (1, torch.randn(3, 128))])
    assert bank.tokens.shape == (3, 2 * s.tokens_per_frame + 2 * s.pointer_tokens, 64)
    assert bank.rotated_positions.shape == (2 * s.window_grid**2, 2)
    out = memory(frame, position, bank)
    assert out.shape == frame.shape
    out.square().mean().backward()
    assert all(p.grad is not None for name, p in memory.named_parameters()), "every part must get a gradient"
    with pytest.raises(ValueError, match="at least one memory frame"):
        memory.bank([], [])


def test_full_size_memory_is_a_fraction_of_sam3s() -> None:
    cost = attention_cost(spec(**SAM3))
    assert cost["tokens_per_frame"] == 256 + 144 and cost["dense_tokens_per_frame"] == 5184
    assert cost["memory_keys"] == 7 * 400 + 16 * 4 and cost["dense_memory_keys"] == 7 * 5184 + 16 * 4
    assert cost["dense_cross_attention_macs"] / cost["cross_attention_macs"] > 8
