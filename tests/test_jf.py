"""J&F (DAVIS 2017) on cases small enough to work out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from esam3.train.jf import ObjectScore, boundary_f, boundary_map, dilate, disk_radius, jaccard, score_object, summarize


def square(size: int, rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[rows, cols] = True
    return mask


SQUARE = square(4, slice(1, 3), slice(1, 3))  # a 2 x 2 square in a 4 x 4 image
DOT = square(4, slice(1, 2), slice(1, 2))  # its top-left pixel


def test_jaccard() -> None:
    assert jaccard(square(4, slice(0, 2), slice(0, 2)), square(4, slice(0, 2), slice(1, 3))) == pytest.approx(2 / 6)
    assert jaccard(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 1.0
    assert jaccard(DOT, np.zeros((4, 4), bool)) == 0.0


def test_boundary_pixels_follow_the_davis_convention() -> None:
    expected = np.array([[1, 1, 1, 0], [1, 0, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=bool)
    assert np.array_equal(boundary_map(SQUARE), expected)
    assert sorted(zip(*np.nonzero(boundary_map(DOT)))) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_disk_radius_and_dilation() -> None:
    assert disk_radius(480, 854) == 8  # DAVIS's 480p frames
    one = np.zeros((7, 7), bool)
    one[3, 3] = True
    assert dilate(one, 2).sum() == 13  # 1 + 3 + 5 + 3 + 1
    assert dilate(one, 1).sum() == 5


def test_boundary_f() -> None:
    # radius 0: 3 of the dot's 4 boundary pixels lie on the square's 8: P = 3/4, R = 3/8, F = 1/2
    assert boundary_f(DOT, SQUARE, radius=0) == pytest.approx(0.5)
    assert boundary_f(SQUARE, SQUARE) == 1.0
    shifted = square(12, slice(3, 7), slice(4, 8))
    assert boundary_f(shifted, square(12, slice(3, 7), slice(3, 7)), radius=1) == 1.0  # one pixel off, within the disk
    assert boundary_f(square(12, slice(0, 2), slice(0, 2)), square(12, slice(9, 11), slice(9, 11)), radius=1) == 0.0
    empty = np.zeros((4, 4), bool)
    assert boundary_f(empty, empty) == 1.0 and boundary_f(empty, SQUARE) == 0.0 and boundary_f(SQUARE, empty) == 0.0


def test_first_and_last_frames_are_not_scored() -> None:
    empty = np.zeros((4, 4), bool)
    preds = [empty, SQUARE, DOT, empty]  # the first and last are wrong and must not count
    gts = [SQUARE, SQUARE, SQUARE, SQUARE]
    score = score_object("v", 1, preds, gts)
    assert score.j == pytest.approx([1.0, 0.25])
    assert score.f[0] == 1.0 and len(score.f) == 2
    with pytest.raises(ValueError, match="3 predicted frames for 4"):
        score_object("v", 1, preds[:3], gts)


def test_summary_averages_objects_then_frames() -> None:
    a = ObjectScore("v", 1, j=[1.0, 0.0], f=[1.0, 1.0])  # mean J 0.5, F 1
    b = ObjectScore("w", 2, j=[1.0], f=[0.0])  # mean J 1, F 0
    out = summarize([a, b, ObjectScore("w", 3)])  # an object with no scored frame is left out
    assert out.j == pytest.approx(0.75) and out.f == pytest.approx(0.5) and out.jf == pytest.approx(0.625)
    assert out.objects == 2 and out.frames == 3
    assert np.isnan(summarize([]).jf)
