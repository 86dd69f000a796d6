"""The `conformalsam` command line: one typer app, one sub-command per stage."""

import functools
import inspect
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional



def _check_own_packages() -> None:
    """This project's packages are named pipeline and trainer, generic names (SEEM v1.0 ships both): the ones
    Python finds must be those installed beside this file, or a command would run another project's code."""
    import importlib.util

    here = Path(__file__).resolve().parent
    if not (here / "pipeline").is_dir():  # installed from a wheel: conformalsam/cli.py, the packages beside it
        here = here.parent
    for name in ("pipeline", "trainer"):
        spec = importlib.util.find_spec(name)
        origin = Path(spec.origin).resolve() if spec and spec.origin else None
        if origin != here / name / "__init__.py":
            print(f"error: the '{name}' package Python finds ({origin.parent if origin else 'none'}) is not "
                  f"conformalsam's ({here / name}): a folder on PYTHONPATH or another installed package shadows "
                  "it; remove that from the path, or install conformalsam in its own virtual environment",
                  file=sys.stderr)
            sys.exit(2)


_check_own_packages()

import typer  # noqa: E402
from rich.table import Table  # noqa: E402

from pipeline import config as cfg  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.ui import bold, console, error, one_line, out, percent, plural, print_table, progress, warn  # noqa: E402
from trainer.recipes import CLASS_WEIGHTS, RECIPES  # noqa: E402  (light: names and numbers only)
from pipeline.toy.world import WorldSpec  # noqa: E402

WORLD = WorldSpec()  # the toy world's defaults


def _usage_name(argument) -> str:
    """A required argument as click writes it (DIR; typer >= 0.2x writes {DIR}, which reads as a literal)."""
    return argument.display_name_raw if argument.required else f"[{argument.display_name_raw}]"


if hasattr(typer.core.TyperArgument, "_usage_display_name"):
    typer.core.TyperArgument._usage_display_name = _usage_name

