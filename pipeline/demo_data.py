"""Write demo shards in the released SA-1B and SA-V formats (real JPEGs, real H.264 mp4s, exact JSON schemas).

Real SA-1B / SA-V are licensed multi-terabyte downloads; these shards let the demo, the tests and the
benchmarks exercise the same code paths. Layout under ``out``: ``sa-1b/sa_000000.tar`` ... and
``sa-v/sav_000.tar`` ...; SA-1B members are flat (``sa_1.jpg``, ``sa_1.json``), SA-V members sit in a
folder named after the shard (``sav_000/sav_000001.mp4``, ``sav_000/sav_000001_manual.json``).
Each sample draws from its own generator seeded by (seed, dataset, shard, index), so a shard's bytes do
not depend on how many shards are written.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import simplejpeg
from pycocotools import mask as mask_utils

from esam3.pipeline.demo_scenes import Shape, background, compose, random_shape, shape_mask
from esam3.pipeline.shards import DatasetName
from esam3.schemas.demo import DemoDataConfig
from esam3.schemas.samples import Failure
from esam3.schemas.sa1b import SA1BRecord
from esam3.schemas.sav import SAV_ANNOTATION_STRIDE, SAV_FPS, SAVRecord

#: Masks smaller than this many pixels are not annotated (SA-1B drops tiny masks too).
MIN_ANNOTATED_AREA = 16
_TAR_MTIME = 1_680_000_000  # fixed, so shards are byte-identical for a seed
_SA1B_ASPECTS = (3 / 2, 4 / 3, 16 / 9, 1.0, 3 / 4, 2 / 3)


def encode_rle(mask: np.ndarray) -> dict:
    """COCO compressed RLE of a (H, W) bool mask, as it appears in SA-1B / SA-V JSON."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _tight_box(mask: np.ndarray) -> list[float]:
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1 - cols[0]), float(rows[-1] + 1 - rows[0])]


def sample_rng(seed: int, dataset: DatasetName, shard: int, index: int) -> np.random.Generator:
    """The generator of one demo sample: independent of every other sample and of the number of shards."""
    return np.random.default_rng([seed, 0 if dataset is DatasetName.SA1B else 1, shard, index])


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), _TAR_MTIME, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_tar(path: Path, members: Iterable[tuple[str, bytes]]) -> None:
    """Write a plain tar atomically (temp file, then rename), members in the order given."""
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            _add_member(tar, name, data)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- SA-1B


