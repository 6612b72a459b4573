"""Procedural photo-like scenes with known object masks, for demo data in the SA-1B / SA-V formats.

A scene is a textured background plus polygons (blobs, stars, rotated boxes, ellipses) in depth order; later
objects occlude earlier ones, so each object's *visible* mask is what SA-1B / SA-V would annotate. Everything
is drawn from a numpy Generator, so a seed fixes every pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw


@dataclass(frozen=True)
class Shape:
    """A polygon around the origin (vertices in pixels) with a colour and a stripe texture."""

    vertices: np.ndarray  # (n, 2) float, x/y offsets from the shape's centre
    color: np.ndarray  # (3,) float in [0, 255]
    stripe_period: float
    stripe_angle: float

    def at(self, center: tuple[float, float]) -> list[tuple[float, float]]:
        return [(float(x + center[0]), float(y + center[1])) for x, y in self.vertices]


def random_shape(rng: np.random.Generator, radius: float) -> Shape:
    """A blob, star, ellipse or rotated rectangle of roughly ``radius`` pixels."""
    kind = rng.choice(["blob", "star", "ellipse", "box"])
    angle = rng.uniform(0, 2 * np.pi)
    if kind == "box":
        half = np.array([rng.uniform(0.5, 1.0), rng.uniform(0.3, 1.0)]) * radius
        corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * half
    else:
        n = {"blob": 24, "star": 2 * int(rng.integers(4, 8)), "ellipse": 48}[kind]
        theta = np.linspace(0, 2 * np.pi, n, endpoint=False)
        if kind == "blob":
            r = radius * (0.75 + 0.25 * rng.uniform(-1, 1, n)).clip(0.4, None)
        elif kind == "star":
            r = radius * np.where(np.arange(n) % 2 == 0, 1.0, rng.uniform(0.35, 0.6))
        else:
            r = radius * np.ones(n)
        aspect = rng.uniform(0.5, 1.0) if kind == "ellipse" else 1.0
        corners = np.stack([r * np.cos(theta), aspect * r * np.sin(theta)], axis=1)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return Shape(
        vertices=corners @ rot.T,
        color=rng.uniform(20, 235, 3),
        stripe_period=float(rng.uniform(6, 40)),
        stripe_angle=float(rng.uniform(0, np.pi)),
    )


def background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth two-colour gradient with low-frequency blotches and fine grain, (H, W, 3) uint8."""
    top, bottom = rng.uniform(30, 220, 3), rng.uniform(30, 220, 3)
    ramp = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    img = (top * (1 - ramp) + bottom * ramp).astype(np.float32) * np.ones((1, width, 1), np.float32)
    coarse = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    blotches = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    img = 0.75 * img + 0.25 * blotches
    img += rng.integers(-6, 7, (height, width, 1), dtype=np.int16)
    return img.clip(0, 255).astype(np.uint8)


def shape_mask(shape: Shape, center: tuple[float, float], height: int, width: int) -> np.ndarray:
    """The full (unoccluded) mask of a shape placed at ``center``, (H, W) bool."""
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon(shape.at(center), fill=1)
    return np.asarray(canvas, dtype=bool)


def paint(img: np.ndarray, mask: np.ndarray, shape: Shape) -> None:
    """Paint ``shape``'s striped colour into ``img`` where ``mask`` is set (in place, within the mask's box)."""
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if len(rows) == 0:
        return
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    yy, xx = np.mgrid[r0:r1, c0:c1].astype(np.float32)
    phase = (xx * np.cos(shape.stripe_angle) + yy * np.sin(shape.stripe_angle)) * (2 * np.pi / shape.stripe_period)
    shade = 1.0 + 0.18 * np.sin(phase)
    patch = (shape.color[None, None, :] * shade[..., None]).clip(0, 255).astype(np.uint8)
    region = mask[r0:r1, c0:c1]
    img[r0:r1, c0:c1][region] = patch[region]


def compose(base: np.ndarray, placed: list[tuple[Shape, tuple[float, float]]]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Draw shapes back to front on a copy of ``base``; return the image and each shape's visible mask."""
    height, width = base.shape[:2]
    img = base.copy()
    full = [shape_mask(shape, center, height, width) for shape, center in placed]
    for (shape, _), mask in zip(placed, full):
        paint(img, mask, shape)
    visible = []
    covered = np.zeros((height, width), dtype=bool)
    for mask in reversed(full):
        visible.append(mask & ~covered)
        covered |= mask
    return img, visible[::-1]
