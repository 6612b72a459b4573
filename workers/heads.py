"""The teacher's small modules ("heads"): everything a student needs on top of cached trunk features.

SAM3 = a 446M-parameter ViT trunk + a CLIP text encoder + small heads. The heads here are the tracker neck,
the tracker (prompt encoder, mask decoder, memory encoder, memory attention, object pointers) and the
detector heads for stage 3 (detector neck, geometry / DETR encoder / DETR decoder, mask decoder, scoring). Their
parameter names are exactly those of ``Sam3VideoModel`` (``tracker_model.*``, ``tracker_neck.*``,
``detector_model.*``), so the heads file is a plain subset of the teacher's state dict, and the same code runs
on a loaded teacher (sharing its modules) and on the exported file (building only these modules; the trunk and
the text encoder are never built).

Where transformers already implements a step on these modules (``Sam3VideoModel.get_vision_features_for_tracker``,
``Sam3Model.forward`` from precomputed embeddings), it is called on this object rather than re-implemented; the
attribute names above are what those functions look up. Pinned to transformers 5.24 and tested against it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from esam3.schemas.errors import first_line
from esam3.schemas.teacher import HeadsLoadError, TeacherLoadError

HEADS_WEIGHTS = "heads.safetensors"
HEADS_CONFIG = "heads.json"
HEADS_FORMAT = 1
#: Top-level parameter prefixes of ``Sam3VideoModel`` that the heads own.
TRACKER_PREFIXES = ("tracker_model.", "tracker_neck.")
DETECTOR_PREFIXES = tuple(
    f"detector_model.{name}."
    for name in ("vision_encoder.neck", "geometry_encoder", "detr_encoder", "detr_decoder", "mask_decoder", "dot_product_scoring")
)
HEAD_PREFIXES = TRACKER_PREFIXES + DETECTOR_PREFIXES


@dataclass(frozen=True)
class Geometry:
    """Sizes read from the checkpoint's config; nothing in esam3 assumes SAM3's 1008 / 72 / 1024 / 288."""

    image_size: int  # S: the square input frame (1008)
    patch_size: int  # 14
    grid: int  # S / patch = trunk tokens per side (72)
    trunk_width: int  # ViT width (1024)
    hidden: int  # tracker / FPN width (256)
    mask_size: int  # low-res mask logits per side (288)
    memory_channels: int  # maskmem_features channels (64)
    neck_sizes: tuple[int, ...]  # tracker neck levels per side (288, 144, 72)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Geometry:
        """Back from a card's JSON (lists become tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    @classmethod
    def from_config(cls, config: Any) -> Geometry:
        """Sizes of a ``Sam3VideoConfig``; sub-configs that disagree on them are refused, naming the fields."""
        check_sizes(config, "teacher config")
        vit = config.detector_config.vision_config.backbone_config
        tracker = config.tracker_config
        neck_sizes = tuple(size[0] for size in tracker.vision_config.backbone_feature_sizes)
        return cls(
            image_size=vit.image_size,
            patch_size=vit.patch_size,
            grid=vit.image_size // vit.patch_size,
            trunk_width=vit.hidden_size,
            hidden=tracker.vision_config.fpn_hidden_size,
            mask_size=neck_sizes[0],  # the mask decoder upsamples to its highest-resolution skip level
            memory_channels=tracker.memory_encoder_output_channels,
            neck_sizes=neck_sizes,
        )