app = typer.Typer(
    help="ConformalSAM: calibrate a foundation segmentation model's pseudo-labels with conformal prediction, "
    "then train a segmentation model on labeled data + the filtered masks.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
data_app = typer.Typer(help="Check a data set before spending GPU hours on it.", no_args_is_help=True)
config_app = typer.Typer(help="Show the effective experiment config, or write a preset to edit.", no_args_is_help=True)
toy_app = typer.Typer(help="The embedded toy world: generate it, retrain or score its annotator.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")
app.add_typer(toy_app, name="toy")

Opt = Optional
CONFIG_FLAG = (Opt[str], f"TOML config file or preset name ({cfg.preset_names()}). "
               "Default: ./conformalsam.toml, else the toy preset.")
# one override flag per config field: (the config section it overrides, type, help)
CONFIG_OPTIONS = {
    "format": ("data", Opt[str], f"Override data.format: {' | '.join(cfg.FORMATS)}."),
    "root": ("data", Opt[Path], "Override data.root (data set folder)."),
    "labeled": ("data", Opt[Path], "Override data.labeled (split list)."),
    "unlabeled": ("data", Opt[Path], "Override data.unlabeled (split list)."),
    "val": ("data", Opt[Path], "Override data.val (split list)."),
    "classes": ("data", Opt[str], "Override data.classes: names separated by commas, background first."),
    "backend": ("foundation", Opt[str], f"Override foundation.backend: {' | '.join(cfg.BACKENDS)}."),
    "weights": ("foundation", Opt[Path], "Override foundation.weights (checkpoint path)."),
    "work_dir": ("work", Opt[Path], "Override work.dir (where every stage writes)."),
}


def with_config(*reads: str):
    """Give a command the --config flag and an override flag per config field of the sections it ``reads``
    (data, foundation, work): a command has no flag for settings it never reads. It receives ``config``."""
    options = {"config": CONFIG_FLAG, **{n: (kind, text) for n, (section, kind, text) in CONFIG_OPTIONS.items()
                                         if section in reads}}

    def decorate(command):
        params = [p for p in inspect.signature(command).parameters.values() if p.name != "config"]
        for name, (kind, help_text) in options.items():
            option = typer.Option(help=help_text, rich_help_panel="Experiment config")
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                            annotation=Annotated[kind, option]))

        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            flags = {name: kwargs.pop(name) for name in options}
            config = cfg.override(cfg.load(flags.pop("config")), **flags)
            return command(*args, config=config, **kwargs)

        wrapper.__signature__ = inspect.Signature(params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper
    return decorate


@app.command("logits")
@with_config("data", "foundation", "work")
def logits(
    split: Annotated[str, typer.Option(help="labeled | unlabeled | val | all")] = "all",
    batch_size: Annotated[int, typer.Option(help="Images per model call (per process).")] = 8,
    device: Annotated[str, typer.Option(help="auto (CUDA when present) | cpu | cuda | cuda:N")] = "auto",
    workers: Annotated[Optional[int], typer.Option(help="Loader worker processes (default: cores - 1, max 8).")] = None,
    scale: Annotated[Optional[float], typer.Option(help="Store scores at this fraction of the image size "
                                                   "instead of the model's native resolution.")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild a store made by another model or class list.")] = False,
    encoding: Annotated[Optional[str], typer.Option(help="uint8: 8-bit probabilities, ~15x smaller at 150 classes | "
                                                    "float16: the scores as given. Default: an existing store's, "
                                                    "else uint8.")] = None,
    verify: Annotated[bool, typer.Option(help="Read and check every stored image (CRC-32, finite values) and "
                                         "rebuild the damaged ones; without it only missing or resized chunks "
                                         "are found.")] = False,
    config: cfg.Config = None,
):
    """Stage 0: score images with the foundation model into <work>/logits.zarr (resumable).

    Images already in the store are skipped (damaged ones are rebuilt), so an interrupted run just continues. Under
    `torchrun --nproc_per_node N` each process scores its share of the images.
    """
    from pipeline.stage0.logits import run_logits

    start = time.perf_counter()
    with progress("logits") as update:
        result = run_logits(config, split, batch_size, device, force, workers, scale, update,
                            warn=warn, info=lambda msg: console.print(msg, style="dim", highlight=False),
                            verify=verify, encoding=encoding)
    if result["rank"] == 0:
        took = time.perf_counter() - start
        console.print(f"{result['store']}: {result['written']} images scored in {took:.1f}s "
                      f"({result['written'] / max(took, 1e-9):.1f} img/s), {result['skipped']} already there")
        if result["failed"]:
            warn(f"{result['failed']} unreadable images skipped (listed in the store's 'failed' attribute)")


@app.command("calibrate")
@with_config("data", "work")
def calibrate(
    alpha: Annotated[Optional[float], typer.Option(help="Miscoverage level: sets hold the true class with "
                                                   "probability >= 1 - alpha (0.05 was best in the paper). "
                                                   "Default 0.1.")] = None,
    mode: Annotated[Optional[str], typer.Option(help="paper: one pooled threshold (the default) | mondrian: one per "
                                                "class | crc: conformal risk control over images (finite-sample "
                                                "guarantee).")] = None,
    rule: Annotated[str, typer.Option(help="Set -> label. paper: most probable non-background class of the set | "
                                      "singleton: only one-class sets kept | argmax: no filtering (the raw "
                                      "foundation masks, for ablations).")] = "paper",
    masks: Annotated[bool, typer.Option("--masks/--no-masks", help="Write the unlabeled images' filtered masks "
                                        "(--no-masks: fit and report only, nothing written).")] = True,
    folds: Annotated[Optional[int], typer.Option(help="Folds of the cross-calibration coverage check (default "
                                                 "5).")] = None,
    jobs: Annotated[Optional[int], typer.Option("--jobs", "-j", help="Worker threads (default: all cores).")] = None,
    config: cfg.Config = None,
):
    """Stage 1: fit conformal thresholds on the labeled set, write filtered masks to <work>/masks/.

    Reads <work>/logits.zarr. Writes <work>/calibration.json (thresholds, settings, diagnostics) and one
    palette PNG per unlabeled image, 255 = ignore. Rerunning with the same settings and inputs does nothing.
    """
    from pipeline.stage1.calibrate import Settings, run_calibrate

    if rule == "argmax":  # the raw argmax: no thresholds to fit, no coverage to check
        given = [f"--{name}" for name, value in (("alpha", alpha), ("mode", mode), ("folds", folds)) if value is not None]
        if given:
            raise UserError(f"{', '.join(given)}: --rule argmax keeps the annotator's argmax unfiltered (no conformal "
                            "thresholds), so they do not apply; drop them, or choose another --rule")
    defaults = Settings()
    settings = Settings(alpha=defaults.alpha if alpha is None else alpha, mode=mode or defaults.mode, rule=rule,
                        folds=defaults.folds if folds is None else folds)
    path = config.work_dir / "calibration.json"
    earlier = path.exists()
    start = time.perf_counter()
    record = run_calibrate(config, settings, masks, jobs, progress, warn=warn)
    took = time.perf_counter() - start
    if record.get("repaired"):
        repaired = record["repaired"]
        console.print(f"{path} is up to date; {len(repaired)} damaged masks rewritten in {config.work_dir / 'masks'} "
                      f"(e.g. {repaired[0]})")
    elif record["unchanged"]:
        console.print(f"{path} is up to date for these settings and inputs: nothing to do")
    from pipeline.stage1.calibrate_report import print_report

    print_report(record, out)
    if not record["unchanged"] and record.get("saved"):
        console.print(f"wrote {path} and {record['masks']['count']} masks in {config.work_dir / 'masks'} in "
                      f"{took:.1f}s")
    elif not record["unchanged"] and not record.get("repaired"):
        console.print(f"fit and report only (--no-masks), {took:.1f}s: " + (
            f"{path} and the masks were left as they were" if earlier else
            "nothing written (run without --no-masks for calibration.json and the masks)"), soft_wrap=True)


TRAIN = "Training recipe (overrides)"


@app.command("train")
@with_config("data", "work")
def train(
    stage: Annotated[str, typer.Option(help="1: stage I, labeled + cached filtered masks | 2: stage II, "
                                       "semi-supervised from stage I's checkpoint (--method) | all: I then II.")] = "1",
    method: Annotated[Optional[str], typer.Option(help="Stage II method: self (self-training on the model's own "
                                                  "pseudo-labels, the default) | unimatch (UniMatch's weak-to-strong "
                                                  "consistency).")] = None,
    recipe: Annotated[Optional[str], typer.Option(help=f"{' | '.join(RECIPES)} (default: by data format)")] = None,
    name: Annotated[Optional[str], typer.Option(help="Run name: <work>/runs/<name>/ (default: the recipe).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run from its last checkpoint.")] = False,
    allow_missing_masks: Annotated[bool, typer.Option(help="Stage I: leave out unlabeled images without a cached "
                                                      "mask instead of stopping.")] = False,
    init: Annotated[Optional[Path], typer.Option(help="Stage II: start from this checkpoint instead of stage I's.")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N (under torchrun: LOCAL_RANK).")] = "auto",
    deterministic: Annotated[bool, typer.Option(help="Deterministic algorithms (slower; exact resume).")] = False,
    model: Annotated[Optional[str], typer.Option(help="deeplabv3plus-r50|-r101|-tiny, segformer-b0..b5|-tiny, or "
                                                 "your own: file.py:function or package.module:function, called "
                                                 "with the class count (config: train.model).",
                                                 rich_help_panel=TRAIN)] = None,
    model_code: Annotated[Optional[Path], typer.Option(help="The folder your --model factory imports from, e.g. "
                                                       "a checkout (config: train.code).",
                                                       rich_help_panel=TRAIN)] = None,
    init_weights: Annotated[Optional[Path], typer.Option(help="The whole network's starting weights (a state "
                                                         "dict); a classifier for another class count is "
                                                         "re-initialised (config: train.init_weights).",
                                                         rich_help_panel=TRAIN)] = None,
    backbone_weights: Annotated[Optional[Path], typer.Option(help="ImageNet weights: torchvision ResNet .pth or "
                                                             "official mit_b*.pth.", rich_help_panel=TRAIN)] = None,
    crop: Annotated[Optional[int], typer.Option(help="Training crop size.", rich_help_panel=TRAIN)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Labeled images per step over all processes (as many "
                                                      "unlabeled).", rich_help_panel=TRAIN)] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs of the stage being run.", rich_help_panel=TRAIN)] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate at a total batch of 8 (scaled linearly).",
                                                rich_help_panel=TRAIN)] = None,
    optimizer: Annotated[Optional[str], typer.Option(help="sgd | adamw", rich_help_panel=TRAIN)] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="Weight decay.", rich_help_panel=TRAIN)] = None,
    class_weights: Annotated[Optional[str], typer.Option(help=f"{' | '.join(CLASS_WEIGHTS)}: weights of every "
                                                         "cross-entropy by class, from the labeled masks.",
                                                         rich_help_panel=TRAIN)] = None,
    threshold: Annotated[Optional[float], typer.Option(help="Stage II confidence threshold.",
                                                       rich_help_panel=TRAIN)] = None,
    ema: Annotated[Optional[float], typer.Option(help="Stage II EMA teacher decay (0: the model itself).",
                                                 rich_help_panel=TRAIN)] = None,
    lambda_start: Annotated[Optional[float], typer.Option(help="Unlabeled-loss weight at the start.",
                                                          rich_help_panel=TRAIN)] = None,
    lambda_end: Annotated[Optional[float], typer.Option(help="... and at the end.", rich_help_panel=TRAIN)] = None,
    lambda_schedule: Annotated[Optional[str], typer.Option(help="exp | linear | constant",
                                                           rich_help_panel=TRAIN)] = None,
    eval_mode: Annotated[Optional[str], typer.Option(help="whole | sliding", rich_help_panel=TRAIN)] = None,
    eval_from: Annotated[Optional[float], typer.Option(help="Validate only after this fraction of the epochs "
                                                       "(and at the end); saves time on CPU.",
                                                       rich_help_panel=TRAIN)] = None,
    amp: Annotated[Optional[str], typer.Option(help="GPU precision: bf16 | fp16 | none", rich_help_panel=TRAIN)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of everything random.", rich_help_panel=TRAIN)] = None,
    workers: Annotated[Optional[int], typer.Option(help="Loader processes.", rich_help_panel=TRAIN)] = None,
    config: cfg.Config = None,
):
    """Train: stage I on labeled images + the cached filtered masks, stage II on the model's own pseudo-labels.

    Writes last.pt, best.pt, metrics.jsonl to <work>/runs/<name>/stage<N>/ (another stage II method: stage2-<method>/).
    Under `torchrun --nproc_per_node N` each process takes its share of every batch (DDP).
    """
    import torch

    from trainer.recipes import get_recipe
    from trainer.stages import run_dir, train_stage

    stages = {"1": [1], "2": [2], "all": [1, 2]}.get(stage)
    if stages is None:
        raise UserError(f"--stage {stage}: choose 1, 2 or all")
    _refuse_other_stage(stages, init=init, method=method, threshold=threshold, ema=ema, init_weights=init_weights,
                        backbone_weights=backbone_weights, allow_missing_masks=allow_missing_masks)
    method = method or "self"
    if epochs is not None and len(stages) > 1:
        raise UserError("--epochs applies to one stage; with --stage all set each stage's epochs in the recipe")
    from pipeline.factory import absolute_spec, is_factory

    # flags win: a --model flag takes its code folder and weights from flags too, not from the config's [train];
    # a --backbone-weights flag replaces the config's init_weights
    configured = model is None
    model = absolute_spec(model, Path.cwd()) if model and is_factory(model) else model or config.model
    model_code = model_code.absolute() if model_code else config.model_code if configured else None
    init_weights = init_weights.absolute() if init_weights else \
        config.init_weights if configured and backbone_weights is None else None
    overrides = dict(model=model, model_code=model_code, init_weights=init_weights,
                     backbone_weights=backbone_weights, crop=crop, batch_size=batch_size, lr=lr,
                     optimizer=optimizer, weight_decay=weight_decay, class_weights=class_weights, threshold=threshold, ema=ema,
                     lambda_start=lambda_start, lambda_end=lambda_end, lambda_schedule=lambda_schedule,
                     eval_mode=eval_mode, eval_from=eval_from, amp=amp, seed=seed, workers=workers)
    recipe_name, base = get_recipe(recipe, config.format, **overrides)
    if lambda_schedule is not None and base.labeled_only:
        raise UserError(f"--lambda-schedule {lambda_schedule}: lambda is 0 throughout (--lambda-start and --lambda-end "
                        "0), so there is no schedule to shape: drop it")
    if amp not in (None, "none") and (device == "cpu" or not torch.cuda.is_available()):
        raise UserError(f"--amp {amp}: mixed precision is for GPUs; on the CPU a run is fp32 whatever --amp says: "
                        "drop it")
    run_name = name or recipe_name
    checkpoints = [run_dir(config, run_name, number, method) / "last.pt" for number in stages]
    if resume and not any(path.exists() for path in checkpoints):
        runs = sorted({path.parent.parent.name for path in (config.work_dir / "runs").glob("*/*/last.pt")})
        there = f"runs there: {', '.join(runs)}" if runs else f"no runs in {config.work_dir / 'runs'} yet"
        raise UserError(f"--resume: {checkpoints[0].parent} has no checkpoint to continue ({there}); give the run's "
                        "--name, or drop --resume to start a new run")
    for number, last in zip(stages, checkpoints):
        chosen = base
        if epochs is not None:
            chosen = replace(base, epochs=tuple(epochs if i == number - 1 else e for i, e in enumerate(base.epochs)))
        # --resume continues whichever stage has a checkpoint (with --stage all: a finished stage I is kept)
        resuming = resume and last.exists()
        summary = train_stage(config, recipe_name, chosen, number, name, resuming,
                              allow_missing_masks, device, deterministic, init, progress, console.print,
                              on_epoch=_print_epoch, method=method)
        if int(os.environ.get("RANK", "0")) == 0:
            out.print(f"stage {number} done: best val mIoU {percent(summary['best'])}% -> {summary['run_dir']}",
                      soft_wrap=True, highlight=False)


