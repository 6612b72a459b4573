"""Credentials for multi-day runs: none travels inside the plan to the workers; every process resolves them through
the standard chain when it talks to S3, so keys that a broker rotates mid-run (short-lived keys from a
``credential_process``, as SSO, vault or role tools hand out) are picked up, on a real S3 server whose accepted keys
change mid-run."""

from __future__ import annotations

import datetime as dt
import json
import pickle
from pathlib import Path

import fsspec
import pytest

from esam3.pipeline.object_store import S3Settings
from esam3.pipeline.plan import Run, build_steps, run_cache
from esam3.pipeline.store import Store
from esam3.pipeline.store.check import verify_store
from esam3.pipeline.store.snapshots import snapshots
from esam3.schemas.cache import CacheConfig
from esam3.workers import read_step
from esam3.workers.heads import Geometry


def test_no_credential_travels_in_the_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAPLANKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "plan-secret-value")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "plan-session-token")
    settings = S3Settings.from_environment("http://127.0.0.1:9")
    assert (settings.key, settings.secret, settings.token) == (None, None, None)
    config = CacheConfig(dataset="sa-1b", source="s3://shards/sa-1b", store="s3://bucket/store", codec="lowrank", rank=4)
    geometry = Geometry(112, 14, 8, 64, 32, 32, 16, (32, 16, 8))
    steps = build_steps(Run(config, Store(config.store, settings), geometry, "checksum", "run", "fingerprint"))
    shipped = pickle.dumps(steps)  # what Ray sends to every worker
    for secret in (b"AKIAPLANKEY", b"plan-secret-value", b"plan-session-token"):
        assert secret not in shipped
    assert Store(config.store, settings).storage_options["aws_secret_access_key"] == "plan-secret-value", "resolved where used"


def test_keys_rotated_mid_run_are_picked_up(tmp_path: Path, demo_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.s3_server import s3_server

    keys = tmp_path / "keys.json"

    def issue(key: str, secret: str) -> None:  # what the broker hands out: keys that expire in 5 minutes
        expiry = dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=5)
        keys.write_text(json.dumps({"Version": 1, "AccessKeyId": key, "SecretAccessKey": secret, "Expiration": expiry.isoformat()}))

    config_file = tmp_path / "aws-config"
    config_file.write_text(f"[profile rotating]\ncredential_process = cat {keys}\nregion = us-east-1\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config_file))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_PROFILE", "rotating")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    issue("key-one", "secret-one")
    data = tmp_path / "s3"
    data.mkdir()
    servers = [s3_server(data, credentials=("key-one", "secret-one"))]
    server = servers[0].__enter__()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
        fs = fsspec.filesystem(
            "s3", key="key-one", secret="secret-one", client_kwargs={"endpoint_url": server.endpoint}, skip_instance_cache=True
        )
        fs.mkdir("rotating")
        uri = "s3://rotating/store"
        items = read_step.ReadImages.items
        rotated: list[str] = []

        def rotate_before_shard_1(self, shard):
            if shard.name == "sa_000001.tar" and not rotated:
                store = Store(uri)
                deadline = dt.datetime.now() + dt.timedelta(minutes=2)
                while not snapshots(store, "images") and dt.datetime.now() < deadline:  # shard 0 committed: its last step
                    pass
                servers[0].__exit__(None, None, None)  # the server now accepts only the new keys
                issue("key-two", "secret-two")
                servers[0] = s3_server(data, port=server.port, credentials=("key-two", "secret-two"))
                servers[0].__enter__()
                rotated.append(shard.name)
            return items(self, shard)

        monkeypatch.setattr(read_step.ReadImages, "items", rotate_before_shard_1)
        report = run_cache(CacheConfig(dataset="sa-1b", source=str(demo_root / "sa-1b"), store=uri, codec="int8"), executor="local")
        assert rotated == ["sa_000001.tar"] and report.shards_committed == 2 and report.exit_code == 0
        store = Store(uri)
        assert store.storage_options["aws_access_key_id"] == "key-two"
        assert verify_store(store).ok and store.dataset("images").count_rows() == 6
        from esam3.console import redact

        said = redact("SignatureDoesNotMatch: key-two / secret-two (was key-one / secret-one)")
        assert "secret-two" not in said and "secret-one" not in said, "keys from the chain are redacted, not only the environment's"
    finally:
        servers[0].__exit__(None, None, None)


def test_a_chain_without_credentials_is_not_asked_on_every_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore caches found credentials, not their absence (the instance-metadata lookup then costs seconds each
    time): 'none' is believed for a minute, and a change of the credential variables asks again at once."""
    import botocore.session

    from esam3.pipeline import object_store

    asked: list[int] = []

    class NoCredentials:
        def get_credentials(self):
            asked.append(1)
            return None

    monkeypatch.setattr(botocore.session, "get_session", NoCredentials)
    monkeypatch.setattr(object_store, "_SESSIONS", {})
    monkeypatch.setattr(object_store, "_NONE_UNTIL", {})
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    assert object_store.chain_credentials() is None and object_store.chain_credentials() is None
    assert len(asked) == 1
    monkeypatch.setenv("AWS_PROFILE", "other")
    assert object_store.chain_credentials() is None and len(asked) == 2
    monkeypatch.setattr(object_store, "NO_CREDENTIALS_RECHECK_S", 0.0)
    monkeypatch.setattr(object_store, "_NONE_UNTIL", {})
    object_store.chain_credentials()
    object_store.chain_credentials()
    assert len(asked) == 4