def check_sizes(config: Any, where: str) -> None:
    """Every size field of a ``Sam3VideoConfig`` must follow from the detector ViT's image and patch size.

    transformers loads a config whose tracker says 224 px while the ViT says 1008 and fails only at the first
    prompt, deep in a reshape; a hand-edited or mixed-up config.json is caught here with the fields to fix.
    """
    vit = config.detector_config.vision_config.backbone_config
    size, patch = vit.image_size, vit.patch_size
    if size % patch:
        raise TeacherLoadError(f"{where}: detector ViT image_size {size} is not a multiple of its patch_size {patch}")
    grid = size // patch
    tracker = config.tracker_config
    levels = [[round(f * grid)] * 2 for f in config.detector_config.vision_config.scale_factors[:3]]
    expected = {
        "tracker_config.image_size": (tracker.image_size, size),
        "tracker_config.vision_config.backbone_config.image_size": (tracker.vision_config.backbone_config.image_size, size),
        "tracker_config.vision_config.backbone_config.patch_size": (tracker.vision_config.backbone_config.patch_size, patch),
        "tracker_config.prompt_encoder_config.image_size": (tracker.prompt_encoder_config.image_size, size),
        "tracker_config.prompt_encoder_config.patch_size": (tracker.prompt_encoder_config.patch_size, patch),
        "tracker_config.vision_config.backbone_feature_sizes": ([list(s) for s in tracker.vision_config.backbone_feature_sizes], levels),
        "tracker_config.memory_attention_rope_feat_sizes": (list(tracker.memory_attention_rope_feat_sizes), [grid, grid]),
    }
    wrong = [f"{name} is {got}, expected {want}" for name, (got, want) in expected.items() if got != want]
    if wrong:
        raise TeacherLoadError(
            f"{where}: sizes disagree with the detector ViT ({size} px, patch {patch}, {grid}x{grid} tokens): " + "; ".join(wrong)
        )


class _VisionNeckHolder(nn.Module):
    """Only the detector's neck, under the name ``vision_encoder.neck`` that the teacher's weights use."""

    def __init__(self, neck: nn.Module) -> None:
        super().__init__()
        self.neck = neck


