"""The ``esam3`` command line: a thin typer layer over library functions that work the same from Python.

Each command builds a pydantic config (or parses a spec), calls one library function and reports with rich.
User mistakes (bad flags, bad ``--shards``, missing sources) print one line and exit 2, without a traceback.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import typer
from rich.logging import RichHandler
from rich.table import Table
from rich.text import Text

from esam3 import __version__
from esam3.console import UsageError, build_config, console, err_console, human_bytes, print_json, progress, user_errors
from esam3.pipeline.demo_data import write_demo_data
from esam3.pipeline.scan import ScanReport, scan
from esam3.pipeline.shards import DatasetName, ShardRef, select_shards
from esam3.schemas.demo import DemoDataConfig
from esam3.schemas.samples import Failure
from esam3.schemas.shards import ShardSpec
from esam3.cache_cli import cache_command, plan_command
from esam3.store_cli import store_app
from esam3.teacher_cli import teacher_app
from esam3.train_cli import train_app
from esam3.model_cli import eval_command, export_command, predict_command

log = logging.getLogger("esam3")

app = typer.Typer(
    name="esam3",
    help="Run the SAM3 teacher once into a Lance feature store, then distil students from the store.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
app.add_typer(teacher_app, name="teacher")
app.add_typer(store_app, name="store")
app.add_typer(train_app, name="train")
app.command("cache")(cache_command)
app.command("plan")(plan_command)
app.command("eval")(eval_command)
app.command("export")(export_command)
app.command("predict")(predict_command)


def _version(value: bool) -> None:
    if value:
        console.print(f"esam3 {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log each step (INFO), including every bad sample."),
) -> None:
    """esam3: a distributed feature cache and data pipeline for distilling SAM3 into small students."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False)],
        force=True,
    )


def scan_table(report: ScanReport) -> Table:
    table = Table(title=Text(f"{report.dataset} at {report.source}"), title_justify="left")
    for column in ("shards", "samples", "masks" if report.dataset == "sa-1b" else "masklets", "frames", "sizes (HxW)", "failures"):
        table.add_column(column, justify="right")
    sizes = "-" if report.min_size is None else f"{report.min_size[0]}x{report.min_size[1]} .. {report.max_size[0]}x{report.max_size[1]}"
    frames = str(report.frames) if report.dataset == "sa-v" else "-"
    table.add_row(
        str(len(report.shards)),
        str(report.samples),
        str(report.masks),
        frames,
        sizes,
        f"[red]{len(report.failures)}[/]" if report.failures else "0",
    )
    return table


def failures_table(failures: list[Failure], limit: int = 20) -> Table:
    table = Table(title=f"failures ({len(failures)}; first {min(limit, len(failures))})", title_justify="left")
    for column in ("shard", "member", "reason"):
        table.add_column(column, overflow="fold")
    for failure in failures[:limit]:
        table.add_row(Text(failure.shard), Text(failure.member), Text(failure.reason))
    return table


def run_scan(dataset: DatasetName, source: str, shards: str, s3_endpoint: str | None = None) -> ScanReport:
    """Scan with a progress bar (shards done, samples and failures so far); spec errors come before the bar."""
    from esam3.cache_cli import s3_settings

    storage = s3_settings(s3_endpoint).fsspec_options(source)
    selected = select_shards(source, dataset, ShardSpec.parse(shards), storage)
    with progress() as bar:
        task = bar.add_task(f"scan {dataset.value}", total=len(selected), status="")

        def shard_done(_: ShardRef, report: ScanReport) -> None:
            bar.update(task, advance=1, status=f"{report.samples} samples, {len(report.failures)} failed")

        return scan(dataset, source, selected, storage, on_shard=shard_done)


@app.command("demo-data")
def demo_data(
    out: Path = typer.Option(..., "--out", help="Folder to write sa-1b/sa_000000.tar ... and sa-v/sav_000.tar ... into."),
    seed: int = typer.Option(0, help="Random seed; the same seed and flags give byte-identical shards."),
    sa1b_shards: int = typer.Option(2, "--sa1b-shards", help="SA-1B tar shards to write (0 for none)."),
    images_per_shard: int = typer.Option(8, help="Images per SA-1B shard."),
    sav_shards: int = typer.Option(1, "--sav-shards", help="SA-V tar shards to write (0 for none)."),
    videos_per_shard: int = typer.Option(2, help="Videos per SA-V shard."),
    image_short_side: int = typer.Option(1500, help="Short side of the largest images (SA-1B uses 1500); others are 0.6-0.8x."),
    video_width: int = typer.Option(640, help="Video width in pixels (even)."),
    video_height: int = typer.Option(480, help="Video height in pixels (even)."),
    video_seconds: float = typer.Option(3.0, help="Video length in seconds at 24 fps."),
) -> None:
    """Write small SA-1B / SA-V shards in the released formats: real JPEGs and H.264 mp4s, exact JSON schemas."""
    with user_errors():
        config = build_config(
            DemoDataConfig,
            out=out,
            seed=seed,
            sa1b_shards=sa1b_shards,
            images_per_shard=images_per_shard,
            sav_shards=sav_shards,
            videos_per_shard=videos_per_shard,
            image_short_side=image_short_side,
            video_width=video_width,
            video_height=video_height,
            video_seconds=video_seconds,
        )
    write_demo(config)