def sa1b_scene(rng: np.random.Generator, short_side: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """A photo-like RGB image and candidate masks: visible objects, parts of some, a few tiny objects."""
    short = int(short_side * rng.choice([1.0, 1.0, 0.8, 0.6]))
    aspect = float(rng.choice(_SA1B_ASPECTS))
    height, width = (short, int(short * aspect)) if aspect >= 1 else (int(short / aspect), short)
    scale = min(height, width)
    placed = [
        (random_shape(rng, scale * rng.uniform(0.08, 0.3)), (rng.uniform(0, width), rng.uniform(0, height)))
        for _ in range(int(rng.integers(4, 10)))
    ]
    placed += [
        (random_shape(rng, rng.uniform(2, 5)), (rng.uniform(0, width), rng.uniform(0, height))) for _ in range(int(rng.integers(0, 3)))
    ]
    img, visible = compose(background(rng, height, width), placed)
    masks = list(visible)
    # Parts: SA-1B also annotates pieces of objects, so masks overlap and nest.
    for (shape, center), vis in zip(placed, visible):
        if vis.sum() > 0.02 * height * width and rng.uniform() < 0.5:
            part_radius = float(np.abs(shape.vertices).max()) * 0.45
            offset = rng.uniform(-0.4, 0.4, 2) * part_radius
            part = shape_mask(random_shape(rng, part_radius), (center[0] + offset[0], center[1] + offset[1]), height, width)
            masks.append(part & vis)
    return img, masks


def sa1b_image(rng: np.random.Generator, image_id: int, short_side: int) -> tuple[bytes, SA1BRecord]:
    """One JPEG and its SA-1B record; masks under ``MIN_ANNOTATED_AREA`` pixels are not annotated."""
    img, masks = sa1b_scene(rng, short_side)
    height, width = img.shape[:2]
    annotations = []
    for mask in masks:
        area = int(mask.sum())
        if area < MIN_ANNOTATED_AREA:
            continue
        rows, cols = np.nonzero(mask)
        pick = int(rng.integers(len(rows)))
        annotations.append(
            {
                "id": image_id * 1000 + len(annotations),
                "bbox": _tight_box(mask),
                "area": area,
                "segmentation": encode_rle(mask),
                "point_coords": [[float(cols[pick]) + 0.5, float(rows[pick]) + 0.5]],
                "predicted_iou": float(rng.uniform(0.85, 1.0)),
                "stability_score": float(rng.uniform(0.9, 1.0)),
                "crop_box": [0.0, 0.0, float(width), float(height)],
            }
        )
    record = SA1BRecord.model_validate(
        {
            "image": {"image_id": image_id, "width": width, "height": height, "file_name": f"sa_{image_id}.jpg"},
            "annotations": annotations,
        }
    )
    return simplejpeg.encode_jpeg(img, quality=90, colorspace="RGB"), record


def write_sa1b_shard(config: DemoDataConfig, shard: int) -> Path:
    path = config.out / "sa-1b" / DatasetName.SA1B.shard_name(shard)
    path.parent.mkdir(parents=True, exist_ok=True)

    def members() -> Iterable[tuple[str, bytes]]:
        for i in range(config.images_per_shard):
            image_id = shard * config.images_per_shard + i + 1
            jpeg, record = sa1b_image(sample_rng(config.seed, DatasetName.SA1B, shard, i), image_id, config.image_short_side)
            yield record.image.file_name, jpeg
            yield f"sa_{image_id}.json", record.model_dump_json().encode()

    write_tar(path, members())
    return path


# ----------------------------------------------------------------------------------------------- SA-V


@dataclass(frozen=True)
class _Mover:
    """An object that moves at constant velocity and bounces off the frame edges (it may start outside)."""

    shape: Shape
    start: np.ndarray
    velocity: np.ndarray

    def center(self, t: int, width: int, height: int) -> tuple[float, float]:
        pos = self.start + self.velocity * t
        bounds = np.array([width, height], dtype=float)
        # Reflect into [-margin, bound + margin] so objects can leave and come back.
        margin = 0.3 * bounds
        span = bounds + 2 * margin
        folded = np.mod(pos + margin, 2 * span)
        folded = np.where(folded > span, 2 * span - folded, folded) - margin
        return float(folded[0]), float(folded[1])


def sav_scene(rng: np.random.Generator, config: DemoDataConfig) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """RGB frames of moving, occluding objects and, on every 4th frame, each object's visible mask."""
    width, height, n_frames = config.video_width, config.video_height, config.video_frames
    scale = min(width, height)
    movers = []
    for _ in range(int(rng.integers(3, 6))):
        start = rng.uniform([-0.1 * width, -0.1 * height], [1.1 * width, 1.1 * height])
        movers.append(_Mover(random_shape(rng, scale * rng.uniform(0.08, 0.2)), start, rng.uniform(-6, 6, 2)))
    # One late arrival: it starts just off the left edge and walks in, so it first appears after frame 0.
    shape = random_shape(rng, scale * rng.uniform(0.08, 0.15))
    reach = float(np.abs(shape.vertices[:, 0]).max())
    start = np.array([-reach - rng.uniform(8, 24), rng.uniform(0.2, 0.8) * height])
    movers.append(_Mover(shape, start, np.array([rng.uniform(2, 5), rng.uniform(-1, 1)])))
    base = background(rng, height, width)
    frames: list[np.ndarray] = []
    masklet: list[list[np.ndarray]] = []
    for t in range(n_frames):
        img, visible = compose(base, [(m.shape, m.center(t, width, height)) for m in movers])
        frames.append(img)
        if t % SAV_ANNOTATION_STRIDE == 0:
            masklet.append(visible)
    return frames, masklet


def sav_video(rng: np.random.Generator, video_id: str, config: DemoDataConfig) -> tuple[bytes, SAVRecord]:
    """One H.264 mp4 (24 fps) and its SA-V ``_manual.json``; objects never visible when annotated are dropped."""
    frames, masklet = sav_scene(rng, config)
    width, height, n_frames = config.video_width, config.video_height, len(frames)
    n_objects = len(masklet[0])
    # Objects that are never visible on an annotated frame are not annotated.
    keep = [j for j in range(n_objects) if any(step[j].sum() >= MIN_ANNOTATED_AREA for step in masklet)]
    areas = np.array([[step[j].sum() for step in masklet] for j in keep], dtype=float)
    seen = areas >= MIN_ANNOTATED_AREA
    first = [int(np.argmax(row)) * SAV_ANNOTATION_STRIDE for row in seen]
    mean_area = [float(row[row > 0].mean()) for row in areas]
    record = SAVRecord.model_validate(
        {
            "video_id": video_id,
            "video_duration": n_frames / SAV_FPS,
            "video_frame_count": n_frames,
            "video_height": height,
            "video_width": width,
            "video_resolution": height * width,
            "video_environment": str(rng.choice(["Indoor", "Outdoor"])),
            "video_split": "train",
            "masklet": [[encode_rle(step[j]) for j in keep] for step in masklet],
            "masklet_id": list(range(len(keep))),
            "masklet_size_rel": [a / (height * width) for a in mean_area],
            "masklet_size_abs": mean_area,
            "masklet_size_bucket": [_size_bucket(a) for a in mean_area],
            "masklet_visibility_changes": [int(np.count_nonzero(np.diff(row.astype(int)))) for row in seen],
            "masklet_first_appeared_frame": first,
            "masklet_frame_count": [len(masklet)] * len(keep),
            "masklet_edited_frame_count": [int(row.sum()) for row in seen],
            "masklet_type": ["manual"] * len(keep),
            "masklet_num": len(keep),
        }
    )
    return encode_h264(frames, SAV_FPS), record


def _size_bucket(area: float) -> str:
    """COCO's small / medium / large by mean visible area."""
    return "small" if area < 32**2 else "medium" if area < 96**2 else "large"


def encode_h264(frames: list[np.ndarray], fps: int, container_format: str = "mp4") -> bytes:
    """Encode RGB frames as H.264 (yuv420p) in memory, byte-identical for identical frames.

    ``container_format="h264"`` writes a raw Annex-B stream (no container, no frame rate) instead of mp4.
    """
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container_format) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        # x264's lookahead (mb-tree) made the bytes of some videos vary between runs of the same frames
        # (seen with PyAV 18's libx264); without it and on one thread the output is identical for a seed.
        stream.options = {"crf": "20", "preset": "veryfast", "threads": "1", "x264-params": "mbtree=0:rc-lookahead=0"}
        for index, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buf.getvalue()