class DetectorHeads(nn.Module):
    """SAM3's detector without its trunk and text encoder; runs ``Sam3Model.forward`` on precomputed embeddings."""

    def __init__(self, config: Any, modules: dict[str, nn.Module]) -> None:
        super().__init__()
        self.config = config
        for name, module in modules.items():
            setattr(self, name, module)

    @classmethod
    def build(cls, config: Any) -> DetectorHeads:
        from transformers.models.sam3 import modeling_sam3 as m

        for sub in ("geometry_encoder_config", "detr_encoder_config", "detr_decoder_config", "mask_decoder_config"):
            getattr(config, sub)._attn_implementation = "sdpa"
        return cls(
            config,
            {
                "vision_encoder": _VisionNeckHolder(m.Sam3VisionNeck(config.vision_config)),
                "geometry_encoder": m.Sam3GeometryEncoder(config.geometry_encoder_config),
                "detr_encoder": m.Sam3DetrEncoder(config.detr_encoder_config),
                "detr_decoder": m.Sam3DetrDecoder(config.detr_decoder_config),
                "mask_decoder": m.Sam3MaskDecoder(config.mask_decoder_config),
                "dot_product_scoring": m.Sam3DotProductScoring(config),
            },
        )

    def vision_embeds(self, trunk: torch.Tensor) -> Any:
        """The detector's FPN levels from trunk features (B, C, g, g), as ``Sam3Model`` expects them."""
        from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

        levels, positions = self.vision_encoder.neck(trunk)
        return Sam3VisionEncoderOutput(
            last_hidden_state=trunk.flatten(2).transpose(1, 2), fpn_hidden_states=levels, fpn_position_encoding=positions
        )

    def detect(self, trunk: torch.Tensor, text_features: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        """``Sam3Model.forward`` for one image's trunk (1, C, g, g) against N phrases' features (N, L, D)."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        from transformers.models.sam3.modeling_sam3 import Sam3Model

        n = text_features.shape[0]
        one = self.vision_embeds(trunk)  # the neck once, then shared by the N phrases
        embeds = type(one)(
            last_hidden_state=one.last_hidden_state.expand(n, -1, -1),
            fpn_hidden_states=tuple(level.expand(n, -1, -1, -1) for level in one.fpn_hidden_states),
            fpn_position_encoding=tuple(pos.expand(n, -1, -1, -1) for pos in one.fpn_position_encoding),
        )
        text = BaseModelOutputWithPooling(pooler_output=text_features)
        return Sam3Model.forward(self, vision_embeds=embeds, text_embeds=text, attention_mask=attention_mask)


def picked_output(labels: torch.Tensor, boxes: torch.Tensor, iou: torch.Tensor, tracker_config: Any) -> torch.Tensor:
    """:meth:`TeacherHeads.picked_output` under a tracker config (its ``multimask_*`` settings): for code that has the
    config but not the heads (benchmarks on synthetic targets)."""
    config = tracker_config
    n_points = ((labels >= 0).sum(dim=-1) + 2 * (~torch.isnan(boxes).any(dim=-1)).long()).to(iou.device)
    multimask = (n_points >= config.multimask_min_pt_num) & (n_points <= config.multimask_max_pt_num) & bool(config.multimask_output_in_sam)
    return torch.where(multimask, 1 + iou[:, 1:].argmax(dim=-1), torch.zeros_like(n_points))


class TeacherHeads(nn.Module):
    """Tracker neck + tracker (+ detector heads). Parameter names match ``Sam3VideoModel``."""

    def __init__(self, config: Any, tracker_neck: nn.Module, tracker_model: nn.Module, detector_model: nn.Module | None):
        super().__init__()
        self.config = config
        self.geometry = Geometry.from_config(config)
        self.tracker_neck = tracker_neck
        self.tracker_model = tracker_model
        self.detector_model = detector_model

    @classmethod
    def from_teacher(cls, model: Any) -> TeacherHeads:
        """A view on a loaded ``Sam3VideoModel``: shares its modules, copies nothing."""
        det = model.detector_model
        detector = DetectorHeads(
            det.config,
            {
                "vision_encoder": _VisionNeckHolder(det.vision_encoder.neck),
                "geometry_encoder": det.geometry_encoder,
                "detr_encoder": det.detr_encoder,
                "detr_decoder": det.detr_decoder,
                "mask_decoder": det.mask_decoder,
                "dot_product_scoring": det.dot_product_scoring,
            },
        )
        return cls(model.config, model.tracker_neck, model.tracker_model, detector)

    @classmethod
    def build(cls, config: Any, detector: bool = True) -> TeacherHeads:
        """Fresh (randomly initialised) heads for ``config``; the trunk and text encoder are not built."""
        from transformers import Sam3TrackerVideoModel
        from transformers.models.sam3.modeling_sam3 import Sam3VisionNeck

        tracker = Sam3TrackerVideoModel(config.tracker_config, remove_vision_encoder=True)
        neck = Sam3VisionNeck(config.detector_config.vision_config)
        heads = DetectorHeads.build(config.detector_config) if detector else None
        return cls(config, neck, tracker, heads).eval()

    # ---- image features for the tracker ---------------------------------------------------------------

    def neck_levels(self, trunk: torch.Tensor) -> list[torch.Tensor]:
        """The tracker neck's FPN levels (B, hidden, s, s) for s in ``geometry.neck_sizes`` (288/144/72 at full size)."""
        levels, _ = self.tracker_neck(trunk)
        return list(levels[: len(self.geometry.neck_sizes)])

    def tracker_features(self, trunk: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """What the tracker caches per frame: levels (conv_s0/s1 applied) and positions, each (HW, B, C)."""
        from transformers import Sam3VideoModel

        tokens = SimpleNamespace(last_hidden_state=trunk.flatten(2).transpose(1, 2))
        return Sam3VideoModel.get_vision_features_for_tracker(self, tokens)

    def image_embeddings(self, trunk: torch.Tensor) -> list[torch.Tensor]:
        """The mask decoder's inputs for single images: [s0 (B,C/8,4g,4g), s1 (B,C/4,2g,2g), top + no-memory (B,C,g,g)]."""
        feats, _ = self.tracker_features(trunk)
        feats[-1] = feats[-1] + self.tracker_model.no_memory_embedding
        batch = trunk.shape[0]
        return [f.permute(1, 2, 0).reshape(batch, -1, s, s) for f, s in zip(feats, self.geometry.neck_sizes)]

    # ---- prompts ---------------------------------------------------------------------------------------

    def decode_prompts(
        self,
        embeddings: list[torch.Tensor],
        points: torch.Tensor,
        labels: torch.Tensor,
        boxes: torch.Tensor,
        image: torch.Tensor | None = None,
        choose: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run the tracker's prompt encoder and mask decoder for K prompts on one image (or on several).

        ``embeddings`` from :meth:`image_embeddings` for one image; or for a batch of images, with ``image`` (K,)
        naming each prompt's image (trainers decode a whole batch's prompts in one call per prompt shape). ``points`` (K, P, 2) and ``boxes`` (K, 4, XYXY,
        a row of NaN = no box) are in SAM's pixel-index convention of the S x S frame (the encoder adds 0.5);
        ``labels`` (K, P): 1 positive, 0 negative, < 0 an empty slot, valid slots first. Prompts are decoded in
        groups of equal shape, so no prompt sees padding tokens: each result equals decoding that prompt alone.
        A box enters as its two corner points (labels 2, 3) ahead of the clicks, as SAM3's video tracker feeds it.

        Returns low-res logits ``multi`` (K, 3, m, m) and ``single`` (K, 1, m, m) (m = 288 at full size: the
        multimask outputs, and the single-mask output with SAM's stability fallback, as ``Sam3TrackerModel``
        gives them), ``iou`` (K, 4) (single first), ``object_score`` (K,) logits and ``object_pointer``
        (K, hidden): the pointer the tracker would store if this prompt started a track (the best multimask
        token for a single click, the single-mask token otherwise).

        ``choose`` (K,): the output each prompt is judged by (0 = single, 1..3 = multimask; a trainer passes
        :meth:`picked_output` of the teacher's scores). Then only the decoder pass that gives it runs (half the
        decoder's work), and the result is ``chosen`` (K, m, m) logits and ``iou`` (K, 4) with NaN for the scores of
        the pass that did not run.
        """
        valid = labels >= 0
        count = valid.sum(dim=-1)
        if bool((valid & (torch.arange(valid.shape[-1], device=valid.device) >= count[:, None])).any()):
            raise ValueError("prompt labels must list their valid points first and empty slots (< 0) after them")
        has_box = ~torch.isnan(boxes).any(dim=-1)
        if bool(((count == 0) & ~has_box).any()):
            raise ValueError("every prompt needs a point or a box")
        out: dict[str, torch.Tensor] = {}
        keys = torch.stack([count, has_box.long()], dim=-1)
        for key in torch.unique(keys, dim=0):
            rows = torch.nonzero((keys == key).all(dim=-1)).flatten()
            n, box = int(key[0]), bool(key[1])
            group = self._decode_group(
                embeddings,
                points[rows, :n],
                labels[rows, :n],
                boxes[rows] if box else None,
                None if image is None else image[rows],
                None if choose is None else choose[rows],
            )
            for name, value in group.items():
                if name not in out:
                    out[name] = value.new_empty((len(labels), *value.shape[1:]))
                out[name][rows] = value
        return out

    def _decode_group(
        self,
        embeddings: list[torch.Tensor],
        points: torch.Tensor,
        labels: torch.Tensor,
        boxes: torch.Tensor | None,
        image: torch.Tensor | None,
        choose: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """One image's prompts as the decoder's point batch (``image`` None), or each prompt with its own image."""
        tracker = self.tracker_model
        labels = labels.to(torch.int32)
        if boxes is not None:
            corner_labels = torch.tensor([2, 3], dtype=labels.dtype, device=labels.device).expand(len(boxes), 2)
            points = torch.cat([boxes.reshape(-1, 2, 2), points], dim=1)
            labels = torch.cat([corner_labels, labels], dim=1)
        per_prompt = image is not None
        if per_prompt:
            embeddings = [e[image] for e in embeddings]
        passes = (True, False)
        if choose is not None:
            passes = tuple(bool(v) for v in torch.unique(choose > 0))
            if len(passes) != 1 or passes[0] != self.uses_multimask(points.shape[1]):
                raise ValueError(
                    f"choose: a prompt of {points.shape[1]} point(s) is judged by its {'multimask' if self.uses_multimask(points.shape[1]) else 'single-mask'} output"
                )
        if per_prompt:
            sparse, dense = tracker.prompt_encoder(
                input_points=points[:, None], input_labels=labels[:, None], input_boxes=None, input_masks=None
            )
            results = {multimask: self._run_decoder(embeddings, sparse, dense, multimask) for multimask in passes}
        else:
            sparse, dense = tracker.prompt_encoder(input_points=points[None], input_labels=labels[None], input_boxes=None, input_masks=None)
            results = {}
            for multimask in passes:  # one image, the K prompts as its point batch: (1, K, ...) -> (K, ...)
                masks, iou, tokens, score = tracker.mask_decoder(
                    image_embeddings=embeddings[-1],
                    image_positional_embeddings=tracker.get_image_wide_positional_embeddings(),
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=multimask,
                    high_resolution_features=embeddings[:-1],
                )
                results[multimask] = (masks[0], iou[0], tokens[0], score[0, :, 0])
        if choose is not None:
            masks, iou = results[passes[0]][:2]
            rows = torch.arange(len(choose), device=masks.device)
            missing = iou.new_full((len(choose), 4 - iou.shape[1]), float("nan"))
            return {
                "chosen": masks[rows, (choose - 1).clamp(min=0).to(masks.device)],
                "iou": torch.cat([missing, iou] if passes[0] else [iou, missing], dim=-1),
            }
        (multi, multi_iou, multi_tokens, score), (single, single_iou, single_tokens, _) = results[True], results[False]
        if self.uses_multimask(points.shape[1]):
            token = multi_tokens[torch.arange(len(points)), multi_iou.argmax(dim=-1)]
        else:
            token = single_tokens[:, 0]
        return {
            "multi": multi,
            "single": single,
            "iou": torch.cat([single_iou, multi_iou], dim=-1),
            "object_score": score,
            "object_pointer": self._object_pointer(token, score),
        }

    def _run_decoder(
        self, embeddings: list[torch.Tensor], sparse: torch.Tensor, dense: torch.Tensor, multimask: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The mask decoder with one prompt per image row: (K, M, m, m) logits, (K, M) IoU, (K, M, hidden) tokens, (K,) scores."""
        tracker = self.tracker_model
        masks, iou, tokens, score = tracker.mask_decoder(
            image_embeddings=embeddings[-1],
            image_positional_embeddings=tracker.get_image_wide_positional_embeddings().expand(len(embeddings[-1]), -1, -1, -1),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
            high_resolution_features=embeddings[:-1],
        )
        return masks[:, 0], iou[:, 0], tokens[:, 0], score[:, 0, 0]

    def decode_each(
        self,
        embeddings: list[torch.Tensor],
        points: torch.Tensor | None,
        labels: torch.Tensor | None,
        multimask: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The tracker's decoder for K image rows (``embeddings`` per level, K rows each), one prompt per row:
        ``points`` (K, P, 2) / ``labels`` (K, P) in SAM's pixel-index convention (a box as corner labels 2, 3), or
        None for a frame being tracked without a prompt (SAM's padding point, label -1). Raw outputs, as
        :meth:`_run_decoder` gives them: no stability fallback, no no-object substitution."""
        if points is None:
            k, device = len(embeddings[-1]), embeddings[-1].device
            points = torch.zeros(k, 1, 2, device=device, dtype=embeddings[-1].dtype)
            labels = -torch.ones(k, 1, dtype=torch.int32, device=device)
        sparse, dense = self.tracker_model.prompt_encoder(
            input_points=points[:, None],
            input_labels=labels[:, None].to(torch.int32),
            input_boxes=None,
            input_masks=None,
        )
        return self._run_decoder(embeddings, sparse, dense, multimask)

    def uses_multimask(self, n_points: int) -> bool:
        """Whether the tracker takes its best multimask output for a prompt of ``n_points`` points (a box = 2)."""
        config = self.tracker_model.config
        return bool(config.multimask_output_in_sam and config.multimask_min_pt_num <= n_points <= config.multimask_max_pt_num)

    def picked_output(self, labels: torch.Tensor, boxes: torch.Tensor, iou: torch.Tensor) -> torch.Tensor:
        """Which of a prompt's 4 outputs (0 = single, 1..3 = multimask, as in ``iou``) the tracker would use.

        ``labels`` (K, P) and ``boxes`` (K, 4) as :meth:`decode_prompts` takes them, ``iou`` (K, 4) as it returns
        it: the best-scored multimask output where the tracker uses multimask for that many points, else single.
        """
        return picked_output(labels, boxes, iou, self.tracker_model.config)

    def _object_pointer(self, token: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        tracker = self.tracker_model
        pointer = tracker.object_pointer_proj(token)
        present = (score > 0).to(pointer.dtype)[:, None]
        return present * pointer + (1 - present) * tracker.no_object_pointer

    # ---- concepts ----------------------------------------------------------------------------------------

    def require_detector(self) -> DetectorHeads:
        if self.detector_model is None:
            raise HeadsLoadError("these heads were exported without the detector heads; re-export with them for concept targets")
        return self.detector_model

    # ---- save / load -------------------------------------------------------------------------------------

    def save(self, out: Path, metadata: dict[str, Any]) -> Path:
        """Write ``heads.safetensors`` + ``heads.json`` (the teacher config and ``metadata``) atomically."""
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        document = {"format": HEADS_FORMAT, "teacher_config": self.config.to_dict(), **metadata}
        save_weights_and_config(out / HEADS_WEIGHTS, state, out / HEADS_CONFIG, document)
        return out

    @classmethod
    def load(cls, directory: Path, device: str | torch.device = "cpu") -> tuple[TeacherHeads, dict[str, Any]]:
        """Build only the head modules from ``heads.json`` and load ``heads.safetensors`` (strict)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        from transformers import Sam3VideoConfig

        config_path, weights_path = directory / HEADS_CONFIG, directory / HEADS_WEIGHTS
        for path in (config_path, weights_path):
            if not path.is_file():
                raise HeadsLoadError(f"heads {directory}: {path.name} is missing; expected the output of 'esam3 teacher export-heads'")
        try:
            document = json.loads(config_path.read_text())
            if not isinstance(document, dict):
                raise TypeError(f"a JSON {type(document).__name__}, not an object")
            if document.get("format") != HEADS_FORMAT:
                raise HeadsLoadError(f"heads {config_path}: format {document.get('format')!r}, this esam3 reads {HEADS_FORMAT}")
            config = Sam3VideoConfig.from_dict(document["teacher_config"])
            check_sizes(config, "teacher_config")
        except HeadsLoadError:
            raise
        except Exception as exc:  # JSON and strict-config errors come in many types
            raise HeadsLoadError(f"heads {config_path}: not a heads config ({first_line(exc)})") from None
        try:
            state = load_file(str(weights_path), device=str(device))
        except (OSError, SafetensorError) as exc:
            raise HeadsLoadError(f"heads {weights_path}: unreadable ({first_line(exc)}); export the heads again") from None
        has_detector = any(k.startswith(DETECTOR_PREFIXES) for k in state)
        heads = cls.build(config, detector=has_detector).to(device)
        try:
            missing, unexpected = heads.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches
            raise HeadsLoadError(f"heads {weights_path}: weights do not match heads.json ({first_line(exc)})") from None
        if missing or unexpected:
            raise HeadsLoadError(
                f"heads {weights_path}: weights do not match heads.json ({len(missing)} missing, e.g. "
                f"{missing[:1]}; {len(unexpected)} unexpected, e.g. {unexpected[:1]})"
            )
        return heads.eval(), document


def save_weights_and_config(weights: Path, tensors: dict[str, torch.Tensor], config: Path, document: dict[str, Any]) -> None:
    """A safetensors file and its JSON document, each written atomically, the JSON last (its presence: complete)."""
    from safetensors.torch import save_file

    atomic_write(weights, lambda path: save_file(tensors, str(path), metadata={"format": "pt"}))
    atomic_write(config, lambda path: path.write_text(json.dumps(document, indent=2, sort_keys=True, default=str)))


def atomic_write(target: Path, write: Any) -> None:
    """``write(tmp)`` next to ``target``, then rename over it: readers see the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def capture_memory_conditioned(tracker: nn.Module, session: Any) -> Iterator[dict[tuple[int, int], torch.Tensor]]:
    """Record ``pix_feat_with_mem`` (1, hidden, g, g) per (frame_idx, obj_idx) of ``session`` while the tracker runs.

    Wraps the tracker's ``_prepare_memory_conditioned_features`` on this instance (the output of memory attention,
    or the features + no-memory embedding on a conditioning frame). The wrapper is installed once per tracker and
    files each capture under the session it belongs to, so several videos can be in flight on one tracker.
    """
    sinks: dict[int, dict[tuple[int, int], torch.Tensor]] | None = getattr(tracker, "_esam3_capture_sinks", None)
    if sinks is None:
        sinks = {}
        original = tracker._prepare_memory_conditioned_features

        def wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
            out = original(*args, **kwargs)
            sink = sinks.get(id(kwargs.get("inference_session")))
            if sink is not None:
                sink[(kwargs["frame_idx"], kwargs["obj_idx"])] = out
            return out

        tracker._prepare_memory_conditioned_features = wrapper
        tracker._esam3_capture_sinks = sinks
    captured: dict[tuple[int, int], torch.Tensor] = {}
    sinks[id(session)] = captured
    try:
        yield captured
    finally:
        sinks.pop(id(session), None)
