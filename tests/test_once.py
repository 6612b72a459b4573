"""create_once: of many writers racing to create one path, exactly one succeeds, on a local disk and on a real S3
server; readers never see a partial file; a server that ignores If-None-Match is found out."""

from __future__ import annotations

import threading
from pathlib import Path

import fsspec
import pytest

from esam3.pipeline.store.once import create_once, fences


def _race(fs, path: str, writers: int = 8) -> list[bool]:
    barrier, won = threading.Barrier(writers), [False] * writers

    def write(i: int) -> None:
        barrier.wait()
        won[i] = create_once(fs, path, f"writer {i}".encode() * 1000)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return won


def test_exactly_one_local_writer_creates_the_file(tmp_path: Path) -> None:
    fs = fsspec.filesystem("file")
    path = str(tmp_path / "deep" / "folder" / "marker.json")
    won = _race(fs, path)
    assert won.count(True) == 1
    assert Path(path).read_bytes() == f"writer {won.index(True)}".encode() * 1000
    assert [p.name for p in Path(path).parent.iterdir()] == ["marker.json"], "no staging file left behind"
    assert fences(fs, str(tmp_path))


def test_a_mount_without_hard_links_still_has_one_creator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """gcsfuse, blobfuse and CIFS refuse ``link`` (EPERM / EOPNOTSUPP): create_once falls back to O_EXCL."""
    import errno
    import os

    def no_links(src: str, dst: str) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    fs = fsspec.filesystem("file")
    path = str(tmp_path / "marker.json")
    won = _race(fs, path)
    assert won.count(True) == 1
    assert Path(path).read_bytes() == f"writer {won.index(True)}".encode() * 1000
    assert [p.name for p in tmp_path.iterdir()] == ["marker.json"], "no staging file left behind"
    assert fences(fs, str(tmp_path))


@pytest.fixture
def s3_fs(s3):
    fs = fsspec.filesystem("s3", **s3.storage_options)
    if not fs.exists("once"):
        fs.mkdir("once")
    return fs


def test_exactly_one_s3_writer_creates_the_object(s3_fs) -> None:
    won = _race(s3_fs, "once/marker.json")
    assert won.count(True) == 1
    assert s3_fs.cat_file("once/marker.json") == f"writer {won.index(True)}".encode() * 1000
    assert not create_once(s3_fs, "once/marker.json", b"late"), "an existing object is never replaced"
    assert fences(s3_fs, "once")
    assert not [p for p in s3_fs.find("once") if "fence-probe" in p], "the probe is removed"


def test_a_server_that_ignores_if_none_match_is_found_out(s3_fs, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection: the header dropped on its way, as a server without conditional writes would ignore it."""
    call = s3_fs.call_s3

    def without_condition(method, *args, **kwargs):
        kwargs.pop("IfNoneMatch", None)
        return call(method, *args, **kwargs)

    monkeypatch.setattr(s3_fs, "call_s3", without_condition)
    assert not fences(s3_fs, "once")
