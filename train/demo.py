"""The demo's second half: a student trained from the demo store, evaluated, exported, and used on an image.

What a user does after ``esam3 cache``, on the demo's scale (the tiny teacher's 112-px frame): a few stage-1
steps (resumed, so a rerun of the demo adds nothing), eval on the held-out split, the export, COCO-format eval of
the exported model on the demo images, and one prediction drawn into a PNG.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from esam3.pipeline.demo_data import write_demo_coco
from esam3.pipeline.overlay import draw_segmentation
from esam3.schemas.train import Stage1Config
from esam3.train.evaluate import CocoEval, StoreEval, evaluate_coco, evaluate_store, load_image
from esam3.train.model import ExportReport, StudentModel
from esam3.train.loop import StepReport, TrainResult
from esam3.train.stage1 import run_stage1

DEMO_STUDENT = "es-rv-m"
DEMO_STEPS = 20


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
    config = Stage1Config(store=str(store), out=out / "stage1", student=DEMO_STUDENT, steps=DEMO_STEPS, batch_size=4, lr=2e-3,
                          val_percent=25, checkpoint_every=10, log_every=5, loader_workers=1, resume=True)
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
