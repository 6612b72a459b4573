"""``esam3 store show``: one stored row drawn on its image (or video frame), to see what the teacher said.

The pixels come from the row's ``input`` (the original JPEG, or the teacher's S x S frame scaled back to the
video's size); a store cached with ``--inputs none`` has none, and then the row's shard is read again from where
the ledger says it came from (or from ``--source``). SA-1B rows show the K prompts (positive clicks green, negative red, boxes yellow) and the
teacher's single-mask output for each (logit > 0) in its own colour; SA-V frame rows show each object's mask.
Teacher-frame coordinates are mapped back with the squash transform stored in the row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image

from esam3.pipeline.overlay import draw_prompts, overlay, with_legend
from esam3.pipeline.shards import DatasetName, select_shards
from esam3.pipeline.sources import SA1BSource, SAVSource
from esam3.pipeline.store import Store
from esam3.pipeline.store.commits import ledger_entries
from esam3.pipeline.store.root import quote_sql
from esam3.pipeline.store.rows import StoreRows
from esam3.schemas.errors import first_line
from esam3.schemas.prompts import PromptKind
from esam3.schemas.samples import Failure
from esam3.schemas.store import StoreError, decode_tensor


def find_row(store: Store, key: str) -> tuple[str, dict[str, Any]]:
    """(table, row) of ``key``; a clear error when no row has it."""
    table = "images" if key.startswith("sa1b/") else "frames" if key.startswith("sav/") else None
    if table is None:
        raise StoreError(f"key {key!r}: expected sa1b/<image_id> or sav/<video_id>/<frame:05d>")
    store.require_card()
    quoted = key.replace("'", "''")
    try:
        rows = StoreRows(store, table).where(f"key = '{quoted}'")
    except (OSError, pa.ArrowException) as exc:  # a data file gone, the server down: one line, not a traceback
        raise StoreError(f"store {store.uri}: cannot read {table} ({first_line(exc)})") from None
    if not rows:
        raise StoreError(f"store {store.uri} has no row with key {key!r} (see 'esam3 store info')")
    return table, rows[0]


def shard_source(store: Store, row: dict[str, Any], source: str | None) -> str:
    """The folder / URL holding the row's shard: ``source`` if given, else the one the ledger recorded."""
    if source:
        return source
    ledger = ledger_entries(store, f"shard = {quote_sql([row['shard']])}")
    if not ledger or not ledger[0].get("source"):
        raise StoreError(f"the ledger does not say where {row['shard']} came from; pass --source")
    return ledger[0]["source"].rsplit("/", 1)[0]


def _sample(store: Store, dataset: DatasetName, source: str, shard_name: str, key: str, **options: Any) -> Any:
    source_cls = SA1BSource if dataset == DatasetName.SA1B else SAVSource
    storage = store.s3.fsspec_options(source)
    reader = source_cls(source, storage, **options)
    shard = next((s for s in select_shards(source, dataset, "all", storage) if s.name == shard_name), None)
    if shard is None:
        raise StoreError(f"{shard_name} is not at {source}; pass --source with where the shards are now")
    for item in reader.iter_shard(shard):
        if not isinstance(item, Failure) and item.key == key:
            return item
    raise StoreError(f"{key} is not in {source}/{shard_name} any more")


def _mask_to_image(logits: np.ndarray, height: int, width: int) -> np.ndarray:
    """Low-res logits (m, m) in the squashed teacher frame -> bool (height, width) in the image."""
    tensor = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))[None, None]
    return (F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False)[0, 0] > 0).numpy()


def chosen_logits(row: dict[str, Any]) -> np.ndarray:
    """An image row's logits (K, m, m) of the output the tracker uses for each prompt, whichever layout it keeps."""
    if row["chosen_logits"]:
        return decode_tensor(row["chosen_logits"])
    if not row["single_logits"]:
        return np.zeros((0, 1, 1), np.float32)
    logits = np.concatenate([decode_tensor(row["single_logits"]), decode_tensor(row["multi_logits"])], axis=1)
    return logits[np.arange(len(logits)), decode_tensor(row["chosen_output"]).astype(np.int64)]


def show(store: Store, key: str, out: Path, source: str | None = None) -> dict[str, Any]:
    """Draw the row of ``key`` into ``out`` (PNG); returns what was drawn."""
    table, row = find_row(store, key)
    transform = json.loads(row["preprocess"])
    height, width = transform["original_height"], transform["original_width"]
    size = transform["size"]
    stored = row.get("input")
    if table == "images":
        if stored is not None:
            image = decode_tensor(stored)
        else:
            sample = _sample(store, DatasetName.SA1B, shard_source(store, row, source), row["shard"], key, check_pixels=False)
            image = np.asarray(simplejpeg.decode_jpeg(sample.jpeg, colorspace="RGB"))
        chosen = chosen_logits(row)
        picture = overlay(image, [_mask_to_image(m, height, width) for m in chosen])
        points = decode_tensor(row["prompt_points"]) if row["prompt_points"] else np.zeros((0, 0, 2))
        labels = decode_tensor(row["prompt_labels"]) if row["prompt_labels"] else np.zeros((0, 0))
        boxes = decode_tensor(row["prompt_boxes"]) if row["prompt_boxes"] else np.zeros((0, 4))
        scale = np.array([width / size, height / size])
        draw_prompts(picture, points * scale, labels, boxes * np.tile(scale, 2))
        kinds = decode_tensor(row["prompt_kinds"]) if row["prompt_kinds"] else np.zeros(0, np.int8)
        iou = decode_tensor(row["iou"])[:, 0] if row["iou"] else np.zeros(len(kinds))
        entries = [f"prompt {k}: {PromptKind(int(kind)).label}, teacher IoU {iou[k]:.2f}" for k, kind in enumerate(kinds)]
        picture = with_legend(
            picture,
            entries,
            "the teacher's mask (the output it uses) for each prompt; clicks: green = positive, red = negative; boxes: yellow",
        )
        drawn = {"prompts": int(len(points)), "masks": int(len(chosen))}
    else:
        if stored is not None:
            frame = np.asarray(Image.fromarray(decode_tensor(stored)).resize((width, height), Image.BILINEAR))
        else:
            sample = _sample(
                store, DatasetName.SAV, shard_source(store, row, source), row["shard"], key.rsplit("/", 1)[0], max_frames=row["frame"] + 1
            )
            frame = sample.frames[int(np.flatnonzero(sample.frame_indices == row["frame_index"])[0])]
        logits = decode_tensor(row["mask_logits"])
        picture = overlay(frame, [_mask_to_image(m, height, width) for m in logits])
        role = ["prompted here" if c else "tracked from memory" for c in row["is_conditioning"]]
        entries = [f"object {o}: {r}" for o, r in zip(row["object_ids"], role)]
        picture = with_legend(picture, entries, f"teacher's mask per object, frame {row['frame_index']}")
        drawn = {"objects": len(row["object_ids"]), "frame_index": row["frame_index"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out, format="PNG")
    return {"key": key, "out": str(out), "width": width, "height": height, **drawn}