def write_demo(config: DemoDataConfig) -> list[Path]:
    with progress() as bar:
        task = bar.add_task("demo data", total=config.sa1b_shards + config.sav_shards, status="")
        paths = write_demo_data(config, on_shard=lambda path: bar.update(task, advance=1, status=path.name))
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / "demo-data.json").write_text(config.model_dump_json(indent=2) + "\n")
    log.info("wrote %d shards under %s", len(paths), config.out)
    return paths


@app.command("scan")
def scan_command(
    dataset: DatasetName = typer.Option(..., "--dataset", help="Which dataset format the shards are in."),
    source: str = typer.Option(..., "--source", help="Folder or fsspec URL (s3://...) holding the tar shards."),
    shards: str = typer.Option("all", "--shards", help="Shards to read: all, 7, 0-99, 0,3,7-9."),
    s3_endpoint: str = typer.Option(None, "--s3-endpoint", help="S3-compatible endpoint (http(s)://HOST:PORT) for s3:// sources."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON line with the counts and every failure."),
) -> None:
    """Read shards end to end with every check the cache runs; exit 1 if any sample failed."""
    with user_errors():
        report = run_scan(dataset, source, shards, s3_endpoint)
    if as_json:
        print_json(report.to_json())
    else:
        console.print(scan_table(report))
        if report.failures:
            console.print(failures_table(report.failures))
    if report.failures:
        raise typer.Exit(1)


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("esam3-demo"), "--out", help="Working folder for the demo's data and store."),
    seed: int = typer.Option(0, help="Seed of the generated data."),
    executor: str = typer.Option("ray", "--executor", help="ray (a local Ray, the default) or local (no Ray)."),
) -> None:
    """The main job on the embedded defaults (demo data, tiny teacher, local Ray), then a student from its store.

    Generates the data (reused on a rerun), checks it, runs ``esam3 cache`` for both datasets into OUT/store on a
    local Ray and verifies the store; then ``esam3 train stage1`` (OUT/stage1), ``esam3 eval``, ``esam3 export``
    (OUT/model), a COCO-format eval on the demo images and ``esam3 predict`` (OUT/predict.png); then ``esam3 train
    stage2`` (OUT/stage2), J&F, the video export (OUT/video-model) and a tracked strip (OUT/predict-video.png). A rerun
    resumes: finished shards and training steps are skipped.
    """
    from esam3.cache_cli import cache_progress, summary_table
    from esam3.pipeline.plan import run_cache
    from esam3.pipeline.ray_plan import ray_session
    from esam3.pipeline.store import Store
    from esam3.pipeline.store.check import verify_store
    from esam3.schemas.cache import CacheConfig

    with user_errors():
        if executor not in ("ray", "local"):
            raise UsageError(f"--executor: expected ray or local, got {executor!r}")
        config = build_config(DemoDataConfig, out=out / "data", seed=seed)
        if _same_demo_data(config):
            log.warning("demo data already at %s (same settings): reusing it", config.out)
        else:
            write_demo(config)
        for dataset, folder in ((DatasetName.SA1B, "sa-1b"), (DatasetName.SAV, "sa-v")):
            report = run_scan(dataset, str(config.out / folder), "all")
            console.print(scan_table(report))
            if report.failures:
                console.print(failures_table(report.failures))
                raise typer.Exit(1)
        store = out / "store"
        results = []
        with ray_session(None, enabled=executor == "ray"), progress() as bar:
            for dataset, folder in ((DatasetName.SA1B, "sa-1b"), (DatasetName.SAV, "sa-v")):
                task = bar.add_task(f"cache {dataset.value}", total=None, status="starting")
                cache = CacheConfig(dataset=dataset.value, source=str(config.out / folder), store=str(store))
                result = run_cache(cache, executor=executor, on_progress=cache_progress(bar, task))
                bar.update(task, total=1, completed=1, status="done" if not result.nothing_to_do else "already cached")
                results.append(result)
        verified = verify_store(Store(str(store)))
    for result in results:
        console.print(summary_table(result))
    console.print(
        Text(
            f"store {store}: {verified.rows_checked} rows, {verified.tensors_checked} tensors verified"
            + ("" if verified.ok else f"; PROBLEMS: {verified.problems[:3]}")
        )
    )
    if not verified.ok:
        raise typer.Exit(1)
    images, videos = _demo_students(store, config.out, out)
    console.print(student_table(images, videos))


