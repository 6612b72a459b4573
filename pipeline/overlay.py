"""Pictures of masks and prompts on an image: what ``esam3 store show`` and ``esam3 predict`` draw."""

from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image, ImageDraw

COLOURS = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
]


def overlay(image: np.ndarray, masks: list[np.ndarray]) -> Image.Image:
    """RGB uint8 (H, W, 3) with each bool (H, W) mask in its own colour (``COLOURS[i]`` for mask i): a light tint and
    a solid outline, the largest masks first, so that masks covering most of the image still leave it, and every
    mask's edge, readable."""
    out = image.astype(np.float32)
    width = max(1, min(image.shape[:2]) // 200)
    for index in sorted(range(len(masks)), key=lambda i: -int(masks[i].sum())):
        mask = masks[index]
        colour = np.array(COLOURS[index % len(COLOURS)], dtype=np.float32)
        out[mask] = 0.7 * out[mask] + 0.3 * colour
        out[_edge(mask, width)] = colour
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def _edge(mask: np.ndarray, width: int) -> np.ndarray:
    """The pixels of ``mask`` within ``width`` of its outside."""
    inner = mask.copy()
    for _ in range(width):
        shrunk = inner.copy()
        shrunk[1:] &= inner[:-1]
        shrunk[:-1] &= inner[1:]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    return mask & ~inner


def with_legend(picture: Image.Image, entries: list[str], title: str, min_width: int = 480) -> Image.Image:
    """The picture (scaled up to ``min_width`` if narrower) above a panel with ``title`` (wrapped) and ``entries``
    (entry i next to a swatch of ``COLOURS[i]``)."""
    if picture.width < min_width:
        picture = picture.resize((min_width, round(picture.height * min_width / picture.width)), Image.NEAREST)
    line, column_width = 14, 240
    titles = textwrap.wrap(title, max(20, picture.width // 6))
    columns = max(1, picture.width // column_width)
    rows = -(-len(entries) // columns)
    panel = Image.new("RGB", (picture.width, line * (rows + len(titles)) + 8), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    for i, text in enumerate(titles):
        draw.text((4, 2 + line * i), text, fill=(0, 0, 0))
    for i, entry in enumerate(entries):
        x, y = 4 + (i // rows) * column_width, 4 + line * (len(titles) + i % rows)
        draw.rectangle((x, y + 1, x + 10, y + 11), fill=COLOURS[i % len(COLOURS)])
        draw.text((x + 14, y), entry, fill=(0, 0, 0))
    out = Image.new("RGB", (picture.width, picture.height + panel.height), (255, 255, 255))
    out.paste(picture, (0, 0))
    out.paste(panel, (0, picture.height))
    return out


def draw_prompts(picture: Image.Image, points: np.ndarray, labels: np.ndarray, boxes: np.ndarray) -> None:
    """Clicks (K, P, 2) with labels (K, P) (1 green, 0 red, < 0 none) and boxes (K, 4) XYXY (a NaN row: none), all in
    the picture's pixel coordinates."""
    draw = ImageDraw.Draw(picture)
    radius = max(3, min(picture.size) // 150)
    for k in range(len(points)):
        for (x, y), label in zip(points[k], labels[k]):
            if label >= 0:
                draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=(0, 255, 0) if label == 1 else (255, 0, 0))
    for box in boxes:
        if not np.isnan(box).any():
            draw.rectangle(tuple(float(v) for v in box), outline=(255, 255, 0), width=max(1, radius // 2))


def draw_segmentation(image: np.ndarray, masks: np.ndarray, points: np.ndarray, boxes: np.ndarray) -> Image.Image:
    """A predictor's result: masks (K, H, W) tinted, then its single clicks (K1, 2) and boxes (K2, 4) drawn."""
    picture = overlay(image, list(masks))
    clicks = np.asarray(points, np.float32).reshape(-1, 1, 2)
    draw_prompts(picture, clicks, np.ones((len(clicks), 1)), np.asarray(boxes, np.float32).reshape(-1, 4))
    return picture


def strip_indices(frames: int, count: int) -> list[int]:
    """``count`` frame indices evenly spaced from the first to the last of ``frames`` (fewer if the video is shorter)."""
    return sorted({int(round(i)) for i in np.linspace(0, frames - 1, min(count, frames))})


def draw_video_strip(
    frames: dict[int, np.ndarray], masks: dict[int, np.ndarray], points: np.ndarray, boxes: np.ndarray, height: int = 240
) -> Image.Image:
    """Frames (by index; RGB (H, W, 3)) side by side in index order, each with its masks (N, H, W) tinted; frame 0's
    prompts drawn on it; frames scaled to ``height`` pixels."""
    tiles = []
    for t in sorted(frames):
        picture = overlay(frames[t], list(masks[t]))
        if t == 0:
            clicks = np.asarray(points, np.float32).reshape(-1, 1, 2)
            draw_prompts(picture, clicks, np.ones((len(clicks), 1)), np.asarray(boxes, np.float32).reshape(-1, 4))
        scale = min(1.0, height / picture.height)
        tiles.append(picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))))
    gap = 4
    strip = Image.new("RGB", (sum(t.width for t in tiles) + gap * (len(tiles) - 1), max(t.height for t in tiles)), (255, 255, 255))
    x = 0
    for tile in tiles:
        strip.paste(tile, (x, 0))
        x += tile.width + gap
    return strip
