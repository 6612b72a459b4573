"""COCO run-length encoding (the mask format of SA-1B and SA-V), parsed without trusting the input.

A COCO RLE is ``{"size": [h, w], "counts": str}``: alternating background / foreground run lengths over the
mask in column-major (Fortran) order, starting with background. The counts string packs each run in 5-bit
groups (chars offset by 48, bit 0x20 = "more groups follow", bit 0x10 of the last group = sign), and from the
fourth run on stores the difference to the run two places earlier.

``pycocotools`` decodes masks fast but does not check that runs are non-negative or sum to h*w, so a bad RLE
can give a garbage mask silently. :func:`parse_counts` checks both, and the run-level helpers here (area, tight
box, random foreground pixel, membership) answer what the prompt sampler needs without decoding a full mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class RLEError(ValueError):
    """The RLE cannot be a mask of its declared size."""


@dataclass(frozen=True)
class Runs:
    """A validated RLE: run lengths plus the mask size. Runs alternate background/foreground, column-major."""

    height: int
    width: int
    counts: np.ndarray  # int64 run lengths, sum == height * width

    @classmethod
    def from_mask(cls, mask: np.ndarray) -> Runs:
        """Runs of a dense (height, width) mask (nonzero = foreground)."""
        height, width = mask.shape
        flat = np.asarray(mask, dtype=bool).T.ravel()
        change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        edges = np.concatenate([[0], change, [flat.size]])
        counts = np.diff(edges)
        if flat.size and flat[0]:
            counts = np.concatenate([[0], counts])
        return cls(height, width, counts.astype(np.int64))

    @property
    def fg_starts(self) -> np.ndarray:
        """Flat (column-major) start index of every foreground run."""
        return np.cumsum(self.counts)[0::2][: len(self.counts) // 2]

    @property
    def fg_lengths(self) -> np.ndarray:
        return self.counts[1::2]

    @property
    def area(self) -> int:
        return int(self.fg_lengths.sum())

    def to_mask(self) -> np.ndarray:
        """The dense (height, width) bool mask."""
        values = np.zeros(len(self.counts), dtype=bool)
        values[1::2] = True
        return np.repeat(values, self.counts).reshape(self.width, self.height).T

    def bbox_xyxy(self) -> tuple[int, int, int, int] | None:
        """Tight box of the foreground as pixel edges (x0, y0, x1, y1), x1/y1 exclusive; None if empty."""
        keep = self.fg_lengths > 0
        starts = self.fg_starts[keep]
        ends = starts + self.fg_lengths[keep] - 1
        if len(starts) == 0:
            return None
        h = self.height
        col0, col1 = starts // h, ends // h
        one_col = col0 == col1
        row_min = np.where(one_col, starts % h, 0).min()
        row_max = np.where(one_col, ends % h, h - 1).max()
        return int(col0.min()), int(row_min), int(col1.max()) + 1, int(row_max) + 1

    def sample_foreground(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` foreground pixels drawn uniformly, as (n, 2) int (row, col). The mask must not be empty."""
        lengths = self.fg_lengths
        cum = np.cumsum(lengths)
        u = rng.integers(0, cum[-1], size=n)
        run = np.searchsorted(cum, u, side="right")
        flat = self.fg_starts[run] + (u - (cum[run] - lengths[run]))
        return np.stack([flat % self.height, flat // self.height], axis=1)

    def contains(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Whether each pixel (row, col) is foreground."""
        flat = np.asarray(cols) * self.height + np.asarray(rows)
        ends = np.cumsum(self.counts)
        run = np.searchsorted(ends, flat, side="right")
        return (run % 2) == 1


def parse_counts(counts: str | bytes, height: int, width: int) -> Runs:
    """Decode a compressed COCO counts string and check it describes an ``height`` x ``width`` mask."""
    if height <= 0 or width <= 0:
        raise RLEError(f"RLE size must be positive, got [{height}, {width}]")
    try:
        raw = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    except UnicodeEncodeError:
        raise RLEError("RLE counts string has characters outside the COCO alphabet ('0'..'o')") from None
    chars = np.frombuffer(raw, dtype=np.uint8).astype(np.int64) - 48
    if len(chars) == 0:
        raise RLEError("RLE counts string is empty")
    if chars.min() < 0 or chars.max() > 63:
        raise RLEError("RLE counts string has characters outside the COCO alphabet ('0'..'o')")
    more = (chars & 0x20) != 0
    if more[-1]:
        raise RLEError("RLE counts string ends inside a run (truncated)")
    # Group chars into values: a value ends at the first char without the continuation bit.
    ends = np.flatnonzero(~more)
    group = np.concatenate([[0], np.cumsum(~more)[:-1]])
    starts = np.concatenate([[0], ends[:-1] + 1])
    shift = 5 * (np.arange(len(chars)) - starts[group])
    if shift.max() > 55:
        raise RLEError("RLE counts string has a run too long for any mask")
    values = np.zeros(len(ends), dtype=np.int64)
    np.add.at(values, group, (chars & 0x1F) << shift)
    negative = (chars[ends] & 0x10) != 0
    values = np.where(negative, values - (np.int64(1) << (shift[ends] + 5)), values)
    # From the 4th run on, each value is a difference to the run two places earlier.
    runs = values.copy()
    if len(runs) > 3:
        runs[3::2] = np.cumsum(values[3::2]) + values[1]
    if len(runs) > 4:
        runs[4::2] = np.cumsum(values[4::2]) + values[2]
    if (runs < 0).any():
        raise RLEError(f"RLE has a negative run length at run {int(np.argmax(runs < 0))}")
    if runs.sum() != height * width:
        raise RLEError(f"RLE runs cover {int(runs.sum())} pixels but size [{height}, {width}] has {height * width}")
    return Runs(height=height, width=width, counts=runs)
