"""``esam3 cache`` (the main job) and ``esam3 plan``; the S3 settings every command shares."""

from __future__ import annotations

from enum import Enum
from typing import Any

import typer
from rich.table import Table
from rich.text import Text

from pydantic import ValidationError

from esam3.console import UsageError, build_config, console, err_console, human_bytes, print_json, progress, redact, user_errors
from esam3.pipeline.shards import DatasetName
from esam3.schemas.cache import CacheConfig, ErrorBudget, Inputs, MaxFailures, RunError, Target, check_s3_endpoint
from esam3.schemas.errors import Esam3Error, describe, first_line
from esam3.schemas.codecs import FeatureCodec
from esam3.schemas.prompts import MIN_MASK_SIZE, MaskOutputs, PromptConfig, check_mask_size
from esam3.schemas.teacher import RANDOM_TEACHERS, TeacherConfig, VideoPrompt, VideoTargetConfig

S3_HELP = "S3-compatible endpoint (http(s)://HOST:PORT) for s3:// paths; credentials come from the usual AWS variables."
INPUTS_HELP = "What of the student's input each row keeps: store (SA-1B: the original JPEG; SA-V: each used frame, lossless PNG) or none (targets only; trainers refuse such a store)."
MASK_OUTPUTS_HELP = "sa-1b: mask logits kept per prompt: chosen (the output the tracker uses, what stage 1 trains on; the IoU scores of all 4 are kept) or all (3 multimask + single). Default: chosen."
MASK_SIZE_HELP = f"sa-1b: side of the stored mask logits ({MIN_MASK_SIZE} up to the decoder's own, 288 at full size), resized with antialiasing; the loss brings them back. Default: the decoder's."
CODEC_HELP = (
    "Trunk codec: fp16, bf16, int8 (per-channel scales), lowrank (a basis fitted on the run's first rows; other maps "
    "int8), or auto (sa-1b: every candidate measured on pilot rows from several shards, the smallest within --max-error "
    "taken, stored once per store)."
)
MAX_ERROR_HELP = (
    "--codec auto's budget: mean mask-IoU loss of the heads' masks (decoded vs exact trunk) and mean relative RMS of the "
    "trunk, as mask=X,rms=Y (either alone keeps the other's default). Default: mask=0.01,rms=0.05."
)
FAST_DECODE_HELP = "sa-1b: decode JPEGs at a DCT scale (about half size; less CPU) instead of SAM3's own preprocessing of the full image; recorded in every row."
_FLAGS = {
    "source": "--source",
    "store": "--store",
    "teacher": "--teacher",
    "targets": "--targets",
    "codec": "--codec",
    "rank": "--rank",
    "s3_endpoint": "--s3-endpoint",
    "read_retries": "--read-retries",
    "max_teachers": "--max-teachers",
    "error_budget": "--max-error",
}


class CodecFlag(str, Enum):
    """``--codec``: a feature codec, or auto (chosen by measurement against ``--max-error``)."""

    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"
    LOWRANK = "lowrank"
    AUTO = "auto"


def codec_options(codec: CodecFlag, max_error: str | None) -> dict[str, Any]:
    """``--codec`` / ``--max-error`` as CacheConfig values: auto gives a budget (the codec is then chosen by the run)."""
    if codec != CodecFlag.AUTO:
        if max_error is not None:
            raise UsageError("--max-error: is the budget of --codec auto; pass --codec auto with it")
        return {"codec": FeatureCodec(codec.value)}
    try:
        budget = ErrorBudget.parse(max_error) if max_error is not None else ErrorBudget()
    except ValueError as exc:
        raise UsageError(f"--max-error: {first_line(exc) if not isinstance(exc, ValidationError) else describe(exc)}") from None
    return {"codec": FeatureCodec.FP16, "error_budget": budget}  # fp16 until the run settles it


def parse_targets(text: str | None) -> tuple[Target, ...]:
    if not text:
        return ()
    names = [t.strip() for t in text.split(",") if t.strip()]
    try:
        return tuple(dict.fromkeys(Target(n) for n in names))
    except ValueError:
        raise UsageError(f"--targets: expected a comma-separated list of {', '.join(t.value for t in Target)}, got {text!r}") from None