# options of one stage only: a flag given for the other is refused, never ignored
STAGE_OPTIONS = {"init": 2, "method": 2, "threshold": 2, "ema": 2, "init_weights": 1, "backbone_weights": 1,
                 "allow_missing_masks": 1}


def _refuse_other_stage(stages: list[int], **given) -> None:
    for name, value in given.items():
        if value is None or value is False:
            continue
        flag, only = f"--{name.replace('_', '-')}", STAGE_OPTIONS[name]
        if only not in stages:
            what = {1: "stage I (--stage 1 or all)", 2: "stage II (--stage 2 or all)"}[only]
            raise UserError(f"{flag} applies to {what} only, not to --stage {'1' if stages == [1] else '2'}; drop it")
        if name == "init" and len(stages) > 1:
            raise UserError("--init gives stage II another start than stage I's checkpoint, so it does not go with "
                            "--stage all: run --stage 1, then --stage 2 --init FILE")


def _print_epoch(record: dict) -> None:
    table = Table(title=f"stage {record['stage']}, epoch {record['epoch']}", title_justify="left")
    for column in ("loss", "sup", "unsup", "lambda", "lr", "img/s", "val mIoU %", "best %"):
        table.add_column(column, justify="right")
    miou = record.get("miou")
    table.add_row(f"{record['loss']:.3f}", f"{record['loss_sup']:.3f}", f"{record['loss_unsup']:.3f}",
                  f"{record['lambda']:.3f}", f"{record['lr']:.2e}", f"{record['images_per_s']:.0f}",
                  percent(miou), percent(record["best_miou"]))
    print_table(table)


