"""Find, check and load a SAM3 teacher: a local ``sam3_video`` checkpoint or a seeded random one.

A checkpoint directory is what ``facebook/sam3`` ships: ``config.json`` (``model_type: sam3_video``, with a
``detector_config`` and a ``tracker_config``) and ``model.safetensors`` (or a sharded index), plus the CLIP
tokenizer files for concept targets. It loads with ``Sam3VideoModel.from_pretrained(dir, local_files_only=True)``;
nothing is fetched from a hub.

Random teachers (``tiny-random``, ``small-random``) are built from a seeded config, saved with
``save_pretrained`` into ``$ESAM3_CACHE/teachers`` (default ``~/.cache/esam3``) and loaded back through the very
same path as a real checkpoint, so tests exercise the loader users run. ``full-random`` (860M parameters) is
built in memory only; it exists for GPU benchmarks of the real architecture.

The teacher id is a BLAKE2b checksum over the loaded weights (names, dtypes, shapes, bytes): it does not depend
on file layout or sharding, and every row the cache writes carries it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from esam3.schemas.errors import first_line
from esam3.schemas.teacher import RANDOM_TEACHERS, TeacherLoadError
from esam3.workers.heads import check_sizes

log = logging.getLogger(__name__)

#: Bumped when the random configs change, so cached random teachers are rebuilt.
RANDOM_CONFIG_VERSION = 3
#: Object-score bias of random teachers (see ``build_random_model``).
OBJECT_SCORE_BIAS = 4.0
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


@dataclass(frozen=True)
class RandomSpec:
    """The few numbers that size a random SAM3; everything else is SAM3's default."""

    image_size: int
    vit_width: int
    vit_depth: int
    vit_heads: int
    window: int
    global_layers: tuple[int, ...]
    hidden: int  # tracker / FPN width (SAM3: 256)
    text_width: int
    text_depth: int
    text_vocab: int
    detr_layers: int
    queries: int
    memory_layers: int
    decoder_mlp: int


_SPECS = {
    "tiny-random": RandomSpec(112, 64, 2, 2, 4, (1,), 128, 64, 2, 1024, 1, 10, 1, 128),
    "small-random": RandomSpec(336, 384, 12, 6, 8, (3, 7, 11), 256, 256, 4, 1024, 2, 50, 2, 1024),
}


