"""Concept (noun-phrase) targets for stage 3: SAM3's text features and detector outputs per phrase.

For one image (its trunk output in hand) and N noun phrases: the phrases are tokenised with the checkpoint's
CLIP tokenizer (padded to the text encoder's context length, as ``Sam3Processor`` does), encoded once, and the
detector runs on all N at once. Per phrase we keep the projected text features (what the detector consumes,
so a student never needs the text encoder) and the ``top_k`` queries by score = sigmoid(logit) x
sigmoid(presence), with their boxes (XYXY, normalised to [0, 1] of the S x S frame) and mask logits.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from esam3.schemas.errors import first_line
from esam3.schemas.teacher import ConceptTargetConfig
from esam3.workers.teacher import one_trunk
from esam3.workers.teacher_loading import TeacherLoadError, character_tokenizer


@dataclass
class ConceptTargets:
    """Targets of one image for N phrases (CPU). k = min(top_k, detector queries)."""

    phrases: list[str]
    input_ids: torch.Tensor  # (N, L) int64
    attention_mask: torch.Tensor  # (N, L) int64
    text_features: torch.Tensor  # (N, L, D) float32, projected (the detector's input)
    presence_logit: torch.Tensor  # (N,)
    query_index: torch.Tensor  # (N, k) int64, which detector queries were kept
    logits: torch.Tensor  # (N, k) per-query logits
    scores: torch.Tensor  # (N, k) sigmoid(logit) * sigmoid(presence), descending
    boxes: torch.Tensor  # (N, k, 4) XYXY in [0, 1]
    masks: torch.Tensor  # (N, k, m, m) mask logits


@functools.lru_cache(maxsize=4)
def load_tokenizer(checkpoint_dir: str | None, max_length: int, vocab_size: int) -> Any:
    """The checkpoint's CLIP tokenizer (loaded once per checkpoint); random teachers in memory use the character one.

    The files are checked first: given a directory without them, transformers builds an empty tokenizer that
    maps every phrase to the same ids, and the concept targets would be silently meaningless.
    """
    if checkpoint_dir is None:
        return character_tokenizer(max_length)
    from transformers import AutoTokenizer

    directory = Path(checkpoint_dir)
    expected = (
        f"teacher {directory}: concept targets need the CLIP tokenizer files (tokenizer.json, or vocab.json + "
        "merges.txt) next to the weights, as facebook/sam3 ships them"
    )
    if not (directory / "tokenizer.json").is_file() and not all((directory / f).is_file() for f in ("vocab.json", "merges.txt")):
        raise TeacherLoadError(expected)
    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TeacherLoadError(f"{expected} ({type(exc).__name__}: {first_line(exc)})") from None
    if not 2 < len(tokenizer) <= vocab_size:
        raise TeacherLoadError(
            f"teacher {directory}: the tokenizer has {len(tokenizer)} tokens, the text encoder {vocab_size}; "
            "the tokenizer files do not belong to this checkpoint"
        )
    return tokenizer


def concept_targets(teacher: Any, trunk: torch.Tensor, phrases: Sequence[str], config: ConceptTargetConfig) -> ConceptTargets:
    """Text features and top-k detections for each phrase on one image (trunk (1, C, g, g) or (C, g, g))."""
    phrases = [str(p) for p in phrases]
    if not phrases or any(not p.strip() for p in phrases):
        raise ValueError("concept targets need at least one non-empty noun phrase")
    detector = teacher.heads.require_detector()
    text_config = teacher.model.config.detector_config.text_config
    tokenizer = load_tokenizer(teacher.card.checkpoint_dir, text_config.max_position_embeddings, text_config.vocab_size)
    tokens = tokenizer(phrases, padding="max_length", truncation=True, max_length=text_config.max_position_embeddings, return_tensors="pt")
    trunk = one_trunk(trunk, teacher.geometry)
    device = teacher.device
    input_ids, attention_mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
    with torch.inference_mode(), teacher.autocast():
        text = teacher.model.detector_model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        out = detector.detect(trunk.to(device), text.pooler_output, attention_mask)
    presence = out.presence_logits.float().reshape(len(phrases))
    logits = out.pred_logits.float()
    scores = logits.sigmoid() * presence.sigmoid()[:, None]
    k = min(config.top_k, scores.shape[1])
    top, index = scores.topk(k, dim=1)
    rows = torch.arange(len(phrases), device=index.device)[:, None]
    return ConceptTargets(
        phrases=phrases,
        input_ids=tokens["input_ids"],
        attention_mask=tokens["attention_mask"],
        text_features=text.pooler_output.float().cpu(),
        presence_logit=presence.cpu(),
        query_index=index.cpu(),
        logits=logits[rows, index].cpu(),
        scores=top.cpu(),
        boxes=out.pred_boxes.float()[rows, index].cpu(),
        masks=out.pred_masks.float()[rows, index].cpu(),
    )
