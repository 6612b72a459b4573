"""Evaluation of a stage-1 student: on a store's validation split, and on COCO-format data.

Store eval (``esam3 eval --checkpoint``): feature MSE (as trained: summed over channels, averaged over tokens) and
cosine against the cached trunk; for every cached prompt, the IoU of the student's mask (logits > 0, m x m; the
output its own IoU scores choose, as when it is used) with the teacher's chosen mask and with the ground truth, per prompt kind; the teacher's own IoU with the ground
truth on the same prompts, for scale; and the IoU-score error.

COCO eval (``esam3 eval --model --coco-images --coco-annotations``): the metric EfficientSAM3 reports. Each
non-crowd annotation is one prompt: its GT box, or one click at its centre (the box centre if it lies on the
object, else the object's pixel nearest to it); the chosen mask, upsampled to the image, against the GT mask;
mIoU is the mean over annotations. Annotations whose mask is empty are skipped (counted), as no prompt can name them.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from esam3.pipeline.object_store import S3Settings
from esam3.pipeline.store import Store
from esam3.schemas.prompts import PromptKind
from esam3.schemas.train import TrainingInputError
from esam3.train.losses import chosen_prompts, decode_batch, feature_terms, teacher_outputs
from esam3.train.model import StudentModel
from esam3.train.reader import StoreDataset, make_loader
from esam3.train.sampler import EpochSampler
from esam3.workers.task_error import mask_iou


class EvalError(TrainingInputError):
    """An evaluation that cannot run as asked (the message names the fix)."""


@dataclass
class StoreEval:
    split: str
    rows: int
    prompts: int
    feature_mse: float
    feature_cosine: float
    miou_teacher: float  # student's mask vs the teacher's
    miou_gt: float  # student's mask vs ground truth
    teacher_miou_gt: float  # the teacher's mask vs ground truth, for scale
    iou_score_error: float  # mean |student's predicted IoU - teacher's| of the chosen output
    per_kind: dict[str, dict[str, float]] = field(default_factory=dict)
    store_version: int = 0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def eval_source(
    model: StudentModel,
    store_uri: str | None,
    version: int | None,
    val_percent: float | None,
    s3_endpoint: str | None,
) -> tuple[Store, str, int | None, float]:
    """The store, its URI, version and held-out share to evaluate on: as given, else the ones the model was trained on."""
    trained = model.provenance.get("store", {})
    uri = store_uri or trained.get("uri")
    if uri is None:
        raise EvalError("this model does not say which store it was trained on; pass --store")
    if version is None and uri == trained.get("uri"):
        version = trained.get("version")
    percent = val_percent if val_percent is not None else float(model.provenance.get("config", {}).get("val_percent", 0.0))
    return Store(uri, S3Settings.from_environment(s3_endpoint)), uri, version, percent


def evaluate_store(
    model: StudentModel,
    store_uri: str | None = None,
    version: int | None = None,
    split: str = "val",
    val_percent: float | None = None,
    batch_size: int = 8,
    workers: int = 0,
    s3_endpoint: str | None = None,
) -> StoreEval:
    """Evaluate on a store split (by default the one the checkpoint was trained from, at its version)."""
    store, uri, version, percent = eval_source(model, store_uri, version, val_percent, s3_endpoint)
    device = next(model.parameters()).device
    dataset = StoreDataset(
        store,
        "images",
        version=version,
        split=split,
        val_percent=percent,
        fields=("input", "trunk", "prompts", "gt"),
        decode_on="device" if device.type == "cuda" else "cpu",
        input_size=model.student.spec.image_size if model.student.spec.image_size != model.image_size else None,
    )
    if len(dataset) == 0:
        raise EvalError(
            f"the {split} split of {uri} is empty (--val-percent {percent:g}); pass --split all, or a --val-percent that holds rows out"
        )
    sampler = EpochSampler(len(dataset), batch_size, shuffle=False)
    sums: dict[str, float] = defaultdict(float)
    kinds: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    with torch.no_grad():
        for batch in make_loader(dataset, sampler, workers=workers):
            batch = dataset.to_device(batch, device)
            trunk = model.trunk(batch["input"]).float()
            rows = len(batch["key"])
            for name, value in feature_terms(trunk, batch["trunk"]).items():
                sums[name] += float(value) * rows
            outputs = decode_batch(model.heads, trunk, batch, chosen_prompts(batch["prompt_valid"], None, None), own_pick=True)
            if len(outputs.image) == 0:
                continue
            teacher_logits, teacher_iou = teacher_outputs(batch, outputs)
            r = torch.arange(len(outputs.pick), device=outputs.pick.device)
            student_mask, teacher_mask = outputs.chosen > 0, teacher_logits > 0
            gt = batch["gt_masks"][outputs.image, outputs.slot]
            values = {
                "miou_teacher": mask_iou(student_mask, teacher_mask),
                "miou_gt": mask_iou(student_mask, gt),
                "teacher_miou_gt": mask_iou(teacher_mask, gt),
                "iou_score_error": (outputs.iou[r, outputs.pick] - teacher_iou[r, outputs.pick]).abs(),
            }
            kind_of = batch["prompt_kinds"][outputs.image, outputs.slot].cpu().tolist()
            for name, per_prompt in values.items():
                for kind, value in zip(kind_of, per_prompt.float().cpu().tolist()):
                    kinds[PromptKind(kind).label][name].append(value)
    every = {
        name: [v for per_kind in kinds.values() for v in per_kind[name]]
        for name in ("miou_teacher", "miou_gt", "teacher_miou_gt", "iou_score_error")
    }
    prompts = len(every["miou_teacher"])
    mean = lambda values: float(np.mean(values)) if values else float("nan")  # noqa: E731
    return StoreEval(
        split=split,
        rows=len(dataset),
        prompts=prompts,
        feature_mse=sums["mse"] / len(dataset),
        feature_cosine=1.0 - sums["cosine"] / len(dataset),
        **{name: mean(values) for name, values in every.items()},
        per_kind={
            kind: {name: mean(v) for name, v in values.items()} | {"prompts": len(values["miou_teacher"])}
            for kind, values in sorted(kinds.items())
        },
        store_version=dataset.version,
    )


# ---- COCO -------------------------------------------------------------------------------------------------


@dataclass
class CocoEval:
    prompt: str
    images: int
    annotations: int
    miou: float
    seconds_per_image: float  # encoder + decoding every prompt of an image, on this device (after the first image)
    skipped_crowd: int = 0
    skipped_empty: int = 0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def centre_click(mask: np.ndarray, box: tuple[float, float, float, float]) -> tuple[float, float]:
    """The box centre if the object covers it, else the object's pixel (centre) nearest to it."""
    x, y, w, h = box
    cx, cy = x + w / 2, y + h / 2
    row, col = min(int(cy), mask.shape[0] - 1), min(int(cx), mask.shape[1] - 1)
    if mask[row, col]:
        return cx, cy
    ys, xs = np.nonzero(mask)
    nearest = int(np.argmin((xs + 0.5 - cx) ** 2 + (ys + 0.5 - cy) ** 2))
    return float(xs[nearest]) + 0.5, float(ys[nearest]) + 0.5


