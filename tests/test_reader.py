"""The PyTorch reader: snapshots it pins, the split, the samplers (shuffle, ranks, resume, clips), and batches
whose inputs are what the teacher saw and whose targets are the stored ones, through spawned DataLoader workers."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from typer.testing import CliRunner

from esam3.cli import app
from esam3.pipeline.plan import run_cache
from esam3.pipeline.store.check import store_info
from esam3.pipeline.shards import DatasetName, ShardRef
from esam3.pipeline.store import Store
from esam3.pipeline.store.rows import StoreRows
from esam3.pipeline.store.snapshots import resolve, snapshot_rows, snapshots
from esam3.schemas.cache import CacheConfig
from esam3.schemas.codecs import encode_logits
from esam3.schemas.prompts import PromptConfig
from esam3.schemas.store import StoreError, decode_tensor, tensor_value
from esam3.train.reader import StoreDataset, make_loader
from esam3.train.sampler import ClipSampler, EpochSampler, clips, shard_order
from esam3.train.split import is_val, sample_key
from esam3.workers.read_step import ReadImages


@pytest.fixture(scope="module")
def store(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both datasets of the demo data cached with the int8 codec (6 images, 2 videos)."""
    root = tmp_path_factory.mktemp("reader") / "store"
    for dataset in ("sa-1b", "sa-v"):
        run_cache(CacheConfig(dataset=dataset, source=str(demo_root / dataset), store=str(root), codec="int8"), executor="local")
    return root


