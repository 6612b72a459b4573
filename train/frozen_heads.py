"""The store's heads file as frozen modules for a trainer: the only part of the teacher a student ever runs."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from esam3.pipeline.store import Store
from esam3.schemas.store import HEADS_DIR, StoreError
from esam3.workers.heads import HEADS_CONFIG, HEADS_WEIGHTS, TeacherHeads


def store_teacher_config(store: Store) -> Any:
    """The teacher's ``Sam3VideoConfig`` from the store's ``heads.json`` alone (no weights read)."""
    import json

    from transformers import Sam3VideoConfig

    path = f"{store.path}/{HEADS_DIR}/{HEADS_CONFIG}"
    if not store.fs.exists(path):
        raise StoreError(f"store {store.uri} has no heads file ({HEADS_DIR}/{HEADS_CONFIG}); it is written by esam3 cache before any row")
    return Sam3VideoConfig.from_dict(json.loads(store.fs.cat_file(path))["teacher_config"])


def load_store_heads(
    store: Store, device: torch.device | str = "cpu", detector: bool = False, memory_attention: bool = True
) -> TeacherHeads:
    """``<store>/heads`` (local, or fetched from S3 into a temporary folder), frozen and in eval mode.

    The detector heads (40M parameters at full size) are dropped unless ``detector`` (stage 3 needs them), and SAM3's
    memory attention unless ``memory_attention`` (stage 2's student has its own): a trainer holds only what it runs."""
    remote = f"{store.path}/{HEADS_DIR}"
    if not store.fs.exists(f"{remote}/{HEADS_CONFIG}"):
        raise StoreError(f"store {store.uri} has no heads file ({HEADS_DIR}/{HEADS_CONFIG}); it is written by esam3 cache before any row")
    protocols = store.fs.protocol if isinstance(store.fs.protocol, tuple) else (store.fs.protocol,)
    if "file" in protocols:
        heads, _ = TeacherHeads.load(Path(remote), device=device)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            for name in (HEADS_CONFIG, HEADS_WEIGHTS):
                store.fs.get_file(f"{remote}/{name}", str(Path(tmp) / name))
            heads, _ = TeacherHeads.load(Path(tmp), device=device)
    heads.requires_grad_(False)
    return trim(heads, detector, memory_attention).eval()


def trim(heads: TeacherHeads, detector: bool, memory_attention: bool) -> TeacherHeads:
    """Drop the detector heads and / or SAM3's memory attention from loaded heads (in place)."""
    if not detector:
        heads.detector_model = None
    if not memory_attention:
        heads.tracker_model.memory_attention = None
    return heads
