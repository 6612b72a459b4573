from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from esam3.pipeline.demo_data import encode_rle
from esam3.schemas.rle import RLEError, parse_counts


def _random_masks(rng: np.random.Generator) -> list[np.ndarray]:
    masks = [np.zeros((13, 7), bool), np.ones((13, 7), bool)]
    for _ in range(30):
        h, w = rng.integers(1, 60, 2)
        mask = np.zeros((h, w), bool)
        for _ in range(rng.integers(0, 4)):
            r0, c0 = rng.integers(0, h), rng.integers(0, w)
            mask[r0 : r0 + rng.integers(1, h + 1), c0 : c0 + rng.integers(1, w + 1)] ^= True
        masks.append(mask)
    # Long runs exercise multi-group values and large deltas.
    big = np.zeros((1500, 2250), bool)
    big[100:1400, 50:2000] = True
    big[700:710, :] = False
    masks.append(big)
    return masks


def test_parse_matches_pycocotools() -> None:
    for mask in _random_masks(np.random.default_rng(0)):
        rle = encode_rle(mask)
        runs = parse_counts(rle["counts"], *rle["size"])
        coco = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)
        np.testing.assert_array_equal(runs.to_mask(), coco)
        np.testing.assert_array_equal(runs.to_mask(), mask)
        assert runs.area == int(mask.sum())
        if mask.any():
            x, y, w, h = mask_utils.toBbox({"size": rle["size"], "counts": rle["counts"].encode()})
            assert runs.bbox_xyxy() == (int(x), int(y), int(x + w), int(y + h))
        else:
            assert runs.bbox_xyxy() is None


def test_from_mask_equals_parsed_coco_counts() -> None:
    from esam3.schemas.rle import Runs

    for mask in _random_masks(np.random.default_rng(1)):
        rle = encode_rle(mask)
        parsed = parse_counts(rle["counts"], *rle["size"])
        runs = Runs.from_mask(mask)
        np.testing.assert_array_equal(runs.counts, parsed.counts)
        assert (runs.height, runs.width) == mask.shape and runs.counts.sum() == mask.size


def test_contains_and_sampling() -> None:
    rng = np.random.default_rng(1)
    for mask in _random_masks(rng)[1:]:
        rle = encode_rle(mask)
        runs = parse_counts(rle["counts"], *rle["size"])
        rows, cols = np.meshgrid(np.arange(mask.shape[0]), np.arange(mask.shape[1]), indexing="ij")
        np.testing.assert_array_equal(runs.contains(rows.ravel(), cols.ravel()), mask.ravel())
        if mask.any():
            picked = runs.sample_foreground(rng, 200)
            assert mask[picked[:, 0], picked[:, 1]].all()


def test_sampling_is_uniform_over_pixels() -> None:
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = True  # a 1-pixel run
    mask[:, 3] = True  # a 4-pixel run
    rle = encode_rle(mask)
    picked = parse_counts(rle["counts"], *rle["size"]).sample_foreground(np.random.default_rng(2), 5000)
    share_single = np.mean((picked[:, 0] == 0) & (picked[:, 1] == 0))
    assert 0.15 < share_single < 0.25  # 1 of 5 pixels


@pytest.mark.parametrize(
    ("counts", "size", "needle"),
    [
        ("", (2, 2), "empty"),
        ("0 1", (2, 2), "outside the COCO alphabet"),
        ("42", (2, 2), "runs cover"),  # 4 + 2 = 6 pixels for a 4-pixel mask
        ("1", (2, 2), "runs cover"),
        ("`", (2, 2), "truncated"),  # continuation bit set on the last char
        ("04O", (2, 2), "negative run length"),
        ("4", (0, 4), "size must be positive"),
    ],
)
def test_bad_counts(counts: str, size: tuple[int, int], needle: str) -> None:
    with pytest.raises(RLEError, match=needle):
        parse_counts(counts, *size)
