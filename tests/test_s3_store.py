"""`esam3 cache` from s3:// shards into an s3:// store on a real S3 server (SeaweedFS on 127.0.0.1), as a user
runs it: the standard AWS variables or --s3-endpoint, and no credential anywhere in output or in the store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest

SECRET = "test-secret"


@pytest.fixture(scope="module")
def shards_bucket(s3, demo_root: Path) -> str:
    fs = fsspec.filesystem("s3", **s3.storage_options)
    fs.mkdir("cache-shards")
    for path in sorted((demo_root / "sa-1b").glob("*.tar")):
        fs.put_file(str(path), f"cache-shards/sa-1b/{path.name}")
    fs.mkdir("cache-store")
    return "s3://cache-shards/sa-1b"


def _esam3(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("esam3")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=300)


def test_cache_into_an_s3_store_then_resume_info_verify(s3, shards_bucket: str) -> None:
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env = base_env | s3.env  # endpoint from AWS_ENDPOINT_URL
    store = "s3://cache-store/run1"
    args = ["cache", "--dataset", "sa-1b", "--source", shards_bucket, "--store", store, "--executor", "local", "--codec", "int8", "--json"]
    first = _esam3(args, env)
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout.strip().splitlines()[-1])
    assert (report["rows"], report["shards_committed"], report["store"]) == (6, 2, store)
    again = _esam3(args, env)
    assert again.returncode == 0 and json.loads(again.stdout.strip().splitlines()[-1])["nothing_to_do"]
    # The endpoint as a flag instead of the environment.
    flag_env = {k: v for k, v in env.items() if k != "AWS_ENDPOINT_URL"}
    info = _esam3(["store", "info", store, "--s3-endpoint", s3.endpoint, "--json"], flag_env)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["tables"]["images"]["rows"] == 6
    cleanup = _esam3(["store", "cleanup", store, "--older-than", "0s", "--json"], env)
    assert cleanup.returncode == 0, cleanup.stderr
    assert json.loads(cleanup.stdout)["tables"]["ledger"]["versions_left"] == 1
    verify = _esam3(["store", "verify", store, "--s3-endpoint", s3.endpoint], flag_env)
    assert verify.returncode == 0 and "ok: 6 rows" in verify.stdout
    for result in (first, again, info, cleanup, verify):
        assert SECRET not in result.stdout + result.stderr
    fs = fsspec.filesystem("s3", **s3.storage_options)
    files = [p for p in fs.find("cache-store/run1")]
    assert any(p.endswith("store.json") for p in files) and any("images.lance" in p for p in files)
    for path in files:
        assert SECRET.encode() not in fs.cat_file(path), f"credentials leaked into {path}"


def test_s3_errors_are_one_line(s3, shards_bucket: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | s3.env
    bad = _esam3(["store", "info", "s3://cache-store/run1", "--s3-endpoint", "localhost:1"], env)
    assert bad.returncode == 2 and "--s3-endpoint" in bad.stderr and "Traceback" not in bad.stderr
    missing = _esam3(["store", "info", "s3://cache-store/nothing-here"], env)
    assert missing.returncode == 2 and "is not an esam3 store" in missing.stderr
    down = _esam3(["store", "info", "s3://cache-store/run1", "--s3-endpoint", "http://127.0.0.1:9"], env | {"AWS_MAX_ATTEMPTS": "1"})
    assert down.returncode == 1 and "storage error: Could not connect to the endpoint URL" in down.stderr, down.stderr
    assert "Traceback" not in down.stderr and SECRET not in down.stderr
    assert SECRET not in bad.stderr + missing.stderr


def test_ray_plan_writes_an_s3_store(s3, shards_bucket: str) -> None:
    """The default executor: Ray workers get the store's options from the plan, not from their environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | s3.env
    result = _esam3(
        [
            "cache",
            "--dataset",
            "sa-1b",
            "--source",
            shards_bucket,
            "--store",
            "s3://cache-store/run2",
            "--codec",
            "lowrank",
            "--rank",
            "8",
            "--json",
        ],
        env,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["rows"] == 6
    verify = _esam3(["store", "verify", "s3://cache-store/run2", "--json"], env)
    assert verify.returncode == 0 and json.loads(verify.stdout)["ok"]
    assert SECRET not in result.stdout + result.stderr


def _s3_env(s3) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | s3.env


def _ledger_rows(s3, store: str) -> int:
    import lance

    from esam3.pipeline.object_store import S3Settings

    options = S3Settings(endpoint=s3.endpoint, region="us-east-1", key="test-key", secret=SECRET).lance_options(store)
    try:
        return lance.dataset(f"{store}/ledger.lance", storage_options=options).count_rows()
    except (OSError, ValueError):
        return 0


def _keys(s3, store: str) -> list[str]:
    import lance

    from esam3.pipeline.object_store import S3Settings

    options = S3Settings(endpoint=s3.endpoint, region="us-east-1", key="test-key", secret=SECRET).lance_options(store)
    table = lance.dataset(f"{store}/images.lance", storage_options=options).to_table(columns=["key"])
    return sorted(table.column("key").to_pylist())


def test_driver_lost_mid_run_resumes_from_the_ledger_on_s3(s3, shards_bucket: str) -> None:
    import signal
    import time

    store = "s3://cache-store/resume"
    args = [
        "cache",
        "--dataset",
        "sa-1b",
        "--source",
        shards_bucket,
        "--store",
        store,
        "--executor",
        "local",
        "--teacher",
        "small-random",
        "--batch-size",
        "1",
        "--json",
    ]
    exe = Path(sys.executable).with_name("esam3")
    process = subprocess.Popen([str(exe), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_s3_env(s3))
    deadline = time.monotonic() + 180
    while process.poll() is None and time.monotonic() < deadline:
        if _ledger_rows(s3, store) >= 1:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    assert process.wait(timeout=60) == -signal.SIGKILL, "the run ended before its driver could be killed"
    rerun = _esam3(args, _s3_env(s3))
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert report["shards_skipped"] == 1 and report["shards_committed"] == 1
    assert _keys(s3, store) == [f"sa1b/{i}" for i in range(1, 7)]
    assert _esam3(["store", "verify", store], _s3_env(s3)).returncode == 0


def test_concurrent_runs_on_different_shards_into_one_s3_store(s3, shards_bucket: str) -> None:
    store = "s3://cache-store/together"
    runs = [
        subprocess.Popen(
            [
                str(Path(sys.executable).with_name("esam3")),
                "cache",
                "--dataset",
                "sa-1b",
                "--source",
                shards_bucket,
                "--store",
                store,
                "--executor",
                "local",
                "--shards",
                shard,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_s3_env(s3),
        )
        for shard in ("0", "1")
    ]
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
    assert _keys(s3, store) == [f"sa1b/{i}" for i in range(1, 7)]
    assert _esam3(["store", "verify", store], _s3_env(s3)).returncode == 0


def test_s3_server_down_mid_run_then_back(tmp_path: Path, demo_root: Path) -> None:
    """The store's S3 server dies after the first commit, while the second shard still needs it, and stays down: the
    run fails cleanly (one line, exit 1, the first shard committed); with the server back, the same command finishes
    the rest, with every key once."""
    import time

    from tests.s3_server import s3_server

    data = tmp_path / "s3"
    data.mkdir()
    with s3_server(data) as server:
        fs = fsspec.filesystem("s3", **server.storage_options)
        fs.mkdir("flaky")
        for path in sorted((demo_root / "sa-1b").glob("*.tar")):
            fs.put_file(str(path), f"flaky/shards/{path.name}")
        store = "s3://flaky/store"
        args = [
            "cache",
            "--dataset",
            "sa-1b",
            "--source",
            "s3://flaky/shards",
            "--store",
            store,
            "--executor",
            "local",
            "--teacher",
            "small-random",
            "--batch-size",
            "1",
            "--read-retries",
            "0",
        ]
        exe = Path(sys.executable).with_name("esam3")
        # botocore's retries shortened: the outage is certain, waiting it out only makes the test slower
        env = _s3_env(server) | {"AWS_MAX_ATTEMPTS": "1"}
        run = subprocess.Popen([str(exe), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + 180
        while run.poll() is None and time.monotonic() < deadline and _ledger_rows(server, store) < 1:
            time.sleep(0.05)
        assert run.poll() is None, "the run ended before the server could be killed under it"
        port = server.port
    # The server is down now (killed), and stays down until the run has ended: the outage is always hit.
    out, err = run.communicate(timeout=600)
    assert run.returncode == 1 and "Traceback" not in err, err[-2000:]
    assert "rerun" in err and SECRET not in out + err
    with s3_server(data, port=port) as server:
        assert _ledger_rows(server, store) == 1, "the first shard stayed committed"
        rerun = _esam3([*args, "--json"], _s3_env(server))
        assert rerun.returncode == 0, rerun.stderr
        report = json.loads(rerun.stdout.strip().splitlines()[-1])
        assert (report["shards_skipped"], report["shards_committed"]) == (1, 1)
        assert _keys(server, store) == [f"sa1b/{i}" for i in range(1, 7)]
        assert _esam3(["store", "verify", store], _s3_env(server)).returncode == 0


def test_credentials_are_redacted_from_errors(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Server replies can echo the access key or token; the CLI's one-line errors never show them."""
    import typer

    from esam3.console import user_errors
    from esam3.schemas.store import StoreError

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    with pytest.raises(typer.Exit):
        with user_errors():
            raise StoreError("SignatureDoesNotMatch for AKIAEXAMPLEKEY (secret very-secret-value)")
    err = capsys.readouterr().err
    assert "AKIAEXAMPLEKEY" not in err and "very-secret-value" not in err and "***" in err
    from typer.testing import CliRunner

    from esam3.cli import app

    result = CliRunner().invoke(app, ["store", "info", "s3://b/s", "--s3-endpoint", "http://user:pass@host:9000"])
    assert result.exit_code == 2 and "user:pass" not in result.output


def test_wrong_secret_is_refused_cleanly_and_never_shown(tmp_path: Path, demo_root: Path) -> None:
    """A server that checks signatures (SeaweedFS with one identity): the right keys work end to end; a wrong
    secret gives a one-line error on every command, with neither secret nor the key id in it."""
    from tests.s3_server import s3_server

    key, secret, wrong = "AKIAESAM3TESTKEY", "right-secret-value", "wrong-secret-value"
    with s3_server(tmp_path, credentials=(key, secret)) as server:
        fs = fsspec.filesystem("s3", **server.storage_options)
        fs.mkdir("auth")
        for path in sorted((demo_root / "sa-1b").glob("*.tar")):
            fs.put_file(str(path), f"auth/sa-1b/{path.name}")
        good = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | server.env
        bad = good | {"AWS_SECRET_ACCESS_KEY": wrong}
        store = "s3://auth/store"
        cache = ["cache", "--dataset", "sa-1b", "--source", "s3://auth/sa-1b", "--store", store, "--executor", "local", "--shards", "0"]
        assert _esam3(cache, good).returncode == 0
        results = [
            _esam3(["scan", "--dataset", "sa-1b", "--source", "s3://auth/sa-1b"], bad),
            _esam3([*cache[:-1], "1"], bad),
            _esam3(["store", "info", store], bad),
            _esam3(["store", "verify", store], bad),
            _esam3(["store", "cleanup", store], bad),
            _esam3(["store", "show", store, "sa1b/1", "--out", str(tmp_path / "row.png")], bad),
        ]
        for result in results:
            output = result.stdout + result.stderr
            assert result.returncode in (1, 2), output
            errors = [line for line in result.stderr.splitlines() if line.startswith("esam3: error")]
            assert "Traceback" not in output and len(errors) == 1 and "check the S3 credentials" in errors[0], output
            assert secret not in output and wrong not in output and key not in output, output
        assert _esam3(["store", "verify", store], good).returncode == 0
        from esam3.pipeline.object_store import S3Settings
        from esam3.pipeline.store import Store
        from esam3.schemas.store import StoreError

        wrong_settings = S3Settings(endpoint=server.endpoint, region="us-east-1", key=key, secret=wrong)
        with pytest.raises(StoreError, match="access to images refused.*check the S3 credentials") as refused:
            Store(store, wrong_settings).dataset("images")  # straight to Lance, not through store.json
        assert wrong not in str(refused.value) and key not in str(refused.value)


def test_lance_io_errors_count_as_storage_failures() -> None:
    """Lance raises ValueError('LanceError(IO): ...') when S3 is down; the cache must treat it like an OSError."""
    from esam3.pipeline.object_store import storage_failed

    assert storage_failed(ValueError("LanceError(IO): Generic S3 error: Error performing list request"))
    assert storage_failed(ConnectionResetError("connection reset by peer"))
    assert not storage_failed(ValueError("rank must be in 1..8, got 9"))
    # a scan's error comes through Arrow's reader (seen when the server died during the ledger read after a commit)
    import pyarrow as pa

    assert storage_failed(
        pa.lib.ArrowInvalid(
            "External error: LanceError(IO): Generic N/A error: LanceError(IO): Generic S3 error: "
            "Error performing GET http://127.0.0.1:1/flaky/store/ledger.lance/data/x.lance"
        )
    )
    assert not storage_failed(pa.lib.ArrowInvalid("External error: schema mismatch\nLanceError(IO) further down"))
    # a commit (an index update) cut short by the server dying: Lance wraps it in a RuntimeError (seen in a clean-clone run)
    assert storage_failed(
        RuntimeError(
            "Wrapped error: Commit result for version 3 is unknown: the commit may or may not have "
            "been applied; check the table state before retrying: LanceError(IO): Generic S3 error"
        )
    )
    assert not storage_failed(RuntimeError("CUDA error: an illegal memory access was encountered"))


def test_refusals_are_recognised_from_any_s3_server() -> None:
    """A refusal is the user's to fix (exit 2, the credentials hint), whatever words the server uses for it."""
    from esam3.pipeline.object_store import access_refused

    assert access_refused(PermissionError("Access Denied"))
    assert access_refused(ValueError("LanceError(IO): Generic S3 error: Client error with status 403 Forbidden: <Code>AccessDenied</Code>"))
    assert access_refused(OSError("An error occurred (ExpiredToken) when calling the PutObject operation: token expired"))
    assert access_refused(OSError("<Error><Code>SignatureDoesNotMatch</Code></Error>"))
    assert not access_refused(OSError("An error occurred (SlowDown) when calling the PutObject operation"))


def test_a_card_replaced_while_read_is_read_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs creating one S3 store can replace store.json under a reader (s3fs FileExpired, EBUSY): read again."""
    import errno

    from esam3.pipeline.store import Store

    store = Store(str(tmp_path / "store"))
    store.fs.makedirs(store.path, exist_ok=True)
    (tmp_path / "store" / "store.json").write_text('{"format": 2}')
    real_open, calls = store.fs.open, {"n": 0}

    def expiring_open(path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.EBUSY, "The remote file corresponding to filename store.json and Etag x no longer exists.")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(store.fs, "open", expiring_open)
    assert store._read_json("store.json") == {"format": 2} and calls["n"] >= 2  # failed once, then read