def load_image(path: Path) -> np.ndarray:
    """An RGB uint8 (H, W, 3) image from a JPEG / PNG file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))  # a writable copy (torch refuses read-only buffers)
    except (OSError, UnidentifiedImageError) as exc:
        raise EvalError(f"{path}: not a readable image ({exc})") from None


def evaluate_coco(model: StudentModel, images: Path, annotations: Path, prompt: str = "box", limit: int | None = None) -> CocoEval:
    """mIoU of the chosen mask per non-crowd annotation, prompted by its GT box or a centre click."""
    if prompt not in ("box", "point"):
        raise EvalError(f"--prompt must be box or point, got {prompt!r}")
    try:
        document = json.loads(annotations.read_text())
        by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for annotation in document["annotations"]:
            by_image[int(annotation["image_id"])].append(annotation)
        entries = [image for image in document["images"] if int(image["id"]) in by_image]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise EvalError(f"{annotations}: not a COCO instances file ({exc})") from None
    if limit is not None:
        entries = entries[:limit]
    ious: list[float] = []
    crowd = empty = 0
    timings: list[float] = []
    for entry in entries:
        path = images / entry["file_name"]
        if not path.is_file():
            raise EvalError(f"{path}: missing (image {entry['id']} of {annotations}); is --coco-images the right folder?")
        image = load_image(path)
        height, width = image.shape[:2]
        listed = [a for a in by_image[int(entry["id"])] if not a.get("iscrowd", 0)]
        crowd += len(by_image[int(entry["id"])]) - len(listed)
        objects, gts = [], []
        for annotation in listed:
            gt = _gt_mask(annotation, height, width, annotations)
            if gt.any():
                objects.append(annotation)
                gts.append(gt)
        empty += len(listed) - len(objects)
        if not objects:
            continue
        started = time.perf_counter()
        if prompt == "box":
            boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in objects])
            result = model.segment(image, boxes=boxes)
        else:
            clicks = np.array([centre_click(gt, tuple(a["bbox"])) for a, gt in zip(objects, gts)])
            result = model.segment(image, points=clicks)
        timings.append(time.perf_counter() - started)
        ious += mask_iou(torch.from_numpy(result.masks), torch.from_numpy(np.stack(gts))).tolist()
    if not ious:
        raise EvalError(f"{annotations}: no non-crowd annotation to evaluate")
    per_image = float(np.mean(timings[1:] if len(timings) > 1 else timings))  # the first image warms the model up
    return CocoEval(prompt, len(entries), len(ious), float(np.mean(ious)), per_image, crowd, empty)


def _gt_mask(annotation: dict[str, Any], height: int, width: int, source: Path) -> np.ndarray:
    """An annotation's mask: polygons, uncompressed RLE (counts as a list) or compressed RLE."""
    from pycocotools import mask as mask_utils

    segmentation = annotation.get("segmentation")
    try:
        if isinstance(segmentation, list) or isinstance(segmentation.get("counts"), list):
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = {
                **segmentation,
                "counts": segmentation["counts"].encode() if isinstance(segmentation["counts"], str) else segmentation["counts"],
            }
        rle = mask_utils.merge(rle) if isinstance(rle, list) else rle
        return mask_utils.decode(rle).astype(bool)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise EvalError(f"{source}: annotation {annotation.get('id')} has no readable segmentation ({exc})") from None