@pytest.fixture(scope="module")
def all_outputs_store(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo images cached keeping all 4 mask outputs per prompt, at half the decoder's mask size (16 of 32)."""
    root = tmp_path_factory.mktemp("reader-all") / "store"
    prompts = PromptConfig(mask_outputs="all", mask_size=16)
    assert (
        run_cache(
            CacheConfig(dataset="sa-1b", source=str(demo_root / "sa-1b"), store=str(root), codec="int8", prompts=prompts), executor="local"
        ).exit_code
        == 0
    )
    return root


def teacher_pixels(demo_root: Path) -> dict[str, bytes]:
    """Per image key: the uint8 S x S pixels the cache's read step handed the teacher."""
    read = ReadImages(str(demo_root / "sa-1b"), 112, CacheConfig(dataset="sa-1b", source="-", store="-").prompts)
    out = {}
    for shard in (0, 1):
        for table in read(ShardRef(DatasetName.SA1B, shard, str(demo_root / "sa-1b" / f"sa_{shard:06d}.tar"))):
            out.update({r["key"]: r["pixels"] for r in table.to_pylist() if r["kind"] == "sample"})
    return out


# ---- samplers and split ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "world", "drop_last"), [(10, 2, False), (11, 2, False), (11, 3, True), (7, 4, False), (0, 2, False)])
def test_ranks_get_equal_shares_that_cover_the_epoch(n: int, world: int, drop_last: bool) -> None:
    shares = [shard_order(n, 5, 3, rank, world, drop_last) for rank in range(world)]
    assert len({len(s) for s in shares}) == 1
    seen = Counter(int(i) for s in shares for i in s)
    if drop_last:
        assert len(seen) == n - n % world and max(seen.values(), default=1) == 1
    else:
        assert set(seen) == set(range(n)) and sum(seen.values()) - n == (-n) % world  # padding only
    assert not np.array_equal(shard_order(50, 5, 3, 0, 1, False), shard_order(50, 5, 4, 0, 1, False))  # reshuffled per epoch


def test_resume_gives_the_batches_of_an_uninterrupted_epoch() -> None:
    full = list(EpochSampler(23, 4, seed=9, rank=1, world_size=2, epoch=2))
    resumed = EpochSampler(23, 4, seed=9, rank=1, world_size=2)
    resumed.load_state_dict({"epoch": 2, "step": 2})
    assert list(resumed) == full[2:] and len(resumed) == len(full) - 2
    assert resumed.state_dict(step=3) == {"epoch": 2, "step": 3}
    dropped = EpochSampler(23, 4, drop_last=True)
    assert all(len(b) == 4 for b in dropped) and dropped.steps_per_epoch == 5


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"batch_size": 0}, "batch_size"), ({"rank": 2, "world_size": 2}, "rank"), ({"epoch": -1}, "epoch")]
)
def test_sampler_arguments_are_checked(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EpochSampler(10, **{"batch_size": 2, **kwargs})


def test_split_by_key_hash_is_stable_and_keeps_videos_whole() -> None:
    keys = [f"sa1b/{i}" for i in range(4000)]
    val = [k for k in keys if is_val(k, 10.0)]
    assert 300 < len(val) < 500 and val == [k for k in keys if is_val(k, 10.0)]
    assert set(val) <= {k for k in keys if is_val(k, 20.0)}  # a larger split contains the smaller one
    assert not any(is_val(k, 0.0) for k in keys) and all(is_val(k, 100.0) for k in keys)
    assert sample_key("sav/sav_000001/00003") == "sav/sav_000001"
    frames = [f"sav/sav_{v:06d}/{f:05d}" for v in range(200) for f in range(5)]
    for v in range(200):
        assert len({is_val(k, 30.0) for k in frames[5 * v : 5 * v + 5]}) == 1
    with pytest.raises(ValueError, match="val_percent"):
        is_val("sa1b/1", 101)


def test_clips_are_consecutive_frames_of_one_video() -> None:
    videos = ["b", "a", "a", "a", "b", "a", "b", "a"]
    frames = [1, 0, 1, 2, 0, 4, 2, 3]
    got = clips(videos, frames, 2, 1)
    assert [[(videos[p], frames[p]) for p in clip] for clip in got.tolist()] == [
        [("a", 0), ("a", 1)],
        [("a", 1), ("a", 2)],
        [("a", 2), ("a", 3)],
        [("a", 3), ("a", 4)],
        [("b", 0), ("b", 1)],
        [("b", 1), ("b", 2)],
    ]
    assert clips(["a", "a", "a"], [0, 1, 3], 3, 1).shape == (0, 3)  # a gap breaks the clip
    sampler = ClipSampler(videos, frames, clip_length=2, batch_size=2, stride=2, seed=1)
    batches = list(sampler)
    assert all(len(b) == 4 for b in batches[:-1]) and sorted(p for b in batches for p in b[::2]) == sorted(int(c[0]) for c in sampler.clips)


# ---- snapshots ------------------------------------------------------------------------------------------


def test_each_commit_is_a_snapshot_and_a_run_killed_mid_shard_is_never_read(
    demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "store"
    config = CacheConfig(dataset="sa-1b", source=str(demo_root / "sa-1b"), store=str(path), codec="int8", targets=("trunk",))
    original = Store.append

    def killed_before_second_ledger_row(self: Store, name: str, table) -> None:
        if name == "ledger" and self.dataset("ledger").count_rows() == 1:
            raise KeyboardInterrupt("driver killed between the rows and the ledger row of the second shard")
        original(self, name, table)

    monkeypatch.setattr(Store, "append", killed_before_second_ledger_row)
    with pytest.raises(KeyboardInterrupt):
        run_cache(config, executor="local")
    monkeypatch.setattr(Store, "append", original)
    store = Store(str(path))
    assert store.dataset("images").count_rows() == 6  # the second shard's rows are visible at the head...
    dataset = StoreDataset(store, split="all", fields=("trunk",))
    assert sorted(dataset.keys) == ["sa1b/1", "sa1b/2", "sa1b/3"]  # ...but not in the pinned snapshot
    with pytest.raises(StoreError, match="not a complete snapshot"):
        StoreDataset(store, version=store.dataset("images").version, fields=("trunk",))
    assert store_info(store)["tables"]["images"]["unfinished_shards"] == ["sa_000001.tar"]
    said = CliRunner().invoke(app, ["store", "info", str(path)], env={"COLUMNS": "400"}).output
    assert "1 shard(s) have rows but no ledger row (sa_000001.tar)" in said and "rerun the same esam3 cache command" in said
    run_cache(config, executor="local")  # the rerun removes the unfinished shard's rows and commits it
    assert len(StoreDataset(store, split="all", fields=("trunk",))) == 6
    found = snapshots(store, "images")
    assert [snapshot_rows(store, "images", s) for s in (found[0], found[-1])] == [6, 3] and resolve(
        store, "images", found[-1].tag
    ) == found[-1].version
    assert [i.field_names for i in store.dataset("images").describe_indices()] == [["key"]]
    info = store_info(store)["tables"]["images"]
    assert info["snapshots"][0]["rows"] == 6 and len(info["snapshots"]) == 2 and info["indexes"] == ["key"]
    assert info["unfinished_shards"] == []
    result = CliRunner().invoke(app, ["store", "info", str(path)], env={"COLUMNS": "400"})
    assert result.exit_code == 0 and f"images: trainers read snapshot {found[0].tag} (6 rows)" in result.output, result.output
    with pytest.raises(StoreError, match="no snapshot 'nope'"):
        StoreDataset(store, version="nope", fields=("trunk",))


def test_a_store_with_no_committed_shard_has_no_snapshot(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    store.open_for({"checksum": "c", "source": "x", "geometry": {}}, {"dataset": "sa-1b", "targets": ["trunk"], "codec": "int8"})
    with pytest.raises(StoreError, match="no complete snapshot"):
        StoreDataset(store, fields=("trunk",))


# ---- batches --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "logits"),
    [("chosen", {"chosen_logits": (32, 32)}), ("all", {"multi_logits": (3, 16, 16), "single_logits": (1, 16, 16)})],
)
def test_image_batches_hold_the_teachers_input_and_the_stored_targets(
    request: pytest.FixtureRequest, demo_root: Path, layout: str, logits: dict[str, tuple[int, ...]]
) -> None:
    store = request.getfixturevalue("store" if layout == "chosen" else "all_outputs_store")
    dataset = StoreDataset(str(store), fields=("input", "trunk", "prompts", "gt"), split="all")
    pixels = teacher_pixels(demo_root)
    batch = dataset[[4, 0, 2]]
    rows = StoreRows(Store(str(store)), "images", dataset.version)
    k = 16
    assert batch["input"].shape == (3, 3, 112, 112) and batch["input"].dtype == torch.uint8
    assert batch["trunk"].shape == (3, 64, 8, 8) and batch["chosen_output"].shape == (3, k)
    assert {name: batch[name].shape for name in logits} == {name: (3, k, *shape) for name, shape in logits.items()}
    assert not {"chosen_logits", "multi_logits", "single_logits"} - set(logits) & set(batch)
    assert batch["prompt_points"].shape[:2] == (3, k) and batch["gt_masks"].shape == (3, k, 32, 32)
    for b, key in enumerate(batch["key"]):
        row = rows.where(f"key = '{key}'")[0]
        assert batch["input"][b].numpy().tobytes() == pixels[key]
        assert np.array_equal(batch["trunk"][b].numpy(), rows.decode(row, "trunk"))
        n = row["prompt_kinds"]["shape"][0]
        assert batch["prompt_valid"][b].sum() == n and not batch["prompt_valid"][b, n:].any()
        for name in (*logits, "chosen_output"):
            assert np.array_equal(batch[name][b, :n].numpy(), decode_tensor(row[name])), name
        assert np.array_equal(batch["object_pointer"][b, :n].numpy(), decode_tensor(row["object_pointer"]))
        assert (batch["prompt_labels"][b, n:] == -1).all() and not batch["gt_masks"][b, n:].any()
        assert batch["gt_masks"][b, :n].flatten(1).any(1).all()  # every prompted object has a ground-truth mask
    device = StoreDataset(str(store), fields=("trunk", "prompts"), split="all", decode_on="device")
    coded = device[[4, 0, 2]]
    for name, shape in logits.items():
        assert coded[f"{name}_codes"].dtype == torch.int8 and coded[f"{name}_scales"].shape == (3, k, *shape[:-2])
    moved = device.to_device(coded, "cpu")
    for name in ("trunk", *logits):
        assert torch.allclose(moved[name], batch[name], rtol=0, atol=1e-6), name
    single = dataset[1]
    assert single["input"].shape == (3, 112, 112) and isinstance(single["key"], str)
    assert StoreDataset(str(store), fields=("input",), input_size=64, split="all")[[0]]["input"].shape == (1, 3, 64, 64)


def test_frame_batches_pad_objects_and_decode_codes_on_the_device(store: Path) -> None:
    cpu = StoreDataset(str(store), table="frames", fields=("input", "trunk", "memory", "gt"), split="all")
    device = StoreDataset(str(store), table="frames", fields=("input", "trunk", "memory", "gt"), split="all", decode_on="device")
    picks = list(range(len(cpu)))
    a, b = cpu[picks], device[picks]
    assert "trunk" not in b and b["trunk_codes"].dtype == torch.int8 and b["maskmem_features_codes"].shape[1] == 8
    moved = device.to_device(b, "cpu")
    for name in ("trunk", "maskmem_features", "pix_feat_with_mem"):
        assert torch.allclose(moved[name], a[name], rtol=0, atol=1e-6), name
    assert a["mask_logits"].shape == (len(picks), 8, 32, 32) and a["object_valid"].any()
    for i in range(len(picks)):
        n = int(a["object_valid"][i].sum())
        assert not a["maskmem_features"][i, n:].any() and (a["object_ids"][i, n:] == -1).all()
        assert torch.equal(a["gt_valid"][i], a["object_valid"][i])
    assert a["input"].shape == (len(picks), 3, 112, 112)


def test_device_decode_of_lowrank_bf16_and_fp16_trunks(demo_root: Path, tmp_path: Path) -> None:
    for codec in ("lowrank", "bf16", "fp16"):
        path = tmp_path / codec
        run_cache(
            CacheConfig(
                dataset="sa-1b", source=str(demo_root / "sa-1b"), store=str(path), codec=codec, rank=8, targets=("trunk",), shards="0"
            ),
            executor="local",
        )
        cpu = StoreDataset(str(path), fields=("trunk",), split="all")[[0, 1, 2]]
        device = StoreDataset(str(path), fields=("trunk",), split="all", decode_on="device")
        moved = device.to_device(device[[0, 1, 2]], "cpu")
        assert torch.allclose(moved["trunk"], cpu["trunk"], rtol=1e-5, atol=1e-5), codec


def test_a_targets_only_store_is_refused_for_inputs(demo_root: Path, tmp_path: Path) -> None:
    path = tmp_path / "targets-only"
    run_cache(
        CacheConfig(
            dataset="sa-1b", source=str(demo_root / "sa-1b"), store=str(path), codec="int8", inputs="none", targets=("trunk",), shards="0"
        ),
        executor="local",
    )
    with pytest.raises(StoreError, match="--inputs none.*re-cache with --inputs store"):
        StoreDataset(str(path))
    assert len(StoreDataset(str(path), fields=("trunk",), split="all")) == 3
    with pytest.raises(StoreError, match="without the prompts targets"):
        StoreDataset(str(path), fields=("trunk", "prompts"))
    with pytest.raises(StoreError, match="holds no sa-v rows"):
        StoreDataset(str(path), table="frames")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"table": "ledger"}, "images or frames"),
        ({"split": "test"}, "split"),
        ({"decode_on": "gpu"}, "decode_on"),
        ({"fields": ("memory",)}, "not in images"),
        ({"input_size": 0}, "input_size"),
    ],
)
def test_dataset_arguments_are_checked(store: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StoreDataset(str(store), **kwargs)


def test_spawned_workers_and_two_ranks_read_every_train_row_once_per_epoch(store: Path, demo_root: Path) -> None:
    """The whole reader as a trainer runs it: 2 ranks x 2 spawned workers, a 25% val split by key hash."""
    pixels = teacher_pixels(demo_root)
    train = StoreDataset(str(store), val_percent=25.0, fields=("input", "trunk"))
    val = StoreDataset(str(store), val_percent=25.0, split="val", fields=("input",))
    assert sorted(train.keys + val.keys) == sorted(pixels) and not set(train.keys) & set(val.keys)
    rows = StoreRows(Store(str(store)), "images", train.version)
    stored = {r["key"]: rows.decode(r, "trunk") for r in rows.where(columns=["key", "trunk"])}
    for epoch in (0, 1):
        seen: Counter[str] = Counter()
        for rank in range(2):
            sampler = EpochSampler(len(train), batch_size=2, seed=3, rank=rank, world_size=2, epoch=epoch)
            for batch in make_loader(train, sampler, workers=2, prefetch=2):
                for b, key in enumerate(batch["key"]):
                    seen[key] += 1
                    assert batch["input"][b].numpy().tobytes() == pixels[key]
                    assert np.array_equal(batch["trunk"][b].numpy(), stored[key])
        assert set(seen) == set(train.keys) and sum(seen.values()) == len(train) + len(train) % 2  # padding only


def test_a_frame_without_objects_decodes_on_the_device(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Frames before the first prompted object hold no objects: empty per-object maps on both decode paths."""
    dataset = StoreDataset(str(store), table="frames", fields=("memory",), split="all", decode_on="device")
    row = dataset.rows.take([0], columns=dataset._columns())[0]
    empty = {**row, "object_ids": [], "is_conditioning": [], "has_memory_conditioned": []}
    for name in ("object_score", "object_pointer", "maskmem_features", "pix_feat_with_mem"):
        empty[name] = {**row[name], "shape": [0, *row[name]["shape"][1:]], "data": b"", "scale": b""}
    empty["mask_logits"] = tensor_value(*encode_logits(np.zeros((0, 32, 32), np.float32)))
    batch = dataset.to_device(dataset._collate([empty, row], np.array([0, 0])), "cpu")
    assert not batch["object_valid"][0].any() and not batch["maskmem_features"][0].any()
    assert batch["maskmem_features"].shape[:2] == (2, 8)


def test_index_conflicts_are_retried_then_left_for_the_next_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    store = Store(str(tmp_path / "s"))
    calls = {"n": 0}

    def conflicting(self: Store, table: str, merge: bool = False) -> None:
        calls["n"] += 1
        if calls["n"] < 3:
            raise OSError("Retryable commit conflict for version 7: CreateIndex preempted by Append")

    monkeypatch.setattr(Store, "_update_indexes", conflicting)
    store.index_keys("images")
    assert calls["n"] == 3
    monkeypatch.setattr(Store, "_update_indexes", lambda self, table, merge=False: (_ for _ in ()).throw(OSError("commit conflict")))
    store.index_keys("images")
    assert "indexes not updated after 4 tries" in caplog.text
    monkeypatch.setattr(Store, "_update_indexes", lambda self, table, merge=False: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        store.index_keys("images")


def test_clip_sampler_keeps_only_clips_with_a_flagged_frame() -> None:
    videos, frames = ["a"] * 6, list(range(6))
    keep = [False, False, False, True, False, False]
    sampler = ClipSampler(videos, frames, clip_length=2, batch_size=1, keep=keep, shuffle=False)
    assert sampler.clips.tolist() == [[2, 3]]