def write_sav_shard(config: DemoDataConfig, shard: int) -> Path:
    path = config.out / "sa-v" / DatasetName.SAV.shard_name(shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.name.removesuffix(".tar")

    def members() -> Iterable[tuple[str, bytes]]:
        for i in range(config.videos_per_shard):
            video_id = f"sav_{shard * config.videos_per_shard + i + 1:06d}"
            mp4, record = sav_video(sample_rng(config.seed, DatasetName.SAV, shard, i), video_id, config)
            yield f"{folder}/{video_id}.mp4", mp4
            yield f"{folder}/{video_id}_manual.json", record.model_dump_json(exclude_none=True).encode()

    write_tar(path, members())
    return path


def write_demo_data(config: DemoDataConfig, on_shard: Callable[[Path], None] = lambda _: None) -> list[Path]:
    """Write every shard the config asks for; ``on_shard`` is called after each (for progress bars)."""
    written = []
    for shard in range(config.sa1b_shards):
        written.append(write_sa1b_shard(config, shard))
        on_shard(written[-1])
    for shard in range(config.sav_shards):
        written.append(write_sav_shard(config, shard))
        on_shard(written[-1])
    return written


def write_demo_coco(sa1b: Path, out: Path, limit: int | None = None) -> tuple[Path, Path]:
    """SA-1B shards (a folder) as a COCO-format eval set: ``out/images/*.jpg`` + ``out/instances.json`` (one
    category, every mask an instance); what ``esam3 eval --coco-images --coco-annotations`` reads."""
    from esam3.pipeline.sources import SA1BSource

    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for sample in SA1BSource(str(sa1b), check_pixels=False).iter_samples("all"):
        if isinstance(sample, Failure) or (limit is not None and len(images) >= limit):
            continue
        info = sample.record.image
        (images_dir / info.file_name).write_bytes(sample.jpeg)
        images.append({"id": info.image_id, "file_name": info.file_name, "height": info.height, "width": info.width})
        for annotation in sample.record.annotations:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": info.image_id,
                    "category_id": 1,
                    "iscrowd": 0,
                    "bbox": list(annotation.bbox),
                    "area": annotation.area,
                    "segmentation": {"size": list(annotation.segmentation.size), "counts": annotation.segmentation.counts},
                }
            )
    document = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "object"}]}
    (out / "instances.json").write_text(json.dumps(document))
    return images_dir, out / "instances.json"
