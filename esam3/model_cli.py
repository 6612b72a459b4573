"""``esam3 eval``, ``esam3 export`` and ``esam3 predict``: what to do with a trained student."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.table import Table
from rich.text import Text

from esam3.console import UsageError, console, human_bytes, print_json, user_errors
from esam3.schemas.train import Device

DEVICE_HELP = "Where to run: cpu or cuda (default: cuda if present)."


def _device(name: str | None) -> Any:
    """``--device`` (default: cuda when there is one) as a torch device, checked."""
    from esam3.workers.teacher import resolve_device

    if name is not None and name not in ("cpu", "cuda"):
        raise UsageError(f"--device: expected cpu or cuda, got {name!r}")
    return resolve_device(Device(name or "auto"))


def _load(checkpoint: Path | None, model: Path | None, device: Any, s3_endpoint: str | None = None) -> Any:
    """The student + heads (+ memory, from stage 2) from a training checkpoint (heads from its store) or an export folder."""
    from esam3.train.model import StudentModel
    from esam3.train.video_model import VideoStudentModel, is_video_checkpoint, is_video_export

    if (checkpoint is None) == (model is None):
        raise UsageError("give --checkpoint (a training run or checkpoint folder) or --model (an esam3 export folder), one of them")
    if checkpoint is not None:
        kind = VideoStudentModel if is_video_checkpoint(checkpoint) else StudentModel
        return kind.from_checkpoint(checkpoint, device=device, s3_endpoint=s3_endpoint)
    return (VideoStudentModel if is_video_export(model) else StudentModel).load(model, device)


def _parse_numbers(text: str, count: int, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != count or not all(np.isfinite(values)):
        raise UsageError(f"{flag}: expected {count} comma-separated numbers, got {text!r}")
    return values


def eval_command(
    checkpoint: Path = typer.Option(None, "--checkpoint", help="Training run folder (its newest checkpoint) or a checkpoint folder."),
    model: Path = typer.Option(None, "--model", help="Model folder written by esam3 export (instead of --checkpoint)."),
    store: str = typer.Option(None, "--store", help="Store to evaluate on (default: the one the student was trained on, at that version)."),
    split: str = typer.Option("val", "--split", help="Store split: val (held out by key hash), train or all."),
    val_percent: float = typer.Option(None, "--val-percent", help="Held-out share defining the split (default: the training run's)."),
    version: int = typer.Option(None, "--version", help="Store table version (a snapshot; default: the training run's, else the newest)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Images per batch."),
    coco_images: Path = typer.Option(None, "--coco-images", help="COCO-format eval: folder of the images."),
    coco_annotations: Path = typer.Option(
        None, "--coco-annotations", help="COCO-format eval: instances JSON (e.g. instances_val2017.json)."
    ),
    prompt: str = typer.Option(
        "box", "--prompt", help="COCO eval prompt per annotation: box (its GT box) or point (a click at its centre)."
    ),
    limit: int = typer.Option(None, "--limit", help="COCO / DAVIS / store video eval: only the first N images or videos."),
    davis: Path = typer.Option(
        None,
        "--davis",
        help="DAVIS-format folder (JPEGImages/<video>/*.jpg, Annotations/<video>/*.png) to score a stage-2 student's J&F on.",
    ),
    device: str = typer.Option(None, "--device", help=DEVICE_HELP),
    s3_endpoint: str = typer.Option(None, "--s3-endpoint", help="S3-compatible endpoint (http(s)://HOST:PORT) for an s3:// store."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON line."),
) -> None:
    """Quality of a student: on a store split (vs the teacher and the ground truth; J&F for a stage-2 student), COCO mIoU,
    or J&F on a DAVIS-format folder."""
    from esam3.train.evaluate import evaluate_coco, evaluate_store
    from esam3.train.video_eval import evaluate_davis, evaluate_video_store
    from esam3.train.video_model import VideoStudentModel

    with user_errors():
        if split not in ("val", "train", "all"):
            raise UsageError(f"--split: expected val, train or all, got {split!r}")
        if batch_size < 1 or (limit is not None and limit < 1):
            raise UsageError("--batch-size and --limit must be at least 1")
        if val_percent is not None and not 0 <= val_percent <= 100:
            raise UsageError(f"--val-percent: must be in 0..100, got {val_percent:g}")
        if (coco_images is None) != (coco_annotations is None):
            raise UsageError("COCO eval needs both --coco-images and --coco-annotations")
        if davis is not None and coco_images is not None:
            raise UsageError("give --davis or the COCO flags, not both")
        student = _load(checkpoint, model, _device(device), s3_endpoint)
        video = isinstance(student, VideoStudentModel)
        if davis is not None and not video:
            raise UsageError("--davis scores video tracking: give a stage-2 checkpoint or its export (esam3 train stage2)")
        if coco_images is not None:
            result: Any = evaluate_coco(student, coco_images, coco_annotations, prompt, limit)
        elif davis is not None:
            result = evaluate_davis(student, davis, limit)
        elif video:
            result = evaluate_video_store(student, store, version, split, val_percent, s3_endpoint=s3_endpoint, limit=limit)
        else:
            result = evaluate_store(student, store, version, split, val_percent, batch_size, s3_endpoint=s3_endpoint)
    if as_json:
        print_json(result.to_json())
        return
    if davis is not None or (video and coco_images is None):
        _print_video_eval(result, davis)
        return
    if coco_images is not None:
        console.print(
            Text(
                f"COCO mIoU ({result.prompt} prompts): {result.miou:.4f} over {result.annotations} objects in {result.images} images "
                f"({result.seconds_per_image * 1000:.0f} ms per image; {result.skipped_crowd} crowd annotations skipped)"
            )
        )
        return
    table = Table(
        title=Text(f"{result.split} split: {result.rows} rows, {result.prompts} prompts (store version {result.store_version})"),
        title_justify="left",
    )
    for column in ("prompt kind", "count", "mIoU vs teacher", "mIoU vs GT", "teacher mIoU vs GT", "IoU-score error"):
        table.add_column(column, justify="right")
    rows = [("all", result.prompts, result.miou_teacher, result.miou_gt, result.teacher_miou_gt, result.iou_score_error)]
    rows += [
        (kind, v["prompts"], v["miou_teacher"], v["miou_gt"], v["teacher_miou_gt"], v["iou_score_error"])
        for kind, v in result.per_kind.items()
    ]
    for kind, count, *values in rows:
        table.add_row(kind, str(count), *(f"{v:.4f}" for v in values))
    console.print(table)
    console.print(
        Text(f"features vs the teacher's trunk: MSE {result.feature_mse:.4g} (summed over channels), cosine {result.feature_cosine:.4f}")
    )


def _print_video_eval(result: Any, davis: Path | None) -> None:
    def jf(values: dict[str, float]) -> str:
        return f"J&F {values['J&F']:.4f} (J {values['J']:.4f}, F {values['F']:.4f}; {values['objects']} objects, {values['frames']} frames)"

    if davis is not None:
        console.print(Text(f"DAVIS {davis}: {jf(result.jf)} over {result.videos} videos; {result.ms_per_frame:.1f} ms per frame"))
        return
    console.print(
        Text(
            f"{result.split} split: {result.videos} videos, {result.objects} objects, {result.frames} frames (store version {result.store_version})"
        )
    )
    console.print(Text(f"student vs ground truth: {jf(result.jf_gt)}"))
    console.print(Text(f"student vs the teacher's masks: {jf(result.jf_teacher)}"))
    console.print(Text(f"the teacher vs ground truth (for scale): {jf(result.teacher_jf_gt)}"))
    console.print(
        Text(f"memory-conditioned map vs the teacher's: cosine {result.memory_cosine:.4f}; {result.ms_per_frame:.1f} ms per frame")
    )


def export_command(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Training run folder (its newest checkpoint) or a checkpoint folder."),
    out: Path = typer.Option(..., "--out", help="Model folder to write: model.safetensors + config.json."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON line."),
) -> None:
    """One safetensors model (student encoder + tracker heads) + its config; loads without the store or the teacher."""
    with user_errors():
        student = _load(checkpoint, None, "cpu")
        report = student.save(out)
    from esam3.workers.teacher_loading import architecture_parameters

    teacher_parameters = (student.provenance["store"].get("teacher_parameters") or {}).get("total")
    sam3_parameters = architecture_parameters("full-random")
    if as_json:
        print_json(
            {
                "out": str(report.out),
                "bytes": report.bytes,
                "parameters": report.parameters,
                "student_parameters": report.student_parameters,
                "heads_parameters": report.heads_parameters,
                "teacher_parameters": teacher_parameters,
                "sam3_parameters": sam3_parameters,
            }
        )
        return
    table = Table(title=Text(f"exported to {report.out}"), title_justify="left")
    for column in ("", "parameters", "size (fp32)"):
        table.add_column(column, justify="right")
    table.add_row("student model (encoder + tracker heads)", f"{report.parameters / 1e6:.2f}M", human_bytes(report.bytes))
    table.add_row("  of which the encoder", f"{report.student_parameters / 1e6:.2f}M", human_bytes(4 * report.student_parameters))
    if teacher_parameters:
        table.add_row("the store's teacher", f"{teacher_parameters / 1e6:.2f}M", human_bytes(4 * teacher_parameters))
    table.add_row("SAM3 (its architecture, counted)", f"{sam3_parameters / 1e6:.2f}M", human_bytes(4 * sam3_parameters))
    console.print(table)
    console.print(Text(f"the student model is {report.parameters / sam3_parameters:.1%} of SAM3's parameters"))


def predict_command(
    model: Path = typer.Option(..., "--model", help="Model folder written by esam3 export."),
    image: Path = typer.Option(None, "--image", help="JPEG or PNG image to segment."),
    video: Path = typer.Option(
        None, "--video", help="Video (e.g. MP4) to track objects through, from their prompts on its first frame (a stage-2 model)."
    ),
    point: list[str] = typer.Option(
        None, "--point", help="A click x,y in image (first-frame) pixels: one object per --point (repeatable)."
    ),
    box: list[str] = typer.Option(
        None, "--box", help="A box x0,y0,x1,y1 in image (first-frame) pixels: one object per --box (repeatable)."
    ),
    mask: Path = typer.Option(
        None, "--mask", help="--video: a PNG of the first frame's objects (palette or grey: each non-zero value one object; 255 ignored)."
    ),
    out: Path = typer.Option(
        None, "--out", help="PNG to write: the image (or a strip of video frames) with each mask tinted and the prompts drawn."
    ),
    max_frames: int = typer.Option(None, "--max-frames", help="--video: track only the first N frames (default: all)."),
    strip: int = typer.Option(None, "--strip", help="--video: frames drawn into the --out strip, evenly spaced (default 8)."),
    vs_sam3: bool = typer.Option(
        False,
        "--vs-sam3",
        help="--video: also time SAM3's tracker per frame at the same input size (random weights, trunk included; about a minute per frame on a CPU at full size).",
    ),
    repeats: int = typer.Option(
        None, "--repeats", help="--image: timed runs after one warm-up; the median is the latency printed (default 3)."
    ),
    device: str = typer.Option(None, "--device", help=DEVICE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON line with each mask as COCO RLE (per frame for a video)."),
) -> None:
    """Segment objects in an image, or track them through a video, with an exported student (--out PNG and / or --json RLE)."""
    from pycocotools import mask as mask_utils

    from esam3.pipeline.overlay import draw_segmentation
    from esam3.train.evaluate import load_image

    with user_errors():
        if (image is None) == (video is None):
            raise UsageError("give --image (segment) or --video (track), one of them")
        if video is None and mask is not None:
            raise UsageError("--mask prompts a video's first frame; for an image give --point or --box")
        wrong = [
            flag
            for flag, value, video_only in (
                ("--strip", strip, True),
                ("--max-frames", max_frames, True),
                ("--vs-sam3", vs_sam3 or None, True),
                ("--repeats", repeats, False),
            )
            if value is not None and video_only == (video is None)
        ]
        if wrong:
            raise UsageError(f"{', '.join(wrong)}: only with {'--video' if video is None else '--image'}")
        strip, repeats = 8 if strip is None else strip, 3 if repeats is None else repeats
        if not point and not box and mask is None:
            raise UsageError("give at least one --point x,y or --box x0,y0,x1,y1" + (" or a --mask PNG" if video else ""))
        for flag, value in (("--repeats", repeats), ("--strip", strip), ("--max-frames", max_frames)):
            if value is not None and value < 1:
                raise UsageError(f"{flag} must be at least 1")
        if out is None and not as_json:
            raise UsageError("give --out overlay.png, --json, or both")
        points = np.array([_parse_numbers(p, 2, "--point") for p in point or []], np.float32).reshape(-1, 2)
        boxes = np.array([_parse_numbers(b, 4, "--box") for b in box or []], np.float32).reshape(-1, 4)
        if len(boxes) and ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any():
            raise UsageError("--box: expected x0,y0,x1,y1 with x1 > x0 and y1 > y0")
        student = _load(None, model, _device(device))
        if video is not None:
            _predict_video(student, video, points, boxes, mask, out, max_frames, strip, as_json, vs_sam3)
            return
        pixels = load_image(image)
        student.segment(pixels, points, boxes)  # warm-up
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            result = student.segment(pixels, points, boxes)
            times.append(time.perf_counter() - started)
    latency = float(np.median(times))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        draw_segmentation(pixels, result.masks, points, boxes).save(out, format="PNG")
    prompts = [{"point": p.tolist()} for p in points] + [{"box": b.tolist()} for b in boxes]
    if as_json:
        masks = []
        for prompt, mask, score in zip(prompts, result.masks, result.scores):
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            masks.append(
                {
                    **prompt,
                    "score": float(score),
                    "area": int(mask.sum()),
                    "rle": {"size": list(rle["size"]), "counts": rle["counts"].decode()},
                }
            )
        print_json(
            {
                "image": str(image),
                "height": pixels.shape[0],
                "width": pixels.shape[1],
                "latency_ms": 1000 * latency,
                "device": str(next(student.parameters()).device),
                "out": str(out) if out else None,
                "masks": masks,
            }
        )
        return
    for prompt, mask, score in zip(prompts, result.masks, result.scores):
        console.print(Text(f"{prompt}: {int(mask.sum())} pixels, predicted IoU {score:.3f}"))
    console.print(
        Text(
            f"{len(prompts)} mask(s) drawn into {out}; {1000 * latency:.1f} ms per image on "
            f"{next(student.parameters()).device} ({pixels.shape[1]}x{pixels.shape[0]}, median of {repeats})"
        )
    )


def _predict_video(
    student: Any,
    video: Path,
    points: np.ndarray,
    boxes: np.ndarray,
    mask: Path | None,
    out: Path | None,
    max_frames: int | None,
    strip: int,
    as_json: bool,
    vs_sam3: bool,
) -> None:
    """``predict --video``: track each prompted object from the first frame; a strip of frames and / or RLE per frame.
    Frames are squashed as they are decoded (the full-size video is never held); the strip's frames are read again."""
    from pycocotools import mask as mask_utils

    from esam3.pipeline.overlay import draw_video_strip, strip_indices
    from esam3.train.video_eval import elapsed, read_palette_mask
    from esam3.train.video_model import VideoStudentModel, first_frame_prompts, read_video
    from esam3.workers.teacher_loading import architecture_parameters

    if not isinstance(student, VideoStudentModel):
        raise UsageError("--video needs a stage-2 model (esam3 train stage2, then esam3 export); this one segments images only")
    pixels, (height, width), _ = read_video(video, student.student.spec.image_size, max_frames)
    labels = None if mask is None else read_palette_mask(mask, "--mask takes")
    if labels is not None and labels.shape != (height, width):
        raise UsageError(
            f"--mask {mask} is {labels.shape[1]}x{labels.shape[0]} but the video is {width}x{height}; draw it on the first frame at its size"
        )
    prompts, names = first_frame_prompts((height, width), student.image_size, points, boxes, labels)
    if not prompts:
        raise UsageError(f"--mask {mask} marks no object (every pixel is 0 or 255)")
    device = next(student.parameters()).device
    started = time.perf_counter()
    tracks = student.track(pixels, prompts)
    frames = len(pixels)
    ms = 1000 * elapsed(started, device) / frames
    if out is not None:
        chosen = set(strip_indices(frames, strip))
        _, _, kept = read_video(video, 1, max(chosen) + 1, keep=lambda t: t in chosen)
        out.parent.mkdir(parents=True, exist_ok=True)
        draw_video_strip(kept, {t: tracks.frame_masks(t, height, width) for t in kept}, points, boxes).save(out, format="PNG")
    parameters = sum(
        p.numel()
        for part in (student.student, student.heads.tracker_model, student.heads.tracker_neck, student.memory)
        for p in part.parameters()
    )
    sam3 = architecture_parameters("full-random")
    sam3_ms = None
    if vs_sam3:
        from esam3.train.video_cost import sam3_frame_ms

        sam3_ms = sam3_frame_ms(student.heads.config, student.memory.spec, device=device) * len(prompts)
    if as_json:
        objects: list[dict[str, Any]] = [{"prompt": name, "masks": []} for name in names]
        for t in range(frames):
            for j, m in enumerate(tracks.frame_masks(t, height, width)):
                rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                objects[j]["masks"].append({"size": list(rle["size"]), "counts": rle["counts"].decode(), "area": int(m.sum())})
        print_json(
            {
                "video": str(video),
                "frames": frames,
                "height": height,
                "width": width,
                "ms_per_frame": ms,
                "sam3_ms_per_frame": sam3_ms,
                "parameters": parameters,
                "sam3_parameters": sam3,
                "out": str(out) if out else None,
                "objects": objects,
            }
        )
        return
    seen = np.zeros(len(names), int)
    for t in range(frames):
        seen += tracks.frame_masks(t, height, width).any(axis=(1, 2))
    for name, count in zip(names, seen.tolist()):
        console.print(Text(f"{name}: on {count} of {frames} frames"))
    console.print(
        Text(
            f"{len(names)} object(s) tracked through {frames} frames ({width}x{height}): {ms:.1f} ms per frame on {device}, all objects"
            + (
                f"; SAM3's tracker at the same input size ({student.image_size} px, random weights, on {device}): {sam3_ms:.1f} ms per frame "
                f"for {len(names)} object(s)"
                if sam3_ms is not None
                else ""
            )
            + f"; {parameters / 1e6:.2f}M parameters in this model (SAM3 in all: {sam3 / 1e6:.1f}M)"
            + (f"; strip in {out}" if out else "")
        )
    )
