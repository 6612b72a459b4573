"""Stage 1 from the store alone: training, checkpoints, exact resume, TensorBoard, the CLI and its refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from esam3.cli import app
from esam3.pipeline.plan import run_cache
from esam3.schemas.cache import CacheConfig
from esam3.schemas.train import Stage1Config
from esam3.train.checkpoint import STUDENT_WEIGHTS, CheckpointError, latest_checkpoint
from esam3.train.loop import TrainResult, lr_at
from esam3.train.stage1 import TrainError, run_stage1

BASE = dict(student="es-ev-s", batch_size=2, loader_workers=0, val_percent=0, lr=2e-3, seed=3)


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / STUDENT_WEIGHTS))


def test_stage1_learns_from_the_store_alone_and_logs_it(sa1b_store: Path, tmp_path: Path, no_teacher_trunk: None) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reports = []
    config = Stage1Config(
        store=str(sa1b_store),
        out=tmp_path / "run",
        steps=8,
        checkpoint_every=4,
        log_every=2,
        gt_weight=0.5,
        max_prompts=4,
        **{**BASE, "batch_size": 6},
    )  # the whole train split every step: the loss must fall
    result = run_stage1(config, on_step=reports.append)
    assert [r.step for r in reports] == list(range(1, 9)) and result.steps == 8 and result.train_rows == 6
    first, last = reports[0].terms, reports[-1].terms
    assert set(first) == {"mse", "cosine", "mask_bce", "mask_dice", "iou_l1", "gt_bce", "gt_dice", "total"}
    assert all(torch.isfinite(torch.tensor(v)) for v in last.values())
    assert last["total"] < first["total"] and last["mse"] < first["mse"]
    assert result.checkpoint == latest_checkpoint(config.out) == config.out / "checkpoints" / "step-00000008"
    assert sorted(p.name for p in (config.out / "checkpoints").iterdir() if p.is_dir()) == ["step-00000004", "step-00000008"]
    saved = json.loads((result.checkpoint / "config.json").read_text())
    assert saved["store"]["version"] == result.store_version and saved["student"]["trunk_width"] == 64
    assert saved["config"]["gt_weight"] == 0.5 and {"torch", "timm", "transformers", "lance", "esam3"} <= set(saved["versions"])
    events = EventAccumulator(str(config.out / "tensorboard")).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {
        "loss/mse",
        "loss/cosine",
        "loss/mask_bce",
        "loss/mask_dice",
        "loss/iou_l1",
        "loss/total",
        "train/lr",
        "train/grad_norm",
        "train/samples_per_sec",
        "train/data_wait_share",
    } <= scalars
    assert [e.step for e in events.Scalars("loss/total")] == [2, 4, 6, 8]
    assert events.Tags()["images"] == ["masks/input_teacher_student"]


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(sa1b_store: Path, tmp_path: Path) -> None:
    """Killed mid-epoch and resumed: the same weights as an uninterrupted run, bit for bit. TinyViT-11M draws drop
    path and --max-prompts draws prompts: both come back the same."""
    config = dict(store=str(sa1b_store), steps=4, checkpoint_every=1, accumulate=2, max_prompts=2, **{**BASE, "student": "es-tv-m"})
    straight = run_stage1(Stage1Config(out=tmp_path / "straight", **config))

    class Killed(Exception):
        pass

    def kill_after_1(report) -> None:
        if report.step == 1:
            raise Killed

    with pytest.raises(Killed):
        run_stage1(Stage1Config(out=tmp_path / "resumed", **config), on_step=kill_after_1)
    first = latest_checkpoint(tmp_path / "resumed")
    assert first.name == "step-00000001" and json.loads((first / "trainer.json").read_text())["batches_in_epoch"] == 2  # of 3
    stale = tmp_path / "resumed" / "checkpoints" / "step-00000009"  # left by a crash after its rename, before `latest`
    shutil.copytree(first, stale)
    resumed = run_stage1(Stage1Config(out=tmp_path / "resumed", resume=True, **config))
    a, b = weights(straight.checkpoint), weights(resumed.checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not stale.exists()
    # a finished run resumed again has nothing left to do and keeps its weights
    again = run_stage1(Stage1Config(out=tmp_path / "resumed", resume=True, **config))
    assert again.steps == 4 and all(torch.equal(a[k], v) for k, v in weights(again.checkpoint).items())


def test_a_broken_checkpoint_is_one_line_not_a_fresh_start(sa1b_store: Path, tmp_path: Path) -> None:
    config = dict(store=str(sa1b_store), out=tmp_path / "run", steps=2, checkpoint_every=1, **BASE)
    run_stage1(Stage1Config(**config))
    newest = latest_checkpoint(tmp_path / "run")
    (newest / "optimizer.safetensors").write_bytes(b"cut short")
    with pytest.raises(CheckpointError, match="unreadable trainer state .*resume from an older step folder"):
        run_stage1(Stage1Config(**{**config, "resume": True}))
    shutil.rmtree(newest)
    with pytest.raises(CheckpointError, match="names step-00000002, which is missing"):
        run_stage1(Stage1Config(**{**config, "resume": True}))
    result = CliRunner().invoke(app, ["eval", "--checkpoint", str(tmp_path / "run")])
    assert result.exit_code == 2 and "which is missing" in result.output and "Traceback" not in result.output


def test_a_run_folder_is_not_overwritten_and_resume_keeps_the_settings(sa1b_store: Path, tmp_path: Path) -> None:
    config = dict(store=str(sa1b_store), out=tmp_path / "run", steps=1, **BASE)
    run_stage1(Stage1Config(**config))
    with pytest.raises(TrainError, match="holds a run .*pass --resume"):
        run_stage1(Stage1Config(**config))
    with pytest.raises(TrainError, match="--resume: --lr, --student differ"):
        run_stage1(Stage1Config(**{**config, "lr": 1e-4, "student": "es-rv-s", "resume": True}))


def test_lr_warms_up_then_follows_the_cosine() -> None:
    lrs = [lr_at(step, 20, 1e-3, 1e-5, 0.1) for step in range(20)]
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:])) and lrs[-1] == pytest.approx(1e-5, rel=0.1)


@pytest.fixture(scope="module")
def bare_store(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One demo shard cached with trunk targets only and no inputs."""
    root = tmp_path_factory.mktemp("bare") / "store"
    run_cache(
        CacheConfig(dataset="sa-1b", source=str(demo_root / "sa-1b"), shards="0", store=str(root), targets=("trunk",), inputs="none"),
        executor="local",
    )
    return root


