"""The demo's second half: students trained from the demo store, evaluated, exported, and used.

What a user does after ``esam3 cache``, on the demo's scale (the tiny teacher's 112-px frame): a few stage-1
steps (resumed, so a rerun of the demo adds nothing), eval on the held-out split, the export, COCO-format eval of
the exported model on the demo images, and one prediction drawn into a PNG; then a few stage-2 steps on the demo
videos from that encoder, J&F on them, the export of the video student and a tracked strip of a demo video.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from esam3.pipeline.demo_data import write_demo_coco
from esam3.pipeline.overlay import draw_segmentation, draw_video_strip, strip_indices
from esam3.schemas.train import Stage1Config, Stage2Config
from esam3.train.evaluate import CocoEval, StoreEval, evaluate_coco, evaluate_store, load_image
from esam3.train.loop import StepReport, TrainResult
from esam3.train.memory import describe
from esam3.train.model import ExportReport, StudentModel
from esam3.train.stage1 import run_stage1
from esam3.train.stage2 import run_stage2
from esam3.train.video_cost import sam3_frame_ms
from esam3.train.video_eval import VideoEval, evaluate_video_store
from esam3.train.video_model import VideoStudentModel, first_frame_prompts, read_video

DEMO_STUDENT = "es-rv-m"
DEMO_STEPS = 20
DEMO_STAGE2_STEPS = 10


@dataclass
class StudentDemo:
    train: TrainResult
    eval: StoreEval
    export: ExportReport
    coco: CocoEval
    picture: Path
    predict_ms: float


def demo_student(store: Path, sa1b: Path, out: Path, on_step: Callable[[StepReport], None] | None = None) -> StudentDemo:
    """Train ``DEMO_STEPS`` stage-1 steps from ``store`` into ``out/stage1``, then eval, export to ``out/model``,
    COCO-eval on the demo images (``out/coco``) and draw one prediction into ``out/predict.png``."""
    config = Stage1Config(
        store=str(store),
        out=out / "stage1",
        student=DEMO_STUDENT,
        steps=DEMO_STEPS,
        batch_size=4,
        lr=2e-3,
        val_percent=25,
        checkpoint_every=10,
        log_every=5,
        loader_workers=1,
        resume=True,
    )
    trained = run_stage1(config, on_step=on_step)
    student = StudentModel.from_checkpoint(config.out)
    report = evaluate_store(student, split="val")
    exported = student.save(out / "model")
    model = StudentModel.load(out / "model")
    images, annotations = write_demo_coco(sa1b, out / "coco")
    coco = evaluate_coco(model, images, annotations, "box")
    picture = sorted(images.iterdir())[0]
    pixels = load_image(picture)
    height, width = pixels.shape[:2]
    points = np.array([[width * 0.5, height * 0.5]], np.float32)
    boxes = np.array([[width * 0.1, height * 0.1, width * 0.45, height * 0.6]], np.float32)
    model.segment(pixels, points, boxes)  # warm-up
    started = time.perf_counter()
    result = model.segment(pixels, points, boxes)
    predict_ms = 1000 * (time.perf_counter() - started)
    draw_segmentation(pixels, result.masks, points, boxes).save(out / "predict.png", format="PNG")
    return StudentDemo(trained, report, exported, coco, out / "predict.png", predict_ms)


@dataclass
class VideoDemo:
    train: TrainResult
    eval: VideoEval
    export: ExportReport
    memory: str  # the memory's description (latents, tokens per frame, parameters)
    strip: Path
    ms_per_frame: float
    frames: int
    sam3_ms_per_frame: float  # SAM3's tracker at the same (tiny) input size, random weights


def demo_video_student(store: Path, sav: Path, out: Path, on_step: Callable[[StepReport], None] | None = None) -> VideoDemo:
    """Train ``DEMO_STAGE2_STEPS`` stage-2 steps from ``out/stage1`` into ``out/stage2``, J&F on the demo's videos,
    export to ``out/video-model`` and track the first demo video's objects (from its first frame's masks) into
    ``out/predict-video.png`` (the same calls as ``esam3 predict --video``)."""
    config = Stage2Config(
        store=str(store),
        out=out / "stage2",
        init=out / "stage1",
        steps=DEMO_STAGE2_STEPS,
        batch_size=2,
        clip_length=4,
        val_percent=0,
        global_latents=16,
        memory_ffn=512,
        lr=1e-3,
        checkpoint_every=5,
        log_every=5,
        loader_workers=1,
        resume=True,
    )
    trained = run_stage2(config, on_step=on_step)
    student = VideoStudentModel.from_checkpoint(config.out)
    report = evaluate_video_store(student, split="all")  # the demo has 2 videos: both are trained on and scored
    exported = student.save(out / "video-model")
    model = VideoStudentModel.load(out / "video-model")
    video, labels = _first_demo_video(sav, out / "video")
    pixels, size, frames = read_video(video, model.student.spec.image_size, keep=lambda t: True)  # the demo video is short
    prompts, _ = first_frame_prompts(size, model.image_size, np.zeros((0, 2)), np.zeros((0, 4)), labels)
    started = time.perf_counter()
    tracks = model.track(pixels, prompts)
    ms = 1000 * (time.perf_counter() - started) / len(pixels)
    chosen = {t: frames[t] for t in strip_indices(len(pixels), 8)}
    draw_video_strip(chosen, {t: tracks.frame_masks(t, *size) for t in chosen}, np.zeros((0, 2)), np.zeros((0, 4))).save(
        out / "predict-video.png", format="PNG"
    )
    sam3 = sam3_frame_ms(model.heads.config, model.memory.spec) * len(prompts)  # SAM3 tracks each object on its own
    return VideoDemo(trained, report, exported, describe(model.memory.spec), out / "predict-video.png", ms, len(pixels), sam3)


def _first_demo_video(sav: Path, out: Path) -> tuple[Path, np.ndarray]:
    """The first demo video as an MP4 file, and its first frame's objects as a label image (object k = k + 1)."""
    import tarfile

    from esam3.pipeline.sources import SAVSource

    sample = next(iter(SAVSource(str(sav)).iter_samples("all")))
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sav / sample.shard) as tar:
        video = out / Path(sample.member).name
        video.write_bytes(tar.extractfile(sample.member).read())  # type: ignore[union-attr]
    labels = np.zeros(sample.frames.shape[1:3], np.uint8)
    for k, runs in enumerate(sample.masks[0]):
        labels[runs.to_mask().astype(bool)] = k + 1
    return video, labels