@app.command("eval")
@with_config("data", "work")
def eval_checkpoint(
    checkpoint: Annotated[Optional[Path], typer.Option(help="A last.pt or best.pt of `conformalsam train`.")] = None,
    scores: Annotated[bool, typer.Option("--scores", help="Instead of a checkpoint: the foundation model's own "
                                         "stored scores (argmax, from `conformalsam logits --split ...`; no model runs, so "
                                         "--mode, --crop and --device do not apply).")] = False,
    mode: Annotated[str, typer.Option(help="whole | sliding")] = "whole",
    crop: Annotated[Optional[int], typer.Option(help="Sliding-window size (default: the run's crop).")] = None,
    split: Annotated[str, typer.Option(help="val | labeled | unlabeled (needs masks).")] = "val",
    device: Annotated[Optional[str], typer.Option(help="auto (the default) | cpu | cuda | cuda:N")] = None,
    config: cfg.Config = None,
):
    """mIoU and per-class IoU of a checkpoint (whole image or sliding window), or of the stored foundation-model
    scores (--scores), on the val split."""
    from pipeline.data.datasets import Dataset

    if checkpoint is not None and scores:
        raise UserError("eval: --checkpoint scores a trained model, --scores the stored foundation-model scores; "
                        "give one, not both")
    if checkpoint is None and not scores:
        raise UserError("eval: give --checkpoint FILE, or --scores for the stored foundation-model scores")
    if mode not in ("whole", "sliding"):
        raise UserError(f"--mode {mode}: choose whole or sliding")
    if mode == "whole" and crop is not None and not scores:
        raise UserError("--crop is the sliding window's size: it applies to --mode sliding only")
    dataset = Dataset(config)
    samples = dataset.split(split)
    if any(s.mask is None for s in samples):
        raise UserError(f"{dataset.split_path(split)}: the {split} split has no masks to score against")
    if scores:
        if mode != "whole" or crop is not None or device is not None:
            raise UserError("eval --scores reads the stored scores at the mask size, no model runs: --mode, --crop and "
                            "--device do not apply")
        _eval_scores(config, dataset, samples, split)
        return
    from trainer.checkpoint import load_trained
    from trainer.data import ValImages
    from trainer.evaluate import evaluate
    from trainer.stages import resolve_device

    model, state = load_trained(checkpoint, dataset.classes)
    dev = resolve_device(device or "auto", 1)
    with progress("eval") as update:
        update(0, len(samples))
        result = evaluate(model.to(dev), ValImages(dataset, samples), dataset.num_classes, dev, mode,
                          crop or state["recipe"]["crop"], progress=update)
    _print_ious(f"{checkpoint} (stage {state['stage']}, epoch {state['epoch']}) on "
                f"{_images_of(dataset, split, samples)}, {mode}", dataset.classes, result["iou"], result["miou"], result["pixel_accuracy"])


