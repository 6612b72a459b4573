from __future__ import annotations

from pathlib import Path

import pytest

from esam3.pipeline.shards import DatasetName, SourceError, list_shards, select_shards
from esam3.schemas.shards import ShardSpec, ShardSpecError, format_ids


@pytest.mark.parametrize(
    ("text", "ranges"),
    [
        ("0-3", ((0, 3),)),
        ("7", ((7, 7),)),
        ("0,3,7-9", ((0, 0), (3, 3), (7, 9))),
        (" 9-9 , 2 ", ((2, 2), (9, 9))),
        ("3,1-3", ((1, 3),)),  # overlap collapses, order normalised
        ("4-5,0-3", ((0, 5),)),  # adjacent ranges merge
        ("all", None),
        ("ALL", None),
    ],
)
def test_grammar_accepts(text: str, ranges: tuple | None) -> None:
    assert ShardSpec.parse(text).ranges == ranges


def test_huge_ranges_cost_nothing() -> None:
    spec = ShardSpec.parse("0-999999999")
    with pytest.raises(ShardSpecError, match=r"shards 3-999999999 do not exist"):
        spec.select([0, 1, 2])
    assert ShardSpec.parse("1-2,900000000").ranges == ((1, 2), (900000000, 900000000))


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("5-2", "reversed range 5-2 (write 2-5)"),
        ("-3", "negative shard"),
        ("0,-1", "negative shard"),
        ("abc", "cannot read 'abc'"),
        ("1-", "cannot read '1-'"),
        ("1,,2", "cannot read ''"),
        ("1.5", "cannot read '1.5'"),
        ("", "empty shard spec"),
        ("1" * 5000, "is not a shard number (at most 9 digits)"),
        ("0-" + "9" * 12, "is not a shard number"),
        ("\u0663", "cannot read"),  # an Arabic-Indic digit is not a shard number
        ("[/]", "cannot read '[/]'"),
    ],
)
def test_grammar_rejects(text: str, needle: str) -> None:
    with pytest.raises(ShardSpecError) as info:
        ShardSpec.parse(text)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_select_checks_existence() -> None:
    spec = ShardSpec.parse("0-4,9")
    with pytest.raises(ShardSpecError, match=r"shards 3-4,9 do not exist at the source \(available: 0-2\)"):
        spec.select([0, 1, 2])
    with pytest.raises(ShardSpecError, match=r"shards 0,2-3 do not exist at the source \(available: 1,4-5\)"):
        ShardSpec.parse("0-4").select([1, 4, 5])
    with pytest.raises(ShardSpecError, match=r"the source has no shards"):
        ShardSpec.parse("1").select([])
    assert spec.select(range(10)) == [0, 1, 2, 3, 4, 9]
    assert ShardSpec.parse("all").select([5, 1]) == [1, 5]
    with pytest.raises(ShardSpecError, match="no shards found"):
        ShardSpec.parse("all").select([])


def test_format_ids() -> None:
    assert format_ids([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"
    assert format_ids([]) == ""


def test_list_and_select_at_source(demo_root: Path, tmp_path: Path) -> None:
    sa1b = list_shards(str(demo_root / "sa-1b"), DatasetName.SA1B)
    assert [(s.shard_id, s.name) for s in sa1b] == [(0, "sa_000000.tar"), (1, "sa_000001.tar")]
    assert [s.shard_id for s in select_shards(str(demo_root / "sa-1b"), DatasetName.SA1B, "1")] == [1]
    # Files that only look like shards are ignored; the other dataset's naming does not match, and a folder of the
    # other dataset's shards only says which --dataset it holds.
    (tmp_path / "sa_1.tar").write_bytes(b"")
    assert list_shards(str(tmp_path), DatasetName.SA1B) == []
    (tmp_path / "sav_000.tar").write_bytes(b"")
    assert [s.name for s in list_shards(str(tmp_path), DatasetName.SAV)] == ["sav_000.tar"]
    with pytest.raises(SourceError, match=r"holds sa-v shards \(sav_000.tar, ...\), not sa-1b ones: pass --dataset sa-v"):
        list_shards(str(tmp_path), DatasetName.SA1B)
    with pytest.raises(ShardSpecError, match=r"shards 2 do not exist .*sa-1b shards under"):
        select_shards(str(demo_root / "sa-1b"), DatasetName.SA1B, "0-2")
    with pytest.raises(SourceError, match="is not a folder or prefix that exists"):
        list_shards(str(tmp_path / "nope"), DatasetName.SAV)
    with pytest.raises(SourceError, match="cannot use source 'foo://x'"):
        list_shards("foo://x", DatasetName.SAV)