def random_config(name: str) -> Any:
    """The ``Sam3VideoConfig`` of a random teacher (``full-random`` = SAM3's own defaults: 1008 px, ViT-L/14)."""
    from transformers import Sam3Config, Sam3TrackerVideoConfig, Sam3VideoConfig

    if name == "full-random":
        return Sam3VideoConfig()
    spec = _SPECS[name]
    grid = spec.image_size // 14
    vit = dict(
        model_type="sam3_vit_model",
        hidden_size=spec.vit_width,
        intermediate_size=4 * spec.vit_width,
        num_hidden_layers=spec.vit_depth,
        num_attention_heads=spec.vit_heads,
        image_size=spec.image_size,
        patch_size=14,
        window_size=spec.window,
        global_attn_indexes=list(spec.global_layers),
        pretrain_image_size=spec.image_size,
    )
    levels = [[4 * grid, 4 * grid], [2 * grid, 2 * grid], [grid, grid]]
    vision = dict(backbone_config=vit, fpn_hidden_size=spec.hidden, backbone_feature_sizes=levels)
    heads = max(1, spec.hidden // 64)
    detector = Sam3Config(
        vision_config=vision,
        text_config=dict(
            vocab_size=spec.text_vocab,
            hidden_size=spec.text_width,
            intermediate_size=4 * spec.text_width,
            projection_dim=spec.text_width,
            num_hidden_layers=spec.text_depth,
            num_attention_heads=max(1, spec.text_width // 64),
            max_position_embeddings=32,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,  # ids of character_tokenizer's specials
        ),
        geometry_encoder_config=dict(hidden_size=spec.hidden, num_layers=1, num_attention_heads=heads, intermediate_size=spec.decoder_mlp),
        detr_encoder_config=dict(
            hidden_size=spec.hidden, num_layers=spec.detr_layers, num_attention_heads=heads, intermediate_size=spec.decoder_mlp
        ),
        detr_decoder_config=dict(
            hidden_size=spec.hidden,
            num_layers=spec.detr_layers,
            num_queries=spec.queries,
            num_attention_heads=heads,
            intermediate_size=spec.decoder_mlp,
        ),
        mask_decoder_config=dict(hidden_size=spec.hidden, num_attention_heads=heads),
    )
    tracker = Sam3TrackerVideoConfig(
        vision_config=dict(backbone_config=vit, fpn_hidden_size=spec.hidden, backbone_feature_sizes=levels),
        prompt_encoder_config=dict(hidden_size=spec.hidden, image_size=spec.image_size, patch_size=14),
        mask_decoder_config=dict(
            hidden_size=spec.hidden, mlp_dim=spec.decoder_mlp, num_attention_heads=heads, iou_head_hidden_dim=spec.hidden
        ),
        memory_attention_hidden_size=spec.hidden,
        memory_attention_num_layers=spec.memory_layers,
        memory_attention_feed_forward_hidden_size=spec.decoder_mlp,
        memory_encoder_hidden_size=spec.hidden,
        memory_encoder_output_channels=64,
        mask_downsampler_embed_dim=spec.hidden,
        memory_fuser_embed_dim=spec.hidden,
        memory_fuser_intermediate_dim=4 * spec.hidden,
        image_size=spec.image_size,
    )
    return Sam3VideoConfig(detector_config=detector.to_dict(), tracker_config=tracker.to_dict())


def build_random_model(name: str, seed: int) -> Any:
    """A ``Sam3VideoModel`` with seeded random weights, identical for the same name and seed on any machine.

    Always initialised on the CPU (full-random: 860M parameters, ~17 s on 2 cores), even for a GPU run: CUDA's
    generator draws other numbers, and a cache run's driver (CPU) and its GPU actors must agree on the checksum.
    """
    from transformers import Sam3VideoModel

    if name not in RANDOM_TEACHERS:
        raise TeacherLoadError(f"unknown random teacher {name!r}; expected one of {', '.join(RANDOM_TEACHERS)}")
    config = random_config(name)
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(seed)
        model = Sam3VideoModel(config).eval()
    # A random object-score head says "absent" about as often as not, and an absent object's masks are all
    # -1024 for the rest of the video; a positive bias keeps tracked objects present so targets are not trivial.
    with torch.no_grad():
        model.tracker_model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(OBJECT_SCORE_BIAS)
    return model


def character_tokenizer(max_length: int) -> Any:
    """A CLIP tokenizer over single byte-level characters (no merges) for random teachers' text encoders."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = specials + symbols + [s + "</w>" for s in symbols]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=max_length)


def cache_root() -> Path:
    return Path(os.environ.get("ESAM3_CACHE", Path.home() / ".cache" / "esam3"))


def random_teacher_dir(name: str, seed: int, root: Path | None = None) -> Path:
    """Where a random teacher is saved (whether or not it is yet)."""
    return (root or cache_root()) / "teachers" / f"{name}-v{RANDOM_CONFIG_VERSION}-seed{seed}"


def materialize_random(name: str, seed: int, root: Path | None = None) -> Path:
    """Save a random teacher (with its tokenizer) once under ``root`` and return its directory.

    Written into a temporary sibling and renamed, so a crash or a concurrent writer never leaves half a checkpoint.
    """
    if name == "full-random":
        raise TeacherLoadError("full-random is built in memory only (3.4 GB); load it with load_model('full-random')")
    target = random_teacher_dir(name, seed, root)
    base = target.parent
    if (target / "config.json").is_file():
        return target
    base.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=base))
    _quiet_transformers()
    try:
        model = build_random_model(name, seed)
        model.save_pretrained(staging)
        text = model.config.detector_config.text_config
        character_tokenizer(text.max_position_embeddings).save_pretrained(staging)
        try:
            os.replace(staging, target)
        except OSError:  # another process won the race: keep its copy
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("saved random teacher %s (seed %d) to %s", name, seed, target)
    return target


def _quiet_transformers() -> None:
    """No tqdm bars from transformers' save/load: rich owns the terminal."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def check_checkpoint_dir(path: Path) -> dict[str, Any]:
    """Validate a checkpoint directory before loading; returns its parsed ``config.json``."""
    expected = (
        "a SAM3 checkpoint directory with config.json (model_type sam3_video) and model.safetensors, e.g. a local copy of facebook/sam3"
    )
    if not path.exists():
        raise TeacherLoadError(f"teacher {path}: no such directory; expected {expected}, or one of {', '.join(RANDOM_TEACHERS)}")
    if not path.is_dir():
        raise TeacherLoadError(f"teacher {path}: not a directory; expected {expected}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise TeacherLoadError(f"teacher {path}: config.json is missing; expected {expected}")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TeacherLoadError(f"teacher {config_file}: not valid JSON ({exc}); expected {expected}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "sam3_video":
        raise TeacherLoadError(
            f"teacher {config_file}: model_type is {model_type!r}, expected 'sam3_video' (the full SAM3 checkpoint "
            "with detector and tracker); SAM2 or tracker-only checkpoints cannot produce every target"
        )
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise TeacherLoadError(f"teacher {path}: no model.safetensors (or model.safetensors.index.json); expected {expected}")
    return config


def load_checkpoint(path: Path) -> Any:
    """Load a ``Sam3VideoModel`` from a checked directory; missing or mis-shaped weights are errors.

    Always in fp32, whatever dtype the file stores: precision is the runner's choice (bf16 autocast on CUDA).
    """
    from transformers import Sam3VideoModel

    _quiet_transformers()
    config = teacher_config(str(path))
    try:
        # Mis-shaped weights are collected (and refused below with their names) rather than raised mid-load.
        model, info = Sam3VideoModel.from_pretrained(
            path,
            config=config,
            local_files_only=True,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
            dtype=torch.float32,
        )
    except Exception as exc:  # noqa: BLE001 - a broken file raises OSError, SafetensorError, KeyError (bad index) ...
        raise TeacherLoadError(
            f"teacher {path}: cannot load weights ({first_line(exc)}); do config.json and the weights belong together?"
        ) from None
    if info.get("unexpected_keys"):
        log.warning(
            "teacher %s: %d weights not used by Sam3VideoModel (e.g. %s)",
            path,
            len(info["unexpected_keys"]),
            _short(sorted(info["unexpected_keys"])[0]),
        )
    problems = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if problems:
        summary = "; ".join(f"{len(v)} {k.replace('_', ' ')} (e.g. {_short(v[0])})" for k, v in problems.items())
        raise TeacherLoadError(f"teacher {path}: weights do not match config.json: {summary}")
    return model.eval()


def _short(item: Any) -> str:
    return str(item[0] if isinstance(item, tuple) else item)


def weights_checksum(model: torch.nn.Module) -> str:
    """BLAKE2b-128 over every parameter and buffer: name, dtype, shape and bytes, in name order."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}\n".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def load_model(source: str, seed: int = 0) -> tuple[Any, str | None]:
    """``(Sam3VideoModel, checkpoint_dir)`` for a directory or a random teacher name (dir is None in memory).

    Everything loads on the CPU; the caller moves the model to its device.
    """
    if source in RANDOM_TEACHERS:
        if source == "full-random":
            return build_random_model(source, seed), None
        path = materialize_random(source, seed)
        return load_checkpoint(path), str(path)
    path = Path(source).expanduser()
    return load_checkpoint(path), str(path)


def teacher_config(source: str) -> Any:
    """The ``Sam3VideoConfig`` of a teacher without loading its weights (for plans and sizes)."""
    from transformers import Sam3VideoConfig

    if source in RANDOM_TEACHERS:
        return random_config(source)
    path = Path(source).expanduser()
    check_checkpoint_dir(path)
    try:
        config = Sam3VideoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # config parsing raises many types
        raise TeacherLoadError(f"teacher {path / 'config.json'}: not a valid sam3_video config ({first_line(exc)})") from None
    check_sizes(config, f"teacher {path / 'config.json'}")
    return config


def architecture_parameters(source: str = "full-random") -> int:
    """Parameters of a teacher's architecture, counted on torch's meta device (no memory, no weights; ~0.3 s for
    SAM3): the figure exports print their students next to."""
    import torch
    from transformers import Sam3VideoModel

    with torch.device("meta"):
        return sum(p.numel() for p in Sam3VideoModel(teacher_config(source)).parameters())