def _images_of(dataset, split: str, samples) -> str:
    """What was scored, named by its list file (--val test.txt is not 'val images')."""
    return f"the {len(samples)} images of {dataset.split_path(split)}"


def _eval_scores(config: cfg.Config, dataset, samples, split: str) -> None:
    from pipeline.metrics import iou_per_class, mean_iou, pixel_accuracy
    from pipeline.stage1.rawscore import raw_confusion
    from pipeline.stage0.store import LogitsStore

    store = LogitsStore(config.work_dir / "logits.zarr")
    missing = [s.id for s in samples if s.id not in store]
    if missing:
        raise UserError(f"{store.path}: no scores for {len(missing)} of the {len(samples)} {split} images (e.g. "
                        f"{missing[0]}): run `conformalsam logits --split {split}` first")
    if tuple(store.classes) != tuple(dataset.classes):
        raise UserError(f"{store.path}: scores are for classes {list(store.classes)}, the data set has "
                        f"{list(dataset.classes)}")
    with progress("eval") as update:
        update(0, len(samples))
        conf = raw_confusion(store, dataset, samples, progress=update)
    _print_ious(f"{store.path} ({store.attrs['backend']}): raw argmax of the stored scores on "
                f"{_images_of(dataset, split, samples)}",
                dataset.classes, iou_per_class(conf), mean_iou(conf), pixel_accuracy(conf))


def _print_ious(title: str, classes, ious, miou: float, accuracy: float) -> None:
    table = Table(title=title)
    table.add_column("class")
    table.add_column("IoU %", justify="right")
    for name, iou in zip(classes, ious):
        table.add_row(name, percent(iou))
    table.add_row(bold("mean"), bold(percent(miou)))
    print_table(table)
    out.print(f"mIoU {percent(miou)}%, pixel accuracy {percent(accuracy)}%", highlight=False)