def test_the_cli_refuses_stores_a_student_cannot_train_from(bare_store: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["train", "stage1", "--store", str(bare_store), "--out", str(tmp_path / "run"), "--steps", "1", "--val-percent", "0"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "cached without prompt targets" in result.output and "--prompt-weight 0" in result.output
    result = runner.invoke(app, [*args, "--prompt-weight", "0", "--iou-weight", "0"])
    assert result.exit_code == 2 and "--inputs none" in result.output and "re-cache with --inputs store" in result.output


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--steps", "2", "--epochs", "1"], "give --steps or --epochs, not both"),
        (["--student", "es-xx-m"], "--student: unknown student 'es-xx-m'"),
        (["--warmup", "1.5"], "--warmup: Input should be less than 1"),
        (["--batch-size", "0"], "--batch-size: Input should be greater than or equal to 1"),
        (["--prompt-weight", "0", "--iou-weight", "0", "--feature-weight", "0", "--cosine-weight", "0"], "every loss weight is 0"),
        (["--lr", "1e-6", "--min-lr", "1e-5"], "min_lr 1e-05 is above lr 1e-06"),
        (["--version", "3", "--tag", "x"], "give --version or --tag, not both"),
        (["--s3-endpoint", "http://user:pw@host:1"], "--s3-endpoint: expected http(s)://HOST[:PORT]"),
        (["--batch-size", "8"], "fewer than one step of 8 x 1"),
        (["--workers", "0"], "--workers: Input should be greater than or equal to 1"),
        (["--address", "ray://head:10001"], "Ray Client (ray://) cannot run Ray Train"),
    ],
)
def test_stage1_flags_are_checked(sa1b_store: Path, tmp_path: Path, flags: list[str], message: str) -> None:
    result = CliRunner().invoke(
        app, ["train", "stage1", "--store", str(sa1b_store), "--out", str(tmp_path / "r"), "--val-percent", "0", *flags]
    )
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_the_cli_reads_a_config_file_and_flags_win(sa1b_store: Path, tmp_path: Path) -> None:
    config = tmp_path / "stage1.toml"
    config.write_text(
        f'store = "{sa1b_store}"\nstudent = "es-rv-s"\nbatch-size = 2\nsteps = 5\nval_percent = 0\nloader_workers = 0\nlr = 1e-3\n'
    )
    result = CliRunner().invoke(app, ["train", "stage1", "--config", str(config), "--out", str(tmp_path / "run"), "--steps", "2", "--json"])
    assert result.exit_code == 0, result.output
    line = json.loads(result.output.strip().splitlines()[-1])
    assert line["steps"] == 2 and line["train_rows"] == 6 and line["terms"]["total"] > 0
    saved = json.loads((Path(line["checkpoint"]) / "config.json").read_text())["config"]
    assert saved["student"] == "es-rv-s" and saved["steps"] == 2 and saved["batch_size"] == 2
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = [")
    result = CliRunner().invoke(app, ["train", "stage1", "--config", str(bad), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "not valid TOML" in result.output
    result = CliRunner().invoke(app, ["train", "stage1", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--store is required" in result.output
    shutil.rmtree(tmp_path / "run")


def test_two_ray_train_workers_take_the_steps_of_one_worker_with_their_joint_batch(sa1b_store: Path, tmp_path: Path) -> None:
    """--workers 2 on a local Ray (gloo, CPU): each rank reads its own half of every batch, DDP averages the
    gradients and BatchNorm sees the whole batch, so 2 x batch 2 ends where 1 x batch 4 ends."""
    from esam3.train.distributed import train
    from esam3.train.model import StudentModel

    config = dict(store=str(sa1b_store), student="es-ev-s", loader_workers=0, val_percent=0, lr=1e-3, steps=3, warmup=0.0, seed=5)
    one = train(Stage1Config(out=tmp_path / "one", batch_size=4, **config))
    alone = train(Stage1Config(out=tmp_path / "alone", batch_size=2, **config))  # what one rank's half alone gives
    steps = []
    two = train(Stage1Config(out=tmp_path / "two", batch_size=2, workers=2, **config), on_step=steps.append)
    assert [s.step for s in steps] == [1, 2, 3] and two.steps == 3 and two.checkpoint == tmp_path / "two" / "checkpoints" / "step-00000003"
    saved = json.loads((two.checkpoint / "config.json").read_text())
    assert saved["world_size"] == 2 and saved["config"]["workers"] == 2

    def outputs(run: Path) -> torch.Tensor:
        with torch.no_grad():
            return StudentModel.from_checkpoint(run).trunk(
                torch.arange(2 * 3 * 112 * 112).reshape(2, 3, 112, 112).remainder(251).to(torch.uint8)
            )

    reference = outputs(tmp_path / "one")
    assert float((outputs(tmp_path / "two") - reference).norm() / reference.norm()) < 1e-3
    assert float((outputs(tmp_path / "alone") - reference).norm() / reference.norm()) > 1e-2

    def distance(run: TrainResult) -> torch.Tensor:
        a, b = weights(one.checkpoint), weights(run.checkpoint)
        return torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a if a[k].is_floating_point()])

    together, apart = distance(two), distance(alone)
    print("weights |2 workers - 1 worker| mean, max:", float(together.mean()), float(together.max()), "; half batch:", float(apart.mean()))
    # Weights agree to float precision except where a gradient is pure rounding noise (the bias of a layer that a
    # BatchNorm follows): Adam moves those by up to lr per step whatever the noise's size
    assert float(together.mean()) < 0.05 * float(apart.mean()) and float(together.max()) <= 2 * 1e-3 * 3


def _global_batchnorm_rank(rank: int, port: int, x: torch.Tensor, out: dict) -> None:
    """One of two gloo ranks: GlobalBatchNorm2d on its half of ``x``; its output, input gradient, running stats."""
    import torch.distributed as dist

    from esam3.train.distributed import global_batchnorm

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        norm = global_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3)))
        with torch.no_grad():
            norm[0].weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
            norm[0].bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        half = x[rank * 3 : rank * 3 + 3].clone().requires_grad_(True)
        y = norm(half)
        (y * torch.arange(y.numel()).reshape(y.shape).sin()).sum().backward()  # gradient through the global statistics
        out[rank] = (y.detach(), half.grad, norm[0].running_mean.clone(), norm[0].running_var.clone())
    finally:
        dist.destroy_process_group()


def test_global_batchnorm_on_two_ranks_is_batchnorm_on_the_whole_batch() -> None:
    """Two gloo processes, each with half the batch: outputs, input gradients and running statistics equal those of
    one BatchNorm2d over the whole batch."""
    import socket

    import torch.multiprocessing as mp

    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 5) * 3 + 1
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with mp.get_context("spawn").Manager() as manager:
        out = manager.dict()
        mp.spawn(_global_batchnorm_rank, args=(port, x, out), nprocs=2, join=True)
        results = dict(out)
    whole = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        whole.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        whole.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    inputs = x.clone().requires_grad_(True)
    y = whole(inputs)
    torch.cat([(y[r * 3 : r * 3 + 3] * torch.arange(y[:3].numel()).reshape(y[:3].shape).sin()) for r in (0, 1)]).sum().backward()
    assert torch.allclose(torch.cat([results[0][0], results[1][0]]), y.detach(), atol=1e-5)
    assert torch.allclose(torch.cat([results[0][1], results[1][1]]), inputs.grad, atol=1e-5)
    for rank in (0, 1):
        assert torch.allclose(results[rank][2], whole.running_mean, atol=1e-6)
        assert torch.allclose(results[rank][3], whole.running_var, atol=1e-5)
