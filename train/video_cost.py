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
    """Median milliseconds of ``run`` over ``repeats`` runs after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


class FrameCost:
    """Inputs of one tracked frame at ``heads``' geometry, and the timing of each part on them."""

    def __init__(self, heads: TeacherHeads, spec: MemorySpec, repeats: int) -> None:
        g = heads.geometry
        self.heads, self.spec, self.repeats = heads, spec, repeats
        self.pixels = torch.randint(0, 256, (1, 3, g.image_size, g.image_size), dtype=torch.uint8)
        self.trunk = torch.randn(1, g.trunk_width, g.grid, g.grid)
        self.feats, self.positions = heads.tracker_features(self.trunk)

    @torch.no_grad()
    def shared(self) -> dict[str, float]:
        """The frozen parts both trackers run: neck, mask decoder, memory encoder."""
        heads, g = self.heads, self.heads.geometry
        embeddings = heads.image_embeddings(self.trunk)
        high_res = torch.zeros(1, 1, g.image_size, g.image_size)
        tracker = heads.tracker_model
        return {
            "neck": timed(lambda: heads.tracker_features(self.trunk), self.repeats),
            "mask_decoder": timed(lambda: heads.decode_each(embeddings, None, None, True), self.repeats),
            "memory_encoder": timed(lambda: tracker._encode_new_memory(self.feats[-1], high_res, torch.ones(1, 1, 1), False), self.repeats),
        }

    @torch.no_grad()
    def sam3(self, config: Any, trunk_repeats: int | None = 1) -> dict[str, float]:
        """SAM3's own parts: its dense memory attention over whole memory maps, and (``trunk_repeats``) its ViT trunk."""
        g, spec = self.heads.geometry, self.spec
        pointers = spec.max_pointers * spec.pointer_tokens
        dense = torch.randn(spec.memory_frames * g.grid**2 + pointers, 1, g.memory_channels)
        attention = self.heads.tracker_model.memory_attention
        parts = {"memory_attention": timed(lambda: attention(
            current_vision_features=self.feats[-1], memory=dense, current_vision_position_embeddings=self.positions[-1],
            memory_posision_embeddings=torch.randn_like(dense), num_object_pointer_tokens=pointers), self.repeats)}
        if trunk_repeats:
            from transformers.models.sam3.modeling_sam3 import Sam3ViTModel

            vit = Sam3ViTModel(config.detector_config.vision_config.backbone_config).eval()
            parts["trunk"] = timed(lambda: vit(normalize(self.pixels)), trunk_repeats, warmup=0)
        return parts

    @torch.no_grad()
    def student(self, encoder: torch.nn.Module, memory: StudentMemory) -> dict[str, float]:
        """The student's own parts: its encoder, its memory attention over Perceiver tokens, the Perceiver."""
        g, spec = self.heads.geometry, self.spec
        position = torch.randn(1, g.memory_channels, g.grid, g.grid)
        latents = memory.compress(torch.randn(1, g.memory_channels, g.grid, g.grid), position)
        bank = memory.bank([(k, latents) for k in range(spec.memory_frames)], [(k, torch.randn(1, g.hidden)) for k in range(spec.max_pointers)])
        top = self.feats[-1].permute(1, 2, 0).reshape(1, g.hidden, g.grid, g.grid)
        top_position = self.positions[-1].permute(1, 2, 0).reshape(1, g.hidden, g.grid, g.grid)
        pixels = self.pixels if encoder.spec.image_size == g.image_size else torch.randint(0, 256, (1, 3, encoder.spec.image_size, encoder.spec.image_size), dtype=torch.uint8)
        return {
            "encoder": timed(lambda: encoder(pixels), self.repeats),
            "memory_attention": timed(lambda: memory(top, top_position, bank), self.repeats),
            "perceiver": timed(lambda: memory.compress(torch.randn(1, g.memory_channels, g.grid, g.grid), position), self.repeats),
        }


def sam3_frame_ms(config: Any, spec: MemorySpec, repeats: int = 1) -> float:
    """SAM3's tracker per tracked frame (trunk included) at ``config``'s geometry, random weights, this device (CPU)."""
    torch.manual_seed(0)
    heads = TeacherHeads.build(config, detector=False)
    cost = FrameCost(heads, spec, repeats)
    return sum(cost.shared().values()) + sum(cost.sam3(config, trunk_repeats=repeats).values())