def cache_command(
    dataset: DatasetName = typer.Option(..., "--dataset", help="Which dataset format the shards are in."),
    source: str = typer.Option(..., "--source", help="Folder or fsspec URL (s3://...) holding the tar shards."),
    shards: str = typer.Option("all", "--shards", help="Shards to cache: all, 7, 0-99, 0,3,7-9."),
    store: str = typer.Option(..., "--store", help="Store root: a folder (created if missing) or s3://bucket/prefix."),
    teacher: str = typer.Option("tiny-random", "--teacher", help=f"SAM3 checkpoint directory, or one of: {', '.join(RANDOM_TEACHERS)}."),
    targets: str = typer.Option(None, "--targets", help="Comma-separated: trunk,prompts (sa-1b) or trunk,memory (sa-v). Default: both."),
    prompts: int = typer.Option(16, "--prompts", help="Prompts sampled per image (K) for the prompt targets."),
    mask_outputs: MaskOutputs = typer.Option(None, "--mask-outputs", help=MASK_OUTPUTS_HELP),
    mask_size: int = typer.Option(None, "--mask-size", help=MASK_SIZE_HELP),
    codec: CodecFlag = typer.Option(CodecFlag.FP16, "--codec", help=CODEC_HELP),
    max_error: str = typer.Option(None, "--max-error", help=MAX_ERROR_HELP),
    rank: int = typer.Option(None, "--rank", help="lowrank codec: basis size (capped at the trunk width). Default: 256."),
    inputs: Inputs = typer.Option(Inputs.STORE, "--inputs", help=INPUTS_HELP),
    fast_decode: bool = typer.Option(False, "--fast-decode", help=FAST_DECODE_HELP),
    batch_size: int = typer.Option(8, "--batch-size", help="Images (or video frames) per teacher forward."),
    video_prompt: VideoPrompt = typer.Option(
        VideoPrompt.MASK, "--video-prompt", help="sa-v: how each object is prompted on its first frame."
    ),
    max_objects: int = typer.Option(8, "--max-objects", help="sa-v: masklets tracked per video."),
    max_frames: int = typer.Option(64, "--max-frames", help="sa-v: annotated frames (6 fps) used per video."),
    address: str = typer.Option(None, "--address", help="Join a running Ray cluster: auto, or HOST:PORT. Default: start a local Ray."),
    s3_endpoint: str = typer.Option(None, "--s3-endpoint", help=S3_HELP),
    read_retries: int = typer.Option(
        3,
        "--read-retries",
        help="Times a shard is read again after a transient I/O error (reset, 5xx) before it is left for a rerun (0-20).",
    ),
    max_teachers: int = typer.Option(
        None,
        "--max-teachers",
        help="Most teacher actors (one per GPU). The pool starts with the cluster's GPUs and grows as GPUs join, up to this; "
        "also the number of shard writers started. Default: no bound, writers for the GPUs at the start.",
    ),
    max_failures: str = typer.Option(
        "0", "--max-failures", help="Bad samples tolerated before exit code 1: a count (10) or a share (0.5%)."
    ),
    executor: str = typer.Option(
        "ray", "--executor", help="ray (default), or local: every step in this process without Ray, for debugging."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the prompt sampler (and of a random teacher's weights)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON line with the run's figures at the end."),
) -> None:
    """The main job: stream shards through the SAM3 teacher into a resumable Lance store (rerun = resume)."""
    from esam3.pipeline.object_store import ACCESS_HINT, access_refused, is_s3, storage_failed
    from esam3.schemas.store import StoreError

    with user_errors():
        if executor not in ("ray", "local"):
            raise UsageError(f"--executor: expected ray or local, got {executor!r}")
        try:
            limit = MaxFailures.parse(max_failures)
        except ValueError as exc:
            raise UsageError(f"--max-failures: {exc}") from None
        teacher_config = build_config(TeacherConfig, {"source": "--teacher"}, source=teacher, batch_size=batch_size, seed=seed)
        prompt_config = build_config(
            PromptConfig,
            {"num_prompts": "--prompts", "seed": "--seed"},
            num_prompts=prompts,
            seed=seed,
            **mask_options(dataset, parse_targets(targets), mask_outputs, mask_size),
        )
        video_config = build_config(
            VideoTargetConfig,
            {"prompt": "--video-prompt", "seed": "--seed"},
            prompt=video_prompt,
            max_objects=max_objects,
            max_frames=max_frames,
            seed=seed,
        )
        config = build_config(
            CacheConfig,
            _FLAGS,
            dataset=dataset.value,
            source=source,
            shards=shards,
            store=store,
            teacher=teacher_config,
            targets=parse_targets(targets),
            prompts=prompt_config,
            video=video_config,
            **codec_options(codec, max_error),
            **rank_option(codec, rank),
            inputs=inputs,
            dct_scaling=_fast_decode(fast_decode, dataset),
            address=address,
            s3_endpoint=s3_endpoint,
            max_failures=limit,
            read_retries=read_retries,
            max_teachers=max_teachers,
        )
        check_source(config)  # a wrong --source or --dataset is said at once, before seconds of imports
        from esam3.pipeline.plan import run_cache  # torch, Lance, Ray

        with progress() as bar:
            update = cache_progress(bar, bar.add_task(f"cache {dataset.value}", total=None, status="starting"))
            try:
                report = run_cache(config, executor=executor, on_progress=update)
            except Exception as exc:  # storage or network trouble (S3 down, disk full): nothing half-done is visible
                if isinstance(exc, Esam3Error) or not storage_failed(exc):
                    raise
                if access_refused(exc):  # a rerun would fare no better: the user's to fix (exit 2)
                    fix = ACCESS_HINT if is_s3(store) else "check that this user may write to the --store folder"
                    raise StoreError(f"store {store}: writing refused ({first_line(exc)}); {fix}") from None
                raise RunError(f"storage error: {first_line(exc)}; rerun the same command to resume") from None
            update(report)
    if as_json:
        print_json({**report.to_json(), "aborted": {shard: redact(reason) for shard, reason in report.aborted.items()}})
    elif report.nothing_to_do:
        console.print(
            Text(f"nothing to do: all {report.shards_selected} selected shard(s) are already in {store} (same teacher and settings)")
        )
    else:
        console.print(summary_table(report))
        if report.budget and report.budget["rows"]:
            console.print(Text(f"codec auto: {report.codec}; this run's rows: {budget_said(report.budget)}"))
            if not report.budget["within"]:
                err_console.print(Text("this run's mean codec error is over --max-error (see esam3 store info)"))
    if report.failures:
        err_console.print(Text(f"{report.failures} bad sample(s) (limit {limit}); see the store's failures table"))
    elif report.exit_code and not report.aborted:  # a rerun: the failures are from earlier runs
        err_console.print(
            Text(f"the selected shards' failed samples in the store exceed --max-failures {limit}; see the store's failures table")
        )
    if report.aborted:
        first, reason = next(iter(sorted(report.aborted.items())))
        err_console.print(
            Text(
                f"{len(report.aborted)} shard(s) hit a storage or network error and stay uncommitted ({first}: "
                f"{redact(reason)}); the others are committed: rerun the same command to finish them"
            )
        )
    raise typer.Exit(report.exit_code)


def mask_options(dataset: DatasetName, targets: tuple[Target, ...], outputs: MaskOutputs | None, size: int | None) -> dict[str, Any]:
    """``--mask-outputs`` / ``--mask-size`` as PromptConfig values (unset: its defaults); sa-1b prompt targets only."""
    given = {k: v for k, v in (("mask_outputs", outputs), ("mask_size", size)) if v is not None}
    flags = " and ".join(f"--{k.replace('_', '-')}" for k in given)
    if given and dataset != DatasetName.SA1B:
        raise UsageError(f"{flags}: apply to sa-1b prompt targets only (SA-V frames keep the tracker's mask per object)")
    if given and targets and Target.PROMPTS not in targets:
        raise UsageError(f"{flags}: apply to the prompt targets, which --targets leaves out")
    return given


def rank_option(codec: CodecFlag, rank: int | None) -> dict[str, Any]:
    """``--rank`` as a CacheConfig value (default 256); --codec auto chooses the rank itself."""
    if rank is not None and codec == CodecFlag.AUTO:
        raise UsageError("--rank: --codec auto chooses the rank (by measurement); pass --codec lowrank --rank R to set it")
    return {} if rank is None else {"rank": rank}


def budget_said(check: dict[str, Any]) -> str:
    """``check.budget_check``'s figures in one phrase."""
    means = check["means"]
    verdict = "within" if check["within"] else "over"
    return (
        f"mean mask-IoU loss {means['mask_iou_loss']:.4f}, mean rel. RMS {means['rel_rms']:.4f} ({verdict} --max-error; "
        f"{check['rows_above']} of {check['rows']} single rows above it)"
    )


def _fast_decode(value: bool, dataset: DatasetName) -> bool:
    if value and dataset != DatasetName.SA1B:
        raise UsageError("--fast-decode: applies to sa-1b only (SA-V frames come from video, not JPEG)")
    return value


def cache_progress(bar: Any, task: Any) -> Any:
    """The progress callback of a cache run: shards committed of those to do, rows written and committed, failures."""

    def update(report: Any) -> None:
        bar.update(
            task,
            total=report.shards_selected - report.shards_skipped,
            completed=report.shards_committed,
            status=f"{report.rows_written} rows written, {report.rows} committed, {report.failures} failed",
        )

    return update


def check_source(config: CacheConfig) -> None:
    """The source lists shards of the dataset that the selection names (``run_cache`` lists them again)."""
    from esam3.pipeline.object_store import S3Settings
    from esam3.pipeline.shards import select_shards

    select_shards(
        config.source,
        DatasetName(config.dataset),
        config.shards,
        S3Settings.from_environment(config.s3_endpoint).fsspec_options(config.source),
    )


def summary_table(report: Any) -> Table:
    table = Table(title=Text(f"cached {report.dataset} into {report.store}"), title_justify="left")
    for column in ("shards", "rows", "codec", "bytes", "rows/s", "failures", "read retries", "store version"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{report.shards_committed} new, {report.shards_skipped} already done",
        str(report.rows),
        report.codec,
        human_bytes(report.bytes),
        f"{report.rows_per_s:.2f}",
        f"[red]{report.failures}[/]" if report.failures else "0",
        str(report.read_retries),
        str(report.store_version),
    )
    return table


def s3_settings(s3_endpoint: str | None) -> Any:
    """S3 settings for the CLI: ``--s3-endpoint`` checked like the cache's, credentials from the environment."""
    from esam3.pipeline.object_store import S3Settings

    try:
        check_s3_endpoint(s3_endpoint)
    except ValueError as exc:
        raise UsageError(f"--s3-endpoint: {exc}") from None
    return S3Settings.from_environment(s3_endpoint)


def plan_command(
    dataset: DatasetName = typer.Option(..., "--dataset", help="Which dataset the run would cache."),
    shards: str = typer.Option(..., "--shards", help="Shards the run would cache: 0-99, 0,3,7-9 (all needs --source)."),
    source: str = typer.Option(None, "--source", help="Count the selected shards that exist here (folder or URL)."),
    teacher: str = typer.Option(
        "full-random",
        "--teacher",
        help="Teacher whose sizes to use (its config only, unless --codec auto loads it for the pilot; default: SAM3's).",
    ),
    targets: str = typer.Option(None, "--targets", help="Comma-separated targets, as for cache. Default: both of the dataset's."),
    prompts: int = typer.Option(16, "--prompts", help="Prompts per image (K)."),
    mask_outputs: MaskOutputs = typer.Option(None, "--mask-outputs", help=MASK_OUTPUTS_HELP),
    mask_size: int = typer.Option(None, "--mask-size", help=MASK_SIZE_HELP),
    codec: CodecFlag = typer.Option(CodecFlag.FP16, "--codec", help=CODEC_HELP + " auto needs --source (the pilot reads it)."),
    max_error: str = typer.Option(None, "--max-error", help=MAX_ERROR_HELP),
    rank: int = typer.Option(None, "--rank", help="lowrank codec: basis size. Default: 256."),
    inputs: Inputs = typer.Option(Inputs.STORE, "--inputs", help=INPUTS_HELP),
    fast_decode: bool = typer.Option(False, "--fast-decode", help=FAST_DECODE_HELP),
    max_objects: int = typer.Option(8, "--max-objects", help="sa-v: objects per video."),
    max_frames: int = typer.Option(64, "--max-frames", help="sa-v: annotated frames per video."),
    measured_in: str = typer.Option(
        None,
        "--measured-in",
        help="sa-1b: a pilot store (a few shards cached with the same codec, mask outputs and mask side): show what the codecs "
        "cost the heads' masks there, and count mask logits at its stored bytes per value.",
    ),
    rows_per_shard: int = typer.Option(None, "--rows-per-shard", help="Override the rows per shard estimate (images, or video frames)."),
    rows_per_sec: float = typer.Option(
        None, "--rows-per-sec", help="Measured teacher rows/s per GPU (benchmarks/gpu_teacher.py), for GPU-hours."
    ),
    s3_endpoint: str = typer.Option(None, "--s3-endpoint", help=S3_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON line."),
) -> None:
    """Rows, bytes per row, total bytes and GPU-hours of a cache run, before anything runs (no weights loaded, but for
    --codec auto's pilot)."""
    from esam3.pipeline.costs import codec_choices, make_plan
    from esam3.pipeline.shards import select_shards
    from esam3.schemas.shards import ShardSpec
    from esam3.workers.heads import Geometry
    from esam3.workers.teacher_loading import teacher_config

    with user_errors():
        if rows_per_shard is not None and rows_per_shard < 1:
            raise UsageError("--rows-per-shard: must be at least 1")
        if rows_per_sec is not None and rows_per_sec <= 0:
            raise UsageError("--rows-per-sec: must be positive")
        spec = ShardSpec.parse(shards)
        if source:
            count = len(select_shards(source, dataset, spec, s3_settings(s3_endpoint).fsspec_options(source)))
        elif spec.ranges is None:
            raise UsageError("--shards all: pass --source so the shards can be counted, or give a range like 0-999")
        else:
            count = sum(hi - lo + 1 for lo, hi in spec.ranges)
        video = build_config(VideoTargetConfig, {}, max_objects=max_objects, max_frames=max_frames)
        config = build_config(
            CacheConfig,
            _FLAGS,
            dataset=dataset.value,
            source=source or "-",
            shards=shards,
            store="-",
            targets=parse_targets(targets),
            prompts=build_config(
                PromptConfig,
                {"num_prompts": "--prompts"},
                num_prompts=prompts,
                **mask_options(dataset, parse_targets(targets), mask_outputs, mask_size),
            ),
            video=video,
            **codec_options(codec, max_error),
            **rank_option(codec, rank),
            inputs=inputs,
            dct_scaling=_fast_decode(fast_decode, dataset),
        )
        geometry = Geometry.from_config(teacher_config(teacher))
        check_mask_size(config.prompts.mask_size, geometry.mask_size)
        pilot = None
        if config.error_budget is not None:
            if not source:
                raise UsageError("--codec auto: pass --source; the pilot measures the codecs on rows of its shards")
            if teacher in RANDOM_TEACHERS:
                err_console.print(
                    Text(f"--codec auto with --teacher {teacher}: random weights; what it chooses says nothing of real SAM3 features")
                )
            config, pilot = measured_choice(config, teacher, s3_endpoint)
        measured = measured_task_error(measured_in, config, geometry.mask_size, s3_endpoint) if measured_in else None
        rate = measured.get("logit_bytes_per_value") if measured else None
        plan = make_plan(config, geometry, count, rows_per_shard, rows_per_sec, rate)
        choices = codec_choices(config, geometry, plan, rate)
    logits = f"mask logits at {rate:.3f} B/value as measured in {measured_in}" if rate else "mask logits as on SAM-like logits"
    chosen = config.codec.value + (f" r={config.rank}" if config.codec == FeatureCodec.LOWRANK else "")
    if as_json:
        print_json(
            {
                **plan.to_json(),
                "codec": chosen,
                "codec_choices": choices,
                "codec_task_error": measured,
                "logit_bytes_per_value": rate,
                "codec_pilot": pilot.to_json() if pilot else None,
            }
        )
        return
    if pilot is not None:
        console.print(pilot_table(pilot))
    table = Table(title=Text(f"plan: {dataset.value}, {count} shard(s), teacher {teacher}, codec {chosen}"), title_justify="left")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("rows", f"{plan.rows:,} ({plan.rows_per_shard:,} per shard)")
    for name, size in plan.bytes_per_row.items():
        table.add_row(f"bytes/row: {name}", human_bytes(size))
    table.add_row("bytes/row", human_bytes(plan.row_bytes))
    table.add_row("total", human_bytes(plan.total_bytes))
    if dataset == DatasetName.SA1B:
        table.add_row("public recipe (trunk fp16 files)", human_bytes(plan.to_json()["public_recipe_bytes"]))
    table.add_row("GPU-hours", f"{plan.gpu_hours:,.1f}" if plan.gpu_hours is not None else "pass --rows-per-sec")
    if measured and measured.get("rows"):
        table.add_row(
            f"codec {codec.value}: heads' mask IoU, decoded vs exact trunk",
            f"{measured['mask_iou_mean']:.4f} (worst {measured['mask_iou_min']:.4f})",
        )
        table.add_row(f"codec {codec.value}: predicted-IoU error", f"{measured['iou_error_mean']:.4f} (over {measured['rows']} rows)")
    elif dataset == DatasetName.SA1B:
        table.add_row("codec cost on the heads' masks", "measured per row while caching: --measured-in a pilot store")
    if measured and measured.get("logit_rows"):
        table.add_row(
            "stored mask logits: mask IoU vs the teacher's",
            f"{measured['logits_mask_iou_mean']:.4f} (worst {measured['logits_mask_iou_min']:.4f})",
        )
    console.print(table)
    console.print(choices_table(choices, plan.to_json()["public_recipe_bytes"], logits))


def measured_choice(config: CacheConfig, teacher: str, s3_endpoint: str | None) -> tuple[CacheConfig, Any]:
    """``plan --codec auto``: the pilot a run would make (the teacher loaded here, on its device), and the plan's config
    with the codec it chose."""
    from esam3.pipeline.codec_pilot import choose_codec, resolved
    from esam3.pipeline.shards import select_shards

    config = config.model_copy(update={"teacher": build_config(TeacherConfig, {"source": "--teacher"}, source=teacher)})
    options = s3_settings(s3_endpoint).fsspec_options(config.source)
    shards = select_shards(config.source, DatasetName(config.dataset), config.shards, options)
    with progress() as bar:
        bar.add_task("codec auto: measuring every codec on pilot rows", total=None, status=f"teacher {teacher}")
        choice, _ = choose_codec(config, shards, options)
    return resolved(config, choice.to_json()), choice


def pilot_table(choice: Any) -> Table:
    """What ``--codec auto`` measured: every candidate's bytes and errors against the budget, the chosen one marked."""
    budget = ErrorBudget(**choice.budget)
    title = f"codec auto on {choice.rows} pilot rows of {len(choice.shards)} shard(s), budget --max-error {budget}"
    table = Table(title=Text(title), title_justify="left")
    for column in ("codec", "trunk bytes/row", "rel. RMS", "mask-IoU loss", "within budget"):
        table.add_column(column, justify="left" if column == "codec" else "right")
    for c in choice.candidates:
        mark = " (chosen)" if c == choice.chosen else ""
        table.add_row(c.name + mark, human_bytes(c.trunk_bytes), f"{c.rel_rms:.4f}", f"{c.mask_iou_loss:.4f}", "yes" if c.within else "no")
    return table


def choices_table(choices: dict[str, dict[str, Any]], public: float | None, logits: str) -> Table:
    """Bytes per row per column and in all under every feature codec (``logits``: how mask logits are counted)."""
    table = Table(title=Text(f"every codec ({logits})"), title_justify="left")
    table.add_column("")
    for codec in choices:
        table.add_column(codec, justify="right")
    for name in next(iter(choices.values()))["bytes_per_row"]:
        table.add_row(f"bytes/row: {name}", *(human_bytes(c["bytes_per_row"][name]) for c in choices.values()))
    table.add_row("bytes/row", *(human_bytes(c["row_bytes"]) for c in choices.values()))
    table.add_row("total", *(human_bytes(c["total_bytes"]) for c in choices.values()))
    if public:
        table.add_row("vs public recipe", *(f"{c['total_bytes'] / public:.2f}x" for c in choices.values()))
    return table


def measured_task_error(uri: str, config: CacheConfig, decoder_size: int, s3_endpoint: str | None) -> dict[str, Any]:
    """What a pilot store's image rows measured: the task-level codec errors and the stored bytes per mask-logit
    value. Its codec, mask outputs and the side of its stored logits must be the planned ones (``decoder_size``:
    the planned teacher's), since their costs are what is measured."""
    from esam3.pipeline.store import Store
    from esam3.pipeline.store.check import codec_task_error, logit_rate

    if config.dataset != DatasetName.SA1B.value:
        raise UsageError("--measured-in: the task-level codec error is measured on sa-1b rows (their prompts) only")
    store = Store(uri, s3_settings(s3_endpoint))
    card = store.require_card()
    spec = card["targets"].get("sa-1b")
    if spec is None:
        raise UsageError(f"--measured-in: {uri} holds no sa-1b rows")
    planned = {
        "--codec": config.codec.value,
        "--rank": config.rank if config.codec == FeatureCodec.LOWRANK else None,
        "--mask-outputs": config.prompts.mask_outputs.value,
        "mask side": config.prompts.mask_size or decoder_size,
    }
    cached = {
        "--codec": spec["codec"],
        "--rank": spec.get("rank"),
        "--mask-outputs": spec["prompts"]["mask_outputs"],
        "mask side": spec["prompts"]["mask_size"] or card["teacher"]["geometry"]["mask_size"],  # bytes per value depend on it
    }
    for flag, value in planned.items():
        if cached[flag] != value:
            raise UsageError(f"--measured-in: {uri} was cached with {flag} {cached[flag]}, this plan is for {value}")
    images = store.dataset("images")
    return {**codec_task_error(images), "logit_bytes_per_value": logit_rate(images)}