@app.command("inspect")
@with_config("data", "work")
def inspect_command(
    ids: Annotated[Optional[str], typer.Option(help="Image ids for contact sheets, comma-separated (default: --count "
                                               "random ones).")] = None,
    count: Annotated[Optional[int], typer.Option(help="How many random images get a contact sheet, and how many per "
                                                 "row group of the page (default 6).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the random choices (default 0).")] = None,
    split: Annotated[str, typer.Option(help="unlabeled | labeled | val: the contact sheets' split (images must be "
                                       "scored).")] = "unlabeled",
    checkpoint: Annotated[Optional[Path], typer.Option(help="Add this trained model's prediction to the sheets.")] = None,
    jobs: Annotated[Optional[int], typer.Option("--jobs", "-j", help="Worker threads (default: all cores).")] = None,
    config: cfg.Config = None,
):
    """What calibration did, in <work>/inspect/: index.html (open it in a browser), contact sheets, the alpha sweep.

    The page: which calibration made the masks, the alpha sweep, each class's kept share, and the masks the filter
    emptied most, least, random ones, labeled and val images beside their ground truth. Sheet: image | raw
    foundation argmax | filtered mask | ground truth | checkpoint, and a legend; ignore (255) is white.
    """
    from pipeline.outputs.inspect import run_inspect

    if ids and (count is not None or seed is not None):
        raise UserError("--count and --seed choose images at random; --ids names them: give one or the other")
    if count is not None and count < 1:
        raise UserError(f"--count {count}: give at least 1")
    chosen = [i.strip() for i in ids.split(",") if i.strip()] if ids else None
    result = run_inspect(config, chosen, 6 if count is None else count, seed or 0, split, checkpoint,
                         jobs=jobs or os.cpu_count() or 1, progress=progress)
    record = result["record"]
    unlabeled = record["diagnostics"].get("unlabeled") or {}
    quality = unlabeled.get("quality") or {}
    table = Table(title=f"per class, unlabeled set ({record['mode']} mode, alpha {record['alpha']})")
    for column in ("class", "kept % (of raw argmax)", "precision % of kept labels"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name in record["classes"]:
        kept = (unlabeled.get("per_class") or {}).get(name, {}).get("kept_fraction")
        precision = (quality.get("per_class_precision") or {}).get(name)
        table.add_row(name, percent(kept), percent(precision))
    print_table(table)
    swept = result["sweep"]
    if swept["rows"]:
        table = Table(title=f"alpha sweep ({swept['mode']} mode, {swept['rule']} rule; labeled pixels held out by fold)")
        for column in ("alpha", "coverage %" + (" (per image)" if swept["mode"] == "crc" else ""), "kept %",
                       "accuracy % of kept", "kept % unlabeled"):
            table.add_column(column, justify="right")
        for r in swept["rows"]:
            table.add_row(f"{r['alpha']:.2f}" + (" *" if r["alpha"] == swept["alpha"] else ""),
                          percent(r["coverage"]), percent(r["kept"]), percent(r["accuracy"]),
                          percent(r["kept_unlabeled"]))
        print_table(table)
        out.print(f"* calibrated; the annotator's argmax is right on {percent(swept['top1'])}% of the labeled "
                  "pixels", highlight=False)
    figures = ", ".join(p.name for p in result["figures"])
    console.print(f"wrote {plural(len(result['sheets']), 'contact sheet')}{', ' + figures if figures else ''} and "
                  f"the page {result['page']} (open it in a browser)", soft_wrap=True, highlight=False)


@app.command("export")
@with_config("data", "work")
def export_masks(
    out: Annotated[Path, typer.Argument(metavar="DIR", help="The folder to write (built beside it, then renamed into place).")],
    to: Annotated[str, typer.Option(help="unimatch: UniMatch / AllSpark split files (labeled.txt = ground truth + "
                                    "filtered masks, unlabeled.txt) | list: absolute 'image mask' lines.")] = "unimatch",
    force: Annotated[bool, typer.Option(help="Replace an existing export folder.")] = False,
    config: cfg.Config = None,
):
    """The filtered masks of `calibrate` as supervision for another code base; the data set is not touched."""
    from pipeline.outputs.export import export

    result = export(config, to, out, force, warn=warn)
    console.print(f"{result['out']}: {', '.join(result['files'])} (" + (
        f"{result['labeled']} labeled, " if to == "unimatch" else "") +
        f"{plural(result['unlabeled'], 'unlabeled image')} with filtered masks)", soft_wrap=True)
    if to == "unimatch":
        console.print(f"UniMatch: set data_root: {Path(config.root).absolute()} in its config, then "
                      f"--labeled-id-path {result['out'] / 'labeled.txt'} --unlabeled-id-path "
                      f"{result['out'] / 'unlabeled.txt'}; one of its epochs is now "
                      f"{result['lines'] / result['unlabeled']:.2f} passes over the unlabeled images")
        if "val.txt" in result["files"]:
            console.print(f"and copy {result['out'] / 'val.txt'} over its splits/<dataset>/val.txt (it always "
                          "reads its val list there; docs/handover.md 'UniMatch')")


@app.command("summary")
@with_config("work")
def summary(
    plot: Annotated[bool, typer.Option(help="Also draw every run's val mIoU and loss to "
                                       "<work>/inspect/training-curves.png.")] = False,
    config: cfg.Config = None,
):
    """What the pipeline produced so far: pseudo-label quality before / after filtering, val mIoU of each run."""
    from pipeline.outputs.inspect import training_curves
    from pipeline.outputs.summary import print_summary

    print_summary(config.work_dir, out)
    if plot:
        path = training_curves(config.work_dir)
        if path is None:
            raise UserError(f"--plot: no run in {config.work_dir / 'runs'} has metrics yet; train one first")
        console.print(f"wrote {path}", soft_wrap=True, highlight=False)


def _split_source(source: Path, masks: Optional[Path], root: Optional[Path], config: Optional[str]) -> list[str]:
    """The lines of a folder of images (+ masks) or of a split list, relative to the data root."""
    from pipeline.data.splits import source_lines

    root = root.absolute() if root is not None else cfg.load(config).root

    def find(path: Path) -> Path:  # as given, else inside the data root
        return path if path.exists() or not (root / path).exists() else root / path

    return source_lines(find(source), root, find(masks) if masks is not None else None)


SOURCE = Annotated[Path, typer.Argument(metavar="SOURCE", help="A folder of images (with --masks) or a split list; relative to the "
                                        "current folder or to the data root.")]
MASKS = Annotated[Optional[Path], typer.Option(help="The folder of the images' masks (<stem>.png).")]
ROOT = Annotated[Optional[Path], typer.Option(help="The data set folder the lines are relative to (default: "
                                              "data.root of --config).")]
CONFIG = Annotated[Optional[str], typer.Option(help=CONFIG_FLAG[1])]
FORCE = Annotated[bool, typer.Option(help="Overwrite existing split files.")]


@data_app.command("split")
def data_split(
    source: SOURCE,
    out: Annotated[Path, typer.Option(help="Folder for labeled.txt and unlabeled.txt.")],
    labeled: Annotated[str, typer.Option(help="How many labeled: a count (23), a fraction (0.0625) or a "
                                         "ratio (1/16).")],
    masks: MASKS = None,
    seed: Annotated[int, typer.Option(help="Seed of the draw (same seed, same files).")] = 0,
    force: FORCE = False,
    root: ROOT = None,
    config: CONFIG = None,
):
    """Write UniMatch-format labeled.txt / unlabeled.txt: a seeded draw of the labeled images."""
    from pipeline.data.splits import labeled_count, write_split

    lines = _split_source(source, masks, root, config)
    count = labeled_count(labeled, len(lines))
    paths = write_split(lines, count, seed, out, force)
    console.print(f"wrote {paths[0]} ({count} labeled images) and", highlight=False)
    console.print(f"      {paths[1]} ({len(lines) - count} unlabeled images), seed {seed}", highlight=False)


@data_app.command("list")
def data_list(
    source: SOURCE,
    out: Annotated[Path, typer.Option(help="The split list to write (e.g. val.txt).")],
    masks: MASKS = None,
    force: FORCE = False,
    root: ROOT = None,
    config: CONFIG = None,
):
    """Write one UniMatch-format split list of every image (e.g. the val.txt of a folder)."""
    from pipeline.data.splits import write_list

    lines = _split_source(source, masks, root, config)
    console.print(f"{write_list(lines, out, force)}: {len(lines)} images")


@data_app.command("convert")
@with_config("data")
def data_convert(
    force: Annotated[bool, typer.Option(help="Rewrite trainIds files that already exist.")] = False,
    config: cfg.Config = None,
):
    """Cityscapes: write gtFine *_labelTrainIds.png (19 classes, 255 ignore) from the official *_labelIds.png
    beside them, for every mask the split lists name."""
    from pipeline.data.convert import convert_cityscapes
    from pipeline.data.datasets import Dataset

    with progress("convert") as update:
        result = convert_cityscapes(Dataset(config), force, update)
    console.print(f"{result['written']} trainIds masks written, {result['present']} already there")


@data_app.command("check")
@with_config("data")
def data_check(
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Threads reading files.")] = 4,
    examples: Annotated[int, typer.Option(help="Examples shown per problem kind.")] = 3,
    config: cfg.Config = None,
):
    """Decode every listed image and mask; report each problem kind with a count and first examples.

    Exit code 0 when the data set is clean, 1 when problems were found.
    """
    from pipeline.data.check import check_dataset
    from pipeline.data.datasets import Dataset

    dataset = Dataset(config)
    with progress("checking") as update:
        report = check_dataset(dataset, update, n_jobs=jobs)
    sizes = ", ".join(f"{n} {split}" for split, n in report.images.items())
    out.print(f"{config.format} data set at {config.root}: {sizes}; {len(dataset.classes)} classes", soft_wrap=True,
              highlight=False)
    for title, found in (("warnings", report.warnings), ("problems", report.problems)):
        if not found:
            continue
        table = Table(title=title)
        table.add_column(title[:-1])
        table.add_column("count", justify="right")
        table.add_column("first examples", overflow="fold")
        for kind, messages in sorted(found.items()):
            table.add_row(kind, str(len(messages)), "\n".join(messages[:examples]))
        print_table(table)
    if report.ok:
        out.print("no problems found", style="green")
        return
    raise typer.Exit(1)


@config_app.command("show")
@with_config("data", "foundation", "work")
def config_show(config: cfg.Config = None):
    """Print the effective config (after file, preset and flags) with absolute paths."""
    console.print(f"# from {config.source}", style="dim")
    print(cfg.to_toml(config), end="")


@config_app.command("init")
def config_init(
    preset: Annotated[str, typer.Argument(metavar="PRESET", help=f"One of: {cfg.preset_names()}.")],
    out: Annotated[Path, typer.Option(help="Where to write it.")] = Path(cfg.DEFAULT_FILE),
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
):
    """Write a preset as a TOML file to edit (paths in it are relative to the file's folder)."""
    from pipeline.atomic import write_text_atomic

    if preset not in cfg.PRESETS:
        raise UserError(f"preset '{preset}' unknown: choose one of {', '.join(cfg.PRESETS)}")
    if out.exists() and not force:
        raise UserError(f"{out} exists: pass --force to overwrite it")
    write_text_atomic(out, cfg.PRESETS[preset])
    console.print(f"wrote {out} (preset '{preset}')")


@toy_app.command("generate")
def toy_generate(
    out: Annotated[Path, typer.Option(help="Folder of the toy world (where the toy preset reads it).")] = Path("data/toy"),
    seed: Annotated[int, typer.Option(help="World seed.")] = 0,
    train: Annotated[int, typer.Option(help="Target train images (labeled splits of 16/32/64 + the rest "
                                       "unlabeled); fewer for a quick try.")] = WORLD.train,
    val: Annotated[int, typer.Option(help="Target val images.")] = WORLD.val,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = WORLD.size,
    force: Annotated[bool, typer.Option(help="Rebuild even if an identical world is there.")] = False,
):
    """Generate the toy world (target domain + source val, UniMatch-format splits of 16/32/64 labeled)."""
    from pipeline.toy.world import LABELED_SIZES, generate, is_current

    if train <= max(LABELED_SIZES) or val < 1 or size < 32:
        raise UserError(f"--train must be over {max(LABELED_SIZES)} (the largest labeled split), --val at least 1 "
                        "and --size at least 32")
    spec = WorldSpec(seed=seed, train=train, val=val, size=size)
    if not force and is_current(out, spec):
        console.print(f"toy world at {out} is up to date (--force rebuilds it)")
        return
    start = time.perf_counter()
    with progress("toy world") as update:
        generate(out, spec, force=True, progress=update)
    console.print(f"toy world written to {out} in {time.perf_counter() - start:.1f}s: {spec.train} target train "
                  f"images (labeled splits 16/32/64), {spec.val} val, {spec.source_val} source val")


@toy_app.command("train-annotator")
def toy_train_annotator(
    out: Annotated[Path, typer.Option(help="Weights file to write (the toy preset reads the shipped one: point "
                                      "--weights or foundation.weights at yours).")] = Path("toy_annotator.pt"),
    iters: Annotated[int, typer.Option(help="Training iterations.")] = 700,
    seed: Annotated[int, typer.Option(help="Training seed.")] = 0,
):
    """Retrain the toy annotator on the source domain (CPU, a few minutes, deterministic)."""
    from pipeline.toy.annotator import save_annotator
    from pipeline.toy.train import TrainSpec, train_annotator
    from pipeline.toy.world import CLASSES

    spec = TrainSpec(seed=seed, iters=iters)
    start = time.perf_counter()
    model = train_annotator(spec, log=console.print)
    save_annotator(out, model, CLASSES, {"seed": seed, "iters": iters, "images": spec.images})
    console.print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) after {time.perf_counter() - start:.0f}s")


