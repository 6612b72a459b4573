"""The prompt sampler: points inside masks, bounded box jitter, determinism, the squash mapping, the skip rule."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from esam3.pipeline.demo_data import encode_rle
from esam3.pipeline.sources import SA1BSource
from esam3.schemas.prompts import PromptConfig, PromptKind
from esam3.schemas.rle import Runs, parse_counts
from esam3.workers.prompts import PAD, prompt_rng, sample_prompts, to_model_frame

MODEL = 1008  # SAM3's frame at full size; the sampler takes it as an argument


def _runs(mask: np.ndarray) -> Runs:
    rle = encode_rle(mask)
    return parse_counts(rle["counts"], *rle["size"])


@pytest.fixture(scope="module")
def images(demo_root: Path) -> list:
    return list(SA1BSource(str(demo_root / "sa-1b")).iter_samples("all"))


def _sample(image, **overrides):
    config = PromptConfig(**{"num_prompts": 64, **overrides})
    return sample_prompts(image.key, image.masks, (image.record.image.height, image.record.image.width), MODEL, config)


def test_points_boxes_and_kinds(images) -> None:
    seen_kinds, negatives = set(), 0
    for image in images:
        prompts = _sample(image, max_negative_points=3, box_jitter=0.1, box_jitter_max_px=6)
        height, width = image.record.image.height, image.record.image.width
        assert len(prompts) >= 3 and len(set(prompts.mask_index.tolist())) == len(prompts)
        for i in range(len(prompts)):
            mask = image.masks[prompts.mask_index[i]].to_mask()
            kind = PromptKind(int(prompts.kinds[i]))
            seen_kinds.add(kind)
            has_points = kind in (PromptKind.POINT, PromptKind.POINT_BOX)
            has_box = kind in (PromptKind.BOX, PromptKind.POINT_BOX)
            labels = prompts.labels[i]
            assert (labels[0] == 1) == has_points
            for (x, y), label in zip(prompts.points[i], labels):
                if label == PAD:
                    continue
                assert 0 <= x < width and 0 <= y < height
                assert mask[int(y), int(x)] == (label == 1)
                negatives += int(label == 0)
            if has_box:
                tight = np.array(image.masks[prompts.mask_index[i]].bbox_xyxy(), dtype=float)
                box = prompts.boxes[i]
                assert np.all(np.abs(box - tight) <= 6 + 1e-4), (box, tight)
                assert 0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height
            else:
                assert np.isnan(prompts.boxes[i]).all()
            if not has_points:
                assert (labels == PAD).all()
    assert seen_kinds == set(PromptKind)
    assert negatives > 0


def test_without_jitter_box_is_tight_and_contains_mask(images) -> None:
    image = images[0]
    prompts = _sample(image, mix={"box": 1.0}, box_jitter=0.0)
    for index, box in zip(prompts.mask_index, prompts.boxes):
        mask = image.masks[index].to_mask()
        rows, cols = np.nonzero(mask)
        assert box.tolist() == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]


def test_deterministic_per_key_and_seed(images) -> None:
    a, b = _sample(images[1]), _sample(images[1])
    for field in ("mask_index", "kinds", "points", "labels", "boxes", "points_model", "boxes_model"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    other_seed = _sample(images[1], seed=1)
    assert not np.array_equal(a.points, other_seed.points)
    # The key, not the position in a stream, drives the draw: same masks under another key differ.
    moved = sample_prompts(
        "sa1b/999999", images[1].masks, (images[1].record.image.height, images[1].record.image.width), MODEL, PromptConfig(num_prompts=64)
    )
    assert not np.array_equal(a.points, moved.points)
    assert prompt_rng("sa1b/1", 0).integers(0, 2**31) == prompt_rng("sa1b/1", 0).integers(0, 2**31)


def test_mapping_to_the_teacher_frame() -> None:
    xy = np.array([[0.0, 0.0], [2250.0, 1500.0], [1125.0, 750.0]])
    np.testing.assert_allclose(to_model_frame(xy, (1500, 2250), MODEL), [[0, 0], [1008, 1008], [504, 504]])
    box = np.array([[225.0, 150.0, 450.0, 300.0]])
    np.testing.assert_allclose(to_model_frame(box, (1500, 2250), MODEL), [[100.8, 100.8, 201.6, 201.6]], rtol=1e-6)
    mask = np.zeros((300, 600), bool)
    mask[100:200, 50:350] = True
    prompts = sample_prompts("k", [_runs(mask)], (300, 600), 288, PromptConfig(num_prompts=4, max_negative_points=2))
    valid = prompts.labels != PAD
    np.testing.assert_allclose(prompts.points_model[valid], prompts.points[valid] * [288 / 600, 288 / 300], rtol=1e-6)
    assert (prompts.points_model[~valid] == 0).all()
    finite = ~np.isnan(prompts.boxes)
    np.testing.assert_allclose(prompts.boxes_model[finite], (prompts.boxes * [0.48, 0.96, 0.48, 0.96])[finite], rtol=1e-6)


def test_small_masks_are_skipped() -> None:
    height, width = 1500, 2250
    scale = MODEL * MODEL / (height * width)
    masks = []
    for side in (5, 12, 40):  # 25, 144, 1600 px -> 7.5, 43, 482 px in the 1008 frame
        mask = np.zeros((height, width), bool)
        mask[:side, :side] = True
        masks.append(_runs(mask))
    masks.append(_runs(np.zeros((height, width), bool)))
    prompts = sample_prompts("k", masks, (height, width), MODEL, PromptConfig(num_prompts=10))
    assert sorted(prompts.mask_index.tolist()) == [2]
    lenient = sample_prompts("k", masks, (height, width), MODEL, PromptConfig(num_prompts=10, min_area_model_px=25 * scale))
    assert sorted(lenient.mask_index.tolist()) == [0, 1, 2]  # never the empty mask
    capped = sample_prompts("k", masks, (height, width), MODEL, PromptConfig(num_prompts=2, min_area_model_px=0))
    assert len(capped) == 2


def test_negative_points_fall_back_to_the_whole_image() -> None:
    """Near the mask (its box grown by 10%) there are only 2 background pixels; the rest come from further away."""
    from esam3.workers.prompts import negative_points

    mask = np.zeros((100, 2), bool)
    mask[:10] = True  # box rows 0-9, grown to rows 0-10: row 10 is the only nearby background
    points = negative_points(_runs(mask), prompt_rng("k", 1), 8)
    assert len(points) == 8 and len({tuple(p) for p in points.tolist()}) == 8
    rows = points[:, 1] - 0.5
    assert (rows >= 10).all()
    assert set(points[rows == 10][:, 0].tolist()) == {0.5, 1.5}  # the nearby ones come first and are all used
    assert (rows > 10).sum() == 6


def test_negative_points_fill_from_a_tiny_background() -> None:
    """Two background pixels in 100x100: rejection would miss them; the exact fallback finds both, once each."""
    from esam3.workers.prompts import negative_points

    mask = np.ones((100, 100), bool)
    mask[3, 7] = mask[90, 2] = False
    points = negative_points(_runs(mask), prompt_rng("k", 0), 8)
    assert sorted(map(tuple, points.tolist())) == [(2.5, 90.5), (7.5, 3.5)]
    full = sample_prompts(
        "k", [_runs(np.ones((20, 20), bool))], (20, 20), MODEL, PromptConfig(num_prompts=1, mix={"point": 1}, max_negative_points=4, seed=3)
    )
    assert (full.labels[0][1:] == PAD).all()  # nothing outside the mask: padding, not bogus negatives


def test_jitter_is_applied_and_bounded(images) -> None:
    moved = 0
    for image in images:
        prompts = _sample(image, mix={"box": 1.0}, box_jitter=0.5, box_jitter_max_px=3)
        for index, box in zip(prompts.mask_index, prompts.boxes):
            tight = np.array(image.masks[index].bbox_xyxy(), dtype=float)
            assert np.all(np.abs(box - tight) <= 3 + 1e-4)
            moved += int(not np.allclose(box, tight))
    assert moved > 0


def test_mix_order_does_not_matter(images) -> None:
    a = _sample(images[0], mix={"point": 1.0, "box": 2.0, "point+box": 1.0})
    b = _sample(images[0], mix={"point+box": 1.0, "box": 2.0, "point": 1.0})
    np.testing.assert_array_equal(a.kinds, b.kinds)
    np.testing.assert_array_equal(a.points, b.points)


def test_mask_size_must_match_the_image(images) -> None:
    with pytest.raises(ValueError, match="mask 0 is .* but the image is 10x10"):
        sample_prompts("k", images[0].masks, (10, 10), MODEL, PromptConfig())


def test_same_prompts_in_another_process(images) -> None:
    """Determinism does not lean on Python's per-process hash seed."""
    code = (
        "import sys, numpy as np; from esam3.workers.prompts import sample_prompts; "
        "from esam3.schemas.prompts import PromptConfig; from esam3.schemas.rle import parse_counts; "
        "m = parse_counts(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])); "
        "p = sample_prompts('sa1b/42', [m], (m.height, m.width), 1008, PromptConfig(num_prompts=1, seed=9)); "
        "print(p.points.tobytes().hex(), p.boxes.tobytes().hex(), int(p.kinds[0]))"
    )
    ann = images[0].record.annotations[0].segmentation
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code, ann.counts, str(ann.size[0]), str(ann.size[1])],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1
    here = sample_prompts("sa1b/42", [images[0].masks[0]], tuple(ann.size), 1008, PromptConfig(num_prompts=1, seed=9))
    assert outputs.pop().split()[0] == here.points.tobytes().hex()


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"num_prompts": 0}, "num_prompts"),
        ({"mix": {"scribble": 1.0}}, "mix"),
        ({"mix": {"point": -1.0}}, "mix"),
        ({"mix": {"point": 0.0}}, "mix"),
        ({"box_jitter": -0.1}, "box_jitter"),
        ({"max_negative_points": -1}, "max_negative_points"),
        ({"unknown": 1}, "unknown"),
        ({"mix": {"point": float("inf")}}, "mix"),
        ({"min_area_model_px": float("nan")}, "min_area_model_px"),
    ],
)
def test_config_errors_name_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        PromptConfig(**overrides)
    assert info.value.errors()[0]["loc"][0] == field
