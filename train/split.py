"""The train / val split: by a hash of the sample's key, so it is the same in every run and in every store of the
same data (no list of validation keys to carry around, nothing that depends on row order or shard layout).

A video is one sample: all frames of ``sav/<video_id>`` land on the same side (frames of one video in both
splits would leak the validation video into training).
"""

from __future__ import annotations

import hashlib

#: The hash is bucketed into 10,000 parts: --val-percent has a resolution of 0.01%.
BUCKETS = 10_000


def sample_key(key: str) -> str:
    """The unit of the split: ``sa1b/<id>`` as is, ``sav/<video_id>/<frame>`` -> ``sav/<video_id>``."""
    return key.rsplit("/", 1)[0] if key.startswith("sav/") and key.count("/") == 2 else key


def bucket(key: str) -> int:
    digest = hashlib.blake2b(sample_key(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % BUCKETS


def is_val(key: str, val_percent: float) -> bool:
    """Whether ``key`` belongs to the validation split of ``val_percent`` % of the samples."""
    if not 0.0 <= val_percent <= 100.0:
        raise ValueError(f"val_percent must be in 0..100, got {val_percent}")
    return bucket(key) < round(val_percent * BUCKETS / 100.0)