@toy_app.command("evaluate")
@with_config("data", "foundation")
def toy_evaluate(
    split: Annotated[str, typer.Option(help="Split to score: labeled | unlabeled | val.")] = "unlabeled",
    config: cfg.Config = None,
):
    """Raw pseudo-label quality of the toy annotator (argmax, no filtering): mIoU and per-class IoU."""
    from pipeline.data.datasets import Dataset
    from pipeline.metrics import iou_per_class, mean_iou, pixel_accuracy
    from pipeline.toy.annotator import load_annotator
    from pipeline.toy.train import confusion_on

    dataset = Dataset(config)
    model, classes = load_annotator(config.weights)
    if classes != dataset.classes:
        raise UserError(f"{config.weights}: annotator classes {list(classes)} differ from the data set's")
    samples = dataset.split(split)
    if any(s.mask is None for s in samples):
        raise UserError(f"{dataset.split_path(split)}: the {split} split has no masks to score against")
    conf = confusion_on(model, (dataset.load(s) for s in samples), dataset.num_classes)
    _print_ious(f"toy annotator, raw argmax on {_images_of(dataset, split, samples)}", classes, iou_per_class(conf),
                mean_iou(conf), pixel_accuracy(conf))


class Interrupted(BaseException):
    """Ctrl-C, raised past click (which turns KeyboardInterrupt into "Aborted!" and exit 1)."""


def _interrupt(signum, frame):
    raise Interrupted


def main() -> None:
    """Entry point: user errors end in one line on stderr and exit code 2, Ctrl-C in one line and exit code
    130, never a traceback."""
    previous = signal.signal(signal.SIGINT, _interrupt)
    code = 0
    try:
        app()
    except SystemExit as exc:  # click's own exit: usage errors 2, --help 0
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except UserError as exc:
        if os.environ.get("CONFORMALSAM_DEBUG") and exc.__cause__ is not None:
            import traceback

            traceback.print_exception(exc.__cause__)
        error(one_line(str(exc)))
        code = 2
    except Interrupted:
        error("interrupted (Ctrl-C); finished files are kept: run the same command again to continue "
              "(train: add --resume)")
        code = 130
    finally:
        signal.signal(signal.SIGINT, previous)  # for a caller in the same process (tests)
    _exit(code)


def _exit(code: int) -> None:
    """Under torchrun a rank leaves the process group, then ends without the interpreter's teardown: gloo's
    threads can still hold tensors then, and releasing them at teardown aborts the rank (SIGABRT) after its
    work is done. Elsewhere a normal exit."""
    from pipeline import distributed

    if not distributed.active():
        sys.exit(code)
    distributed.leave()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
