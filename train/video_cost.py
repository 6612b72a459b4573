"""What one tracked frame costs, part by part: the stage-2 student and SAM3's tracker at the same input size.

A tracked frame (one object, ``memory_frames`` spatial memories and ``max_pointers`` object pointers, as SAM3
selects them) = image encoder -> tracker neck -> memory attention -> mask decoder -> memory encoder (+ the student's
Perceiver compressing the new memory once). SAM3's parts run on random weights at the teacher's geometry; the
neck, decoder and memory encoder are the same frozen modules in both and are timed once. Used by
``benchmarks/video_student.py`` and ``esam3 predict --video --vs-sam3``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from esam3.train.memory import MemorySpec, StudentMemory
from esam3.workers.heads import TeacherHeads
from esam3.workers.preprocess import normalize


def timed(run: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median milliseconds of ``run`` over ``repeats`` runs after ``warmup`` untimed ones (CUDA work waited for)."""

    def once() -> None:
        run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    for _ in range(warmup):
        once()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        once()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


class FrameCost:
    """Inputs of one tracked frame at ``heads``' geometry, and the timing of each part on them."""

    def __init__(self, heads: TeacherHeads, spec: MemorySpec, repeats: int, device: torch.device | str = "cpu") -> None:
        g = heads.geometry
        self.heads, self.spec, self.repeats, self.device = heads.to(device), spec, repeats, torch.device(device)
        self.pixels = torch.randint(0, 256, (1, 3, g.image_size, g.image_size), dtype=torch.uint8, device=device)
        self.trunk = torch.randn(1, g.trunk_width, g.grid, g.grid, device=device)
        self.feats, self.positions = heads.tracker_features(self.trunk)

    @torch.no_grad()
    def shared(self) -> dict[str, float]:
        """The frozen parts both trackers run: neck, mask decoder, memory encoder."""
        heads, g = self.heads, self.heads.geometry
        embeddings = heads.image_embeddings(self.trunk)
        high_res = torch.zeros(1, 1, g.image_size, g.image_size, device=self.device)
        tracker = heads.tracker_model
        return {
            "neck": timed(lambda: heads.tracker_features(self.trunk), self.repeats),
            "mask_decoder": timed(lambda: heads.decode_each(embeddings, None, None, True), self.repeats),
            "memory_encoder": timed(
                lambda: tracker._encode_new_memory(self.feats[-1], high_res, torch.ones(1, 1, 1, device=self.device), False), self.repeats
            ),
        }

    @torch.no_grad()
    def sam3(self, config: Any, trunk_repeats: int | None = 1) -> dict[str, float]:
        """SAM3's own parts: its dense memory attention over whole memory maps, and (``trunk_repeats``) its ViT trunk."""
        g, spec = self.heads.geometry, self.spec
        pointers = spec.max_pointers * spec.pointer_tokens
        dense = torch.randn(spec.memory_frames * g.grid**2 + pointers, 1, g.memory_channels, device=self.device)
        attention = self.heads.tracker_model.memory_attention
        parts = {
            "memory_attention": timed(
                lambda: attention(
                    current_vision_features=self.feats[-1],
                    memory=dense,
                    current_vision_position_embeddings=self.positions[-1],
                    memory_posision_embeddings=torch.randn_like(dense),
                    num_object_pointer_tokens=pointers,
                ),
                self.repeats,
            )
        }
        if trunk_repeats:
            from transformers.models.sam3.modeling_sam3 import Sam3ViTModel

            vit = Sam3ViTModel(config.detector_config.vision_config.backbone_config).eval().to(self.device)
            parts["trunk"] = timed(lambda: vit(normalize(self.pixels)), trunk_repeats, warmup=0)
        return parts

    @torch.no_grad()
    def student(self, encoder: torch.nn.Module, memory: StudentMemory) -> dict[str, float]:
        """The student's own parts: its encoder, its memory attention over Perceiver tokens, the Perceiver."""
        g, spec, device = self.heads.geometry, self.spec, self.device
        position = torch.randn(1, g.memory_channels, g.grid, g.grid, device=device)
        latents = memory.compress(torch.randn(1, g.memory_channels, g.grid, g.grid, device=device), position)
        bank = memory.bank(
            [(k, latents) for k in range(spec.memory_frames)],
            [(k, torch.randn(1, g.hidden, device=device)) for k in range(spec.max_pointers)],
        )
        top = self.feats[-1].permute(1, 2, 0).reshape(1, g.hidden, g.grid, g.grid)
        top_position = self.positions[-1].permute(1, 2, 0).reshape(1, g.hidden, g.grid, g.grid)
        size = encoder.spec.image_size
        pixels = self.pixels if size == g.image_size else torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8, device=device)
        return {
            "encoder": timed(lambda: encoder(pixels), self.repeats),
            "memory_attention": timed(lambda: memory(top, top_position, bank), self.repeats),
            "perceiver": timed(
                lambda: memory.compress(torch.randn(1, g.memory_channels, g.grid, g.grid, device=device), position), self.repeats
            ),
        }


def sam3_frame_ms(config: Any, spec: MemorySpec, repeats: int = 1, device: torch.device | str = "cpu") -> float:
    """SAM3's tracker for one object on one tracked frame (trunk included) at ``config``'s geometry, random weights."""
    torch.manual_seed(0)
    heads = TeacherHeads.build(config, detector=False)
    cost = FrameCost(heads, spec, repeats, device)
    return sum(cost.shared().values()) + sum(cost.sam3(config, trunk_repeats=repeats).values())
