"""The PyTorch reader every stage trains from: a map-style dataset over a pinned snapshot of a store's target table.

``StoreDataset[positions]`` takes a whole batch (one Lance ``take``, blobs read on threads) and collates it into
contiguous tensors; pair it with :class:`esam3.train.sampler.EpochSampler` (or ``ClipSampler``) and a DataLoader
with ``batch_size=None`` (:func:`make_loader` does that, with spawned workers: Lance is not fork-safe).

What a batch holds (B rows; K = the store's prompts per image, P = points per prompt, N = its objects per video,
all padded with a ``*_valid`` mask so every batch of a store has the same shapes):

* ``key`` (list of B strings), ``position`` (B,) row positions at the pinned version;
* ``input``: uint8 (B, 3, S, S), the student's input decoded and preprocessed exactly as the row's transform record
  says: the teacher's own input, bit for bit (``input_size`` squashes to another size: from the decoded JPEG for
  images, from the stored S x S frame for video frames);
* ``trunk``: float32 (B, C, g, g); with ``decode_on="device"`` it travels as the stored codes instead
  (``trunk_codes`` int8 + ``trunk_scales``, or fp16 / bf16) and :meth:`StoreDataset.to_device` decodes on the GPU
  (the mask logits too: ``chosen_logits_codes`` + ``chosen_logits_scales``, zstd undone on the CPU);
* images, ``prompts``: ``prompt_valid`` (B, K), ``prompt_kinds``, ``prompt_points`` (B, K, P, 2) and
  ``prompt_labels`` (B, K, P; -1 = padding) in the teacher frame, ``prompt_boxes`` (B, K, 4; NaN = none), the
  teacher's ``chosen_output`` (B, K) (which output it uses: 0 = single, 1..3 = multimask) and its logits as the
  store kept them: ``chosen_logits`` (B, K, m', m') (``--mask-outputs chosen``) or ``multi_logits`` (B, K, 3, m', m')
  + ``single_logits`` (B, K, 1, m', m') (``all``), m' the store's mask size (the loss resizes them to the decoder's);
  ``iou`` (B, K, 4), ``object_score`` (B, K), ``object_pointer`` (B, K, hidden);
* frames, ``memory``: ``object_valid`` (B, N), ``object_ids``, ``is_conditioning``, ``has_memory_conditioned``,
  ``mask_logits`` (B, N, m, m), ``object_score``, ``object_pointer``, ``maskmem_features`` (B, N, 64, g, g) and
  ``pix_feat_with_mem`` (B, N, hidden, g, g) (both codes on the device path, like the trunk); ``bank``: only what a
  later frame's memory reads (the ids and flags, ``object_pointer``, ``maskmem_features``); ``pointers``: the ids,
  flags and ``object_pointer`` alone (stage 2 reads the frames before a clip with these);
* ``gt``: ``gt_masks`` bool (B, K or N, m, m), the ground truth squashed to the mask logits' frame, and ``gt_valid``
  (B, K or N): which slots hold an object (the rest are padding).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from esam3.pipeline.store import Store
from esam3.pipeline.store.rows import StoreRows
from esam3.pipeline.store.snapshots import resolve
from esam3.schemas.codecs import FeatureCodec, logit_codes
from esam3.schemas.prompts import MaskOutputs
from esam3.schemas.rle import parse_counts
from esam3.schemas.store import StoreError, dataset_of, decode_tensor, encoded_of
from esam3.train.split import is_val
from esam3.workers.decode import teacher_input

FIELDS = {"images": ("input", "trunk", "prompts", "gt"), "frames": ("input", "trunk", "memory", "bank", "pointers", "gt")}
DEFAULT_FIELDS = {"images": ("input", "trunk", "prompts"), "frames": ("input", "trunk", "memory")}
_NEEDS_TARGET = {"trunk": "trunk", "prompts": "prompts", "memory": "memory", "bank": "memory", "pointers": "memory"}
#: Per-object columns of a frame row that each memory field reads: small values, then (N, C, g, g) maps.
_MEMORY_COLUMNS = {
    "memory": (("mask_logits", "object_score", "object_pointer"), ("maskmem_features", "pix_feat_with_mem")),
    "bank": (("object_pointer",), ("maskmem_features",)),  # what later frames' memory reads of a frame
    "pointers": (("object_pointer",), ()),
}
SPLITS = ("train", "val", "all")


class StoreDataset(Dataset):
    """Rows of one target table at one complete snapshot (see ``esam3.pipeline.store.snapshots``)."""

    def __init__(
        self,
        store: Store | str,
        table: str = "images",
        version: int | str | None = None,
        split: str = "train",
        val_percent: float = 0.0,
        fields: Sequence[str] | None = None,
        decode_on: str = "cpu",
        input_size: int | None = None,
        threads: int = 4,
    ) -> None:
        store = Store(store) if isinstance(store, str) else store
        if table not in FIELDS:
            raise ValueError(f"table must be images or frames, got {table!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if decode_on not in ("cpu", "device"):
            raise ValueError(f"decode_on must be cpu or device, got {decode_on!r}")
        if input_size is not None and input_size < 1:
            raise ValueError(f"input_size must be positive, got {input_size}")
        self.fields = tuple(DEFAULT_FIELDS[table] if fields is None else fields)
        unknown = set(self.fields) - set(FIELDS[table])
        if unknown:
            raise ValueError(f"fields {sorted(unknown)} are not in {table}; choose from {', '.join(FIELDS[table])}")
        card = store.require_card()
        self.spec = card["targets"].get(dataset_of(table))
        if self.spec is None:
            raise StoreError(f"store {store.uri} holds no {dataset_of(table)} rows ({table} is empty)")
        _check_store(store.uri, self.spec, self.fields)
        self.geometry = card["teacher"]["geometry"]
        self.table, self.split, self.val_percent = table, split, val_percent
        self.decode_on, self.input_size, self.threads = decode_on, input_size, threads
        self.version = resolve(store, table, version)
        self.store = store
        self.codec = FeatureCodec(self.spec["codec"])
        index_columns = ["key", "video_id", "frame"] if table == "frames" else ["key"]
        index = store.dataset(table, self.version).to_table(columns=index_columns)
        keys = index.column("key").to_pylist()
        if split == "all":
            chosen = np.arange(len(keys))
        else:
            val = np.fromiter((is_val(k, val_percent) for k in keys), dtype=bool, count=len(keys))
            chosen = np.flatnonzero(val if split == "val" else ~val)
        self.positions = chosen.astype(np.int64)
        self.keys = [keys[i] for i in chosen]
        if table == "frames":
            self.video_ids = [index.column("video_id")[int(i)].as_py() for i in chosen]
            self.frames = [index.column("frame")[int(i)].as_py() for i in chosen]
        self._rows: StoreRows | None = None

    # ---- plumbing ---------------------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        """What a spawned worker needs: settings and positions; it opens its own reader of the same version. The
        key lists (samplers' business, ~1 GB for SA-1B as Python strings) stay in the main process."""
        state = dict(self.__dict__)
        state.update(_rows=None, keys=None, video_ids=None, frames=None)
        return state

    @property
    def rows(self) -> StoreRows:
        if self._rows is None:
            self._rows = StoreRows(self.store, self.table, self.version, threads=self.threads)
        return self._rows

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int | Sequence[int]) -> dict[str, Any]:
        """A batch for a list of indices (0 .. len - 1), or one unbatched sample for an int."""
        if isinstance(index, (int, np.integer)):
            batch = self[[int(index)]]
            return {k: (v[0] if isinstance(v, (torch.Tensor, list)) else v) for k, v in batch.items()}
        indices = np.asarray(index, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"indices outside 0..{len(self) - 1} of the {self.split} split")
        positions = self.positions[indices]
        rows = self.rows.take(positions.tolist(), columns=self._columns())
        return self._collate(rows, positions)

    def _columns(self) -> list[str]:
        columns = ["key", "preprocess"]
        if "input" in self.fields:
            columns.append("input")
        if "trunk" in self.fields:
            columns.append("trunk")
        if "prompts" in self.fields:
            columns += [
                "prompt_kinds",
                "prompt_points",
                "prompt_labels",
                "prompt_boxes",
                *self._logit_maps(),
                "chosen_output",
                "iou",
                "object_score",
                "object_pointer",
            ]
        for field in self._memory_fields():
            values, maps = _MEMORY_COLUMNS[field]
            columns += ["object_ids", "is_conditioning", "has_memory_conditioned", *values, *maps]
        if "gt" in self.fields:
            columns.append("gt_masks")
        return list(dict.fromkeys(columns))

    # ---- collate ----------------------------------------------------------------------------------------

    def _collate(self, rows: list[dict[str, Any]], positions: np.ndarray) -> dict[str, Any]:
        out: dict[str, Any] = {"key": [r["key"] for r in rows], "position": torch.from_numpy(positions.copy())}
        transforms = [json.loads(r["preprocess"]) for r in rows]
        if "input" in self.fields:
            out["input"] = torch.stack(
                [teacher_input(r["input"]["codec"], r["input"]["data"], t, self.input_size) for r, t in zip(rows, transforms)]
            )
        if "trunk" in self.fields:
            out.update(self._features("trunk", [r["trunk"] for r in rows]))
        if "prompts" in self.fields:
            out.update(self._prompts(rows))
        for field in self._memory_fields()[:1]:  # the widest one asked for holds the others
            out.update(self._memory(rows, *_MEMORY_COLUMNS[field]))
        if "gt" in self.fields:
            slots = self.spec["prompts"]["num_prompts"] if self.table == "images" else self.spec["video"]["max_objects"]
            out["gt_masks"] = torch.from_numpy(np.stack([self._gt(r["gt_masks"], slots) for r in rows]))
            out["gt_valid"] = torch.from_numpy(np.stack([np.arange(slots) < len(r["gt_masks"]) for r in rows]))
        return out

    def _features(self, name: str, values: list[dict[str, Any]], slots: int | None = None) -> dict[str, torch.Tensor]:
        """Feature maps of B rows: float32 on the CPU, or the stored codes for :meth:`to_device`. ``slots`` pads
        per-object maps (N, C, g, g) to (slots, C, g, g)."""
        shapes = [tuple(v["shape"]) for v in values]
        inner = self._inner_shape(name)
        full = (len(values), *((slots,) if slots is not None else ()), *inner)
        codec = self.codec if name == "trunk" else (FeatureCodec.INT8 if self.codec == FeatureCodec.LOWRANK else self.codec)
        if self.decode_on == "cpu":
            out = np.zeros(full, dtype=np.float32)
            for b, v in enumerate(values):
                out[b, : shapes[b][0]] = self.rows.decode({"x": v}, "x")
            return {name: torch.from_numpy(out)}
        if codec in (FeatureCodec.FP16, FeatureCodec.BF16):  # 16-bit values as they are; widened on the device
            raw = np.zeros(full, dtype=np.uint16)
            for b, v in enumerate(values):
                raw[b, : shapes[b][0]] = np.frombuffer(v["data"], dtype=np.uint16).reshape(shapes[b])
            return {name: torch.from_numpy(raw.view(np.int16)).view(torch.float16 if codec == FeatureCodec.FP16 else torch.bfloat16)}
        scales_per_row = full[-3] if codec == FeatureCodec.INT8 else self._rank()
        code_shape = (*full[:-3], scales_per_row if codec == FeatureCodec.LOWRANK else full[-3], *full[-2:])
        codes = np.zeros(code_shape, dtype=np.int8)
        scales = np.zeros((*full[:-3], scales_per_row), dtype=np.float32)
        for b, v in enumerate(values):
            n = shapes[b][0] if slots is not None else None
            q = np.frombuffer(v["data"], dtype=np.int8).reshape(code_shape[1:] if n is None else (n, *code_shape[2:]))
            s = np.frombuffer(v["scale"], dtype=np.float32).reshape(scales.shape[1:] if n is None else (n, *scales.shape[2:]))
            codes[b, :n] = q
            scales[b, :n] = s
        return {f"{name}_codes": torch.from_numpy(codes), f"{name}_scales": torch.from_numpy(scales)}

    def _inner_shape(self, name: str) -> tuple[int, int, int]:
        g = self.geometry
        channels = {"trunk": g["trunk_width"], "maskmem_features": g["memory_channels"], "pix_feat_with_mem": g["hidden"]}[name]
        return channels, g["grid"], g["grid"]

    def _rank(self) -> int:
        basis = self.rows.basis()
        if basis is None:
            raise StoreError(f"store {self.store.uri}: lowrank rows but no basis file")
        return basis.rank

    def to_device(self, batch: dict[str, Any], device: torch.device | str, non_blocking: bool = True) -> dict[str, Any]:
        """Move a batch to ``device`` and decode the feature codes there (``decode_on="device"``) into float32."""
        out = {k: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        for key in [k for k in out if k.endswith("_codes")]:
            name = key[: -len("_codes")]
            codes, scales = out.pop(key).float(), out.pop(f"{name}_scales")
            if name == "trunk" and self.codec == FeatureCodec.LOWRANK:
                basis = self.rows.basis()
                mean = torch.from_numpy(basis.mean).to(device)
                components = torch.from_numpy(basis.components).to(device)
                coefficients = codes * scales[..., None, None]
                out[name] = torch.einsum("cr,brhw->bchw", components, coefficients) + mean[None, :, None, None]
            else:
                out[name] = codes * scales[..., None, None]
        for name in ("trunk", "maskmem_features", "pix_feat_with_mem"):
            if name in out and out[name].dtype in (torch.float16, torch.bfloat16):
                out[name] = out[name].float()
        return out

    def _logit_maps(self) -> dict[str, tuple[int, ...]]:
        """The prompt logits the store kept, by column: the maps per prompt ahead of (m', m')."""
        if self.spec["prompts"]["mask_outputs"] == MaskOutputs.CHOSEN.value:
            return {"chosen_logits": ()}
        return {"multi_logits": (3,), "single_logits": (1,)}

    @property
    def mask_size(self) -> int:
        """The side of the stored prompt logits (the decoder's own unless cached with ``--mask-size``)."""
        return self.spec["prompts"]["mask_size"] or self.geometry["mask_size"]

    def _prompts(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        g, p = self.geometry, self.spec["prompts"]
        b, k, points = len(rows), p["num_prompts"], 1 + p["max_negative_points"]
        m, hidden = self.mask_size, g["hidden"]
        logits = self._logit_maps()
        out = {
            "prompt_valid": np.zeros((b, k), bool),
            "prompt_kinds": np.full((b, k), -1, np.int64),
            "prompt_points": np.zeros((b, k, points, 2), np.float32),
            "prompt_labels": np.full((b, k, points), -1, np.int64),
            "prompt_boxes": np.full((b, k, 4), np.nan, np.float32),
            "chosen_output": np.zeros((b, k), np.int64),
            "iou": np.zeros((b, k, 4), np.float32),
            "object_score": np.zeros((b, k), np.float32),
            "object_pointer": np.zeros((b, k, hidden), np.float32),
        }
        for name, maps in logits.items():
            if self.decode_on == "device":  # int8 codes + a scale per map, dequantised by to_device
                out[f"{name}_codes"] = np.zeros((b, k, *maps, m, m), np.int8)
                out[f"{name}_scales"] = np.zeros((b, k, *maps), np.float32)
            else:
                out[name] = np.zeros((b, k, *maps, m, m), np.float32)
        for i, row in enumerate(rows):
            if row["prompt_kinds"] is None:
                continue
            n = row["prompt_kinds"]["shape"][0]
            out["prompt_valid"][i, :n] = True
            out["prompt_kinds"][i, :n] = decode_tensor(row["prompt_kinds"])
            given = decode_tensor(row["prompt_points"])
            out["prompt_points"][i, :n, : given.shape[1]] = given
            out["prompt_labels"][i, :n, : given.shape[1]] = decode_tensor(row["prompt_labels"])
            small = ("prompt_boxes", "chosen_output", "iou", "object_score", "object_pointer")
            for name in (*small, *(() if self.decode_on == "device" else logits)):
                out[name][i, :n] = decode_tensor(row[name])
            if self.decode_on == "device":
                for name in logits:
                    out[f"{name}_codes"][i, :n], out[f"{name}_scales"][i, :n] = logit_codes(encoded_of(row[name]))
        return {name: torch.from_numpy(value) for name, value in out.items()}

    def _memory_fields(self) -> list[str]:
        """The memory fields asked for, widest first."""
        return [f for f in _MEMORY_COLUMNS if f in self.fields]

    def _memory(self, rows: list[dict[str, Any]], values: Sequence[str], maps: Sequence[str]) -> dict[str, torch.Tensor]:
        g, n_max = self.geometry, self.spec["video"]["max_objects"]
        b, m, hidden = len(rows), g["mask_size"], g["hidden"]
        shapes = {"mask_logits": ((m, m), np.float32), "object_score": ((), np.float32), "object_pointer": ((hidden,), np.float32)}
        out = {
            "object_valid": np.zeros((b, n_max), bool),
            "object_ids": np.full((b, n_max), -1, np.int64),
            "is_conditioning": np.zeros((b, n_max), bool),
            "has_memory_conditioned": np.zeros((b, n_max), bool),
            **{name: np.zeros((b, n_max, *shapes[name][0]), shapes[name][1]) for name in values},
        }
        for i, row in enumerate(rows):
            n = len(row["object_ids"])
            out["object_valid"][i, :n] = True
            out["object_ids"][i, :n] = row["object_ids"]
            out["is_conditioning"][i, :n] = row["is_conditioning"]
            out["has_memory_conditioned"][i, :n] = row["has_memory_conditioned"]
            for name in values:
                out[name][i, :n] = decode_tensor(row[name])
        tensors = {name: torch.from_numpy(value) for name, value in out.items()}
        for name in maps:
            tensors.update(self._features(name, [r[name] for r in rows], slots=n_max))
        return tensors

    def _gt(self, masks: list[dict[str, Any]], slots: int) -> np.ndarray:
        """Ground-truth RLEs -> bool (slots, m, m): each mask squashed to the mask logits' frame, as SAM3 squashes images."""
        m = self.geometry["mask_size"]
        out = np.zeros((slots, m, m), dtype=bool)
        for j, rle in enumerate(masks[:slots]):
            dense = parse_counts(rle["counts"], rle["height"], rle["width"]).to_mask()
            tensor = torch.from_numpy(dense.astype(np.float32))[None, None]
            out[j] = (F.interpolate(tensor, size=(m, m), mode="bilinear", align_corners=False, antialias=True)[0, 0] >= 0.5).numpy()
        return out


def _check_store(uri: str, spec: dict[str, Any], fields: Sequence[str]) -> None:
    """Refuse, in one line naming the fix, a store that cannot give these fields."""
    if "input" in fields and spec.get("inputs") == "none":
        raise StoreError(
            f"store {uri} was cached with --inputs none: its rows hold no student input; re-cache with --inputs store "
            "(the default), or read targets only (fields without 'input') and bring your own input pipeline"
        )
    for field, target in _NEEDS_TARGET.items():
        if field in fields and target not in spec["targets"]:
            raise StoreError(
                f"store {uri} was cached without the {target} targets (--targets {','.join(spec['targets'])}); re-cache with them"
            )
    if "gt" in fields and spec["dataset"] == "sa-1b" and "prompts" not in spec["targets"]:
        raise StoreError(
            f"store {uri}: image rows hold the ground truth of their prompted objects, and it was cached without "
            "prompts; re-cache with --targets trunk,prompts"
        )


def make_loader(
    dataset: StoreDataset,
    sampler: Sampler[list[int]],
    workers: int = 2,
    prefetch: int = 2,
    pin_memory: bool | None = None,
) -> DataLoader:
    """A DataLoader over ``dataset`` batched by ``sampler``: ``workers`` spawned processes (Lance is not fork-safe),
    each prefetching ``prefetch`` batches; pinned memory when CUDA is there (unless told)."""
    if workers < 0 or prefetch < 1:
        raise ValueError(f"workers must be >= 0 and prefetch >= 1, got {workers}, {prefetch}")
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    options: dict[str, Any] = (
        {"multiprocessing_context": "spawn", "prefetch_factor": prefetch, "persistent_workers": True} if workers else {}
    )
    return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=workers, pin_memory=pin, **options)