def _demo_students(store: Path, data: Path, out: Path) -> tuple[Any, Any]:
    from esam3.train.demo import DEMO_STAGE2_STEPS, DEMO_STEPS, DEMO_STUDENT, demo_student, demo_video_student

    with user_errors(), progress() as bar:

        def updater(task: Any) -> Any:
            def update(report: Any) -> None:
                bar.update(task, completed=report.step, status=f"loss {report.terms['total']:.4g}, {report.samples_per_sec:.1f} samples/s")

            return update

        first = bar.add_task(f"train stage 1: {DEMO_STUDENT}", total=DEMO_STEPS, status="opening the store")
        images = demo_student(store, data / "sa-1b", out, on_step=updater(first))
        second = bar.add_task("train stage 2: memory", total=DEMO_STAGE2_STEPS, status="opening the store")
        videos = demo_video_student(store, data / "sa-v", out, on_step=updater(second))
    return images, videos


def student_table(demo: Any, video: Any) -> Table:
    """Where each of the demo's student steps went."""
    table = Table(title="a student from the store", title_justify="left")
    for column in ("step", "result", "written to"):
        table.add_column(column, overflow="fold")
    loss = demo.train.terms.get("total", float("nan"))
    table.add_row(
        "esam3 train stage1",
        f"{demo.train.steps} steps of {demo.train.train_rows} train rows, final loss {loss:.4g}",
        str(demo.train.checkpoint),
    )
    table.add_row(
        "esam3 eval",
        f"val split ({demo.eval.rows} rows, {demo.eval.prompts} prompts): mask mIoU vs the teacher "
        f"{demo.eval.miou_teacher:.3f}, vs GT {demo.eval.miou_gt:.3f}; feature cosine {demo.eval.feature_cosine:.3f}",
        "-",
    )
    table.add_row("esam3 export", f"{demo.export.parameters / 1e6:.2f}M parameters, {human_bytes(demo.export.bytes)}", str(demo.export.out))
    table.add_row("esam3 eval (COCO format)", f"box-prompt mIoU {demo.coco.miou:.3f} over {demo.coco.annotations} objects", "-")
    table.add_row("esam3 predict", f"a click and a box, {demo.predict_ms:.0f} ms", str(demo.picture))
    loss = video.train.terms.get("total", float("nan"))
    table.add_row(
        "esam3 train stage2",
        f"{video.train.steps} steps on {video.train.train_rows} frames, final loss {loss:.4g}; {video.memory}",
        str(video.train.checkpoint),
    )
    gt, teacher = video.eval.jf_gt, video.eval.jf_teacher
    table.add_row(
        "esam3 eval (video)",
        f"J&F vs GT {gt['J&F']:.3f}, vs the teacher {teacher['J&F']:.3f} on the demo's "
        f"{video.eval.videos} videos (trained on; random-weight teacher: a plumbing check)",
        "-",
    )
    table.add_row(
        "esam3 export (video)", f"{video.export.parameters / 1e6:.2f}M parameters, {human_bytes(video.export.bytes)}", str(video.export.out)
    )
    table.add_row(
        "esam3 predict --video",
        f"{video.frames} frames tracked from first-frame masks, {video.ms_per_frame:.0f} ms per frame "
        f"(SAM3's tracker at this size: {video.sam3_ms_per_frame:.0f} ms)",
        str(video.strip),
    )
    return table


def _same_demo_data(config: DemoDataConfig) -> bool:
    """Whether ``config.out`` already holds demo data written with these settings (an unreadable stamp: no)."""
    try:
        return DemoDataConfig.model_validate_json((config.out / "demo-data.json").read_text()) == config
    except (OSError, ValueError):
        return False


def main() -> None:
    # Lance warns on every fork; Ray starts its workers itself and they open datasets on their own.
    warnings.filterwarnings("ignore", message="lance is not fork-safe")
    app()


if __name__ == "__main__":
    main()
