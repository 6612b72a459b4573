"""Read selected shards end to end and count what is in them: samples, masks, frames, failures.

Used by ``esam3 scan`` (check a download before a cache run) and ``esam3 demo``; it runs every check the
cache's sources run, so a clean scan means the cache will not drop samples for input reasons.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from esam3.pipeline.shards import DatasetName, ShardRef
from esam3.pipeline.sources import SA1BSource, SAVSource
from esam3.schemas.samples import Failure, ImageSample, VideoSample
from esam3.schemas.shards import ShardSpec


@dataclass
class ScanReport:
    dataset: str
    source: str
    shards: list[str] = field(default_factory=list)
    samples: int = 0
    masks: int = 0  # SA-1B annotations, or SA-V masklets (objects)
    frames: int = 0  # SA-V decoded frames (annotated frames unless all were asked for)
    min_size: tuple[int, int] | None = None  # smallest (height, width) seen
    max_size: tuple[int, int] | None = None
    failures: list[Failure] = field(default_factory=list)

    def add(self, item: ImageSample | VideoSample | Failure) -> None:
        if isinstance(item, Failure):
            self.failures.append(item)
            return
        self.samples += 1
        if isinstance(item, ImageSample):
            self.masks += len(item.record.annotations)
            size = (item.record.image.height, item.record.image.width)
        else:
            self.masks += item.record.masklet_num
            self.frames += len(item.frames)
            size = (item.record.video_height, item.record.video_width)
        area = size[0] * size[1]
        if self.min_size is None or area < self.min_size[0] * self.min_size[1]:
            self.min_size = size
        if self.max_size is None or area > self.max_size[0] * self.max_size[1]:
            self.max_size = size

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["failures"] = [asdict(f) for f in self.failures]
        return out


def scan(
    dataset: DatasetName,
    source: str,
    shards: ShardSpec | str | list[ShardRef] = "all",
    storage_options: dict[str, Any] | None = None,
    on_shard: Callable[[ShardRef, ScanReport], None] = lambda *_: None,
) -> ScanReport:
    """Stream every sample of the selected shards through the source's checks.

    ``shards`` is a spec, or shards already selected (so a caller can report spec errors before starting a
    progress display); ``on_shard`` runs after each shard.
    """
    reader = SA1BSource(source, storage_options) if dataset is DatasetName.SA1B else SAVSource(source, storage_options)
    report = ScanReport(dataset=dataset.value, source=source)
    for shard in shards if isinstance(shards, list) else reader.shards(shards):
        for item in reader.iter_shard(shard):
            report.add(item)
        report.shards.append(shard.name)
        on_shard(shard, report)
    return report
