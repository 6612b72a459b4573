"""Create a file once: of any number of writers racing to create one path, exactly one succeeds.

This is what fences the cache's commits (a shard's commit marker), and what makes a store's card, its low-rank
basis and a run's claim safe to create from many processes at once. Readers never see half a file:

* local disks: the bytes go to a temporary file that is then hard-linked into place (``link`` fails if the
  path exists, atomically, on every POSIX file system); mounts without hard links (gcsfuse, blobfuse, CIFS) get
  ``O_CREAT | O_EXCL`` instead, atomic as well, with one difference: a reader may meet the file before its
  bytes are all written (the callers' files are small, one ``write``);
* S3 and S3-compatible servers: one ``PutObject`` with ``If-None-Match: *`` (AWS since 2024, MinIO, Ceph RGW,
  SeaweedFS); the server answers 412 to every writer but the first. A server that ignores the header cannot
  fence: :func:`fences` finds out with two writes of a probe object, and the cache warns.

Other fsspec file systems get a check-then-rename that narrows the race but does not close it.
"""

from __future__ import annotations

import errno
import logging
import os
import uuid
from typing import Any

log = logging.getLogger(__name__)


def _s3_codes(exc: BaseException) -> set[str]:
    """S3 error codes of an error, whether s3fs passes botocore's error on or translates it into an OSError."""
    codes = set()
    for err in (exc, exc.__cause__, exc.__context__):
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            codes.add(str(response.get("Error", {}).get("Code")))
    return codes


def _precondition_failed(exc: BaseException) -> bool:
    """An S3 412: the object exists."""
    text = str(exc)
    return (
        bool(_s3_codes(exc) & {"PreconditionFailed", "412"})
        or "PreconditionFailed" in text
        or "pre-conditions you specified did not hold" in text
    )


def _conflict(exc: BaseException) -> bool:
    """AWS's 409 ConditionalRequestConflict: another conditional write of the key is in flight; ask again."""
    return "ConditionalRequestConflict" in str(exc) or "ConditionalRequestConflict" in _s3_codes(exc)


def _protocol(fs: Any) -> str:
    protocol = fs.protocol
    return protocol if isinstance(protocol, str) else protocol[0]


def create_once(fs: Any, path: str, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists; True if this call created it.

    ``fs`` is the fsspec file system of ``path`` (``Store.fs``); parent folders are made as needed. ``data`` should
    be unique to the writer (a run id, a time): on S3, a writer whose request was retried knows it won only by
    finding its own bytes there.
    """
    protocol = _protocol(fs)
    if protocol in ("file", "local"):
        return _create_local(path, data)
    if protocol in ("s3", "s3a"):
        return _create_s3(fs, path, data)
    log.warning("%s:// cannot create files atomically: two runs at once could both create %s", protocol, path)
    if fs.exists(path):
        return False
    staging = f"{path}.{uuid.uuid4().hex}.tmp"
    fs.pipe_file(staging, data)
    fs.mv(staging, path)
    return True


def _create_local(path: str, data: bytes) -> bool:
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    staging = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    with open(staging, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(staging, path)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        return _create_exclusive(path, data)
    finally:
        os.unlink(staging)


#: What ``link`` raises where the file system has no hard links.
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK}


def _create_exclusive(path: str, data: bytes) -> bool:
    """``open(O_CREAT | O_EXCL)``: atomic where hard links are missing; the bytes follow in one write."""
    try:
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(handle, data)
        os.fsync(handle)
    finally:
        os.close(handle)
    return True


def _create_s3(fs: Any, path: str, data: bytes, attempts: int = 5) -> bool:
    bucket, key, _ = fs.split_path(path)
    for attempt in range(1, attempts + 1):
        try:
            fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            created = True
        except OSError as exc:
            if not _precondition_failed(exc):
                if _conflict(exc) and attempt < attempts:
                    continue
                raise
            # A 412 is also what a retried request of the writer that did create it gets (botocore retries a
            # request whose answer was slow): so the bytes decide.
            fs.invalidate_cache(path)
            try:
                created = fs.cat_file(path) == data
            except FileNotFoundError:  # removed since (a claim whose run ended): it existed, and it was not ours
                created = False
        fs.invalidate_cache(path)
        return created
    return False  # not reached: the last attempt returns or raises


def fences(fs: Any, folder: str) -> bool:
    """Whether the storage under ``folder`` refuses a second create of one path (see the module docstring): two
    writes of a fresh probe object, then the probe is removed (so it also checks that the folder is writable)."""
    probe = f"{folder}/.fence-probe-{uuid.uuid4().hex}"
    try:
        first = create_once(fs, probe, b"1")
        second = create_once(fs, probe, b"2")
        return first and not second
    finally:
        try:
            fs.rm(probe)
        except FileNotFoundError:
            pass
