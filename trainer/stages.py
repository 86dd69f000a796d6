"""The training loop of both stages.

Stage I (`--stage 1`): labeled images against their ground truth + unlabeled images against the cached
filtered masks of `conformalsam calibrate` (255 ignored), L = (1 - l(t)) L_sup + l(t) L_unsup.
Stage II (`--stage 2`, from stage I's last checkpoint): the cached masks are dropped; a stage II method
(`trainer/methods/`: `self`, the default, or `unimatch`) turns the unlabeled images into L_unsup, with the
same weighting.

Writes ``<work>/runs/<name>/stage<N>/`` (stage II with another method than `self`: ``stage2-<method>/``):
last.pt (every epoch, for --resume), best.pt (best val mIoU), metrics.jsonl (one line per epoch), run.json (the
calibration its masks came from, for `summary`), and TensorBoard event files (`trainer/curves.py`).
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from pipeline import distributed
from pipeline.atomic import ensure_writable, write_text_atomic
from pipeline.config import Config
from pipeline.data.datasets import Dataset
from pipeline.errors import UserError
from pipeline.locks import locked
from pipeline.stage1.record import UNRECORDED, cached_masks, write_run_record
from pipeline.ui import no_progress, percent, plural
from trainer.curves import Curves
from trainer.checkpoint import check_factory, load_checkpoint, load_weights, save_checkpoint
from trainer.data import TrainImages, ValImages, epoch_plan, label_counts
from trainer.evaluate import evaluate
from trainer.losses import Criterion, class_weights
from trainer.methods import get_method
from trainer.models import Segmenter, build_model, factory_record, load_backbone, load_init, missing_protocol
from trainer.recipes import Recipe, effective_lr
from trainer.schedule import poly, unlabeled_weight


# Recipe fields added after runs were made, with the value they had before: left out of a run's identity while
# they keep it, so those runs are still reused and resumed.
LATER_FIELDS = {"init_weights": None, "model_code": None, "class_weights": "none"}


def run_dir(config: Config, name: str, stage: int, method: str = "self") -> Path:
    return config.work_dir / "runs" / name / (f"stage{stage}" if stage == 1 or method == "self" else
                                              f"stage{stage}-{method}")


def resolve_device(name: str, world: int) -> torch.device:
    """--device; under torchrun "auto" and "cuda" mean this rank's GPU (LOCAL_RANK)."""
    if name == "cpu":
        return torch.device("cpu")
    if world > 1 or name in (None, "auto"):
        return distributed.local_device()
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def _run_locks(config, recipe_name, stage, name, method, **_):
    """A run writes its own folder; stage I reads the cached masks."""
    run = f"runs--{name or recipe_name}--{run_dir(config, name or recipe_name, stage, method).name}"
    return [run], ["masks"] if stage == 1 else []


@locked("train", _run_locks)
def train_stage(config: Config, recipe_name: str, recipe: Recipe, stage: int, name: str | None = None,
                resume: bool = False, allow_missing_masks: bool = False, device: str = "auto",
                deterministic: bool = False, init: Path | None = None, progress=None, log=print,
                on_epoch=None, method: str = "self") -> dict:
    """Train one stage; returns its summary (best and last val mIoU, run folder, epochs run).

    ``progress(description)`` yields ``update(advance, total)`` (see `pipeline.ui`); ``log(text)`` and
    ``on_epoch(metrics record)`` are called on rank 0 only.
    """
    if stage not in (1, 2):
        raise UserError(f"--stage {stage}: choose 1, 2 or all")
    stage2 = get_method(method)
    if recipe.epochs[stage - 1] < 1:
        raise UserError(f"--epochs {recipe.epochs[stage - 1]}: stage {stage} needs at least 1 epoch")
    name = name or recipe_name
    rank, world = distributed.setup("nccl" if torch.cuda.is_available() and device != "cpu" else "gloo")
    dev = resolve_device(device, world)
    _determinism(deterministic, dev)
    if recipe.batch_size % world:
        raise UserError(f"--batch-size {recipe.batch_size}: must be divisible by the {world} processes")
    dataset = Dataset(config)
    factory = factory_record(recipe.model, recipe.model_code)  # a factory network's code, as it is now
    out = run_dir(config, name, stage, method)
    last, best_path = out / "last.pt", out / "best.pt"
    if resume and not last.exists():
        raise UserError(f"{last}: nothing to resume (no checkpoint yet); run without --resume")

    labeled = dataset.split("labeled")
    unlabeled = dataset.split("unlabeled")
    if rank == 0 and (overlap := dataset.overlap()):
        log(f"warning: {overlap}")
    source = Path(init or run_dir(config, name, 1) / "last.pt")
    if stage == 1 and recipe.labeled_only:  # the masks would weigh nothing: none are read, no calibration needed
        if allow_missing_masks:
            raise UserError("--allow-missing-masks: a labeled-only run (lambda 0 throughout) reads no masks; "
                            "leave the flag out")
        inputs = masks = None
    elif stage == 1:
        unlabeled, masks, missing = cached_masks(config.work_dir, unlabeled, allow_missing_masks,
                                                 "--allow-missing-masks")
        inputs = masks["key"]
        if missing and rank == 0:
            log(f"--allow-missing-masks: {missing} unlabeled images without a cached mask are left out")
    elif not source.exists():
        named = "" if name == recipe_name else f" --name {name}"
        raise UserError(f"{source}: stage II starts from stage I's checkpoint; run `conformalsam train --stage 1"
                        f"{named}` first (or pass --init)")
    else:
        inputs = {"start": _fingerprint(source), "method": method}
    # what the run's result depends on: a finished run with the same identity is reused, not redone
    result_fields = {k: v for k, v in asdict(recipe).items() if k not in ("workers", "eval_mode")
                     and not (k in LATER_FIELDS and v == LATER_FIELDS[k])}
    identity = {"recipe": _plain(result_fields), "classes": list(dataset.classes), "inputs": inputs,
                "unlabeled": len(unlabeled)}
    finished = _finished_run(last, identity, recipe.epochs[stage - 1], resume, factory)
    if finished:
        if rank == 0:
            log(f"{out}: already trained with this recipe and these inputs (best val mIoU "
                f"{percent(finished['best'])}); nothing to do")
        return {"run_dir": str(out), "stage": stage, "epochs": finished["epoch"], "epochs_run": finished["epoch"],
                "best": finished["metrics"].get("best_miou"), "last": finished["metrics"].get("miou"),
                "unchanged": True}
    if rank == 0:  # before an epoch is spent
        ensure_writable(out, "choose another --work-dir (or --name), or fix the folder's permissions", keep=False)
        if not resume:  # a run killed before its first checkpoint may have left its first epoch's lines
            for stale in (out / "metrics.jsonl", best_path):
                stale.unlink(missing_ok=True)
    val = ValImages(dataset, dataset.split("val")) if config.val is not None else None
    train_l = TrainImages(dataset, labeled, "labeled", recipe)
    role = "unlabeled" if stage == 2 else "images" if recipe.labeled_only else "cached"
    train_u = TrainImages(dataset, unlabeled, role, recipe,
                          masks_dir=config.work_dir / "masks", strong_views=stage2.STRONG_VIEWS)

    torch.manual_seed(recipe.seed)
    model = build_model(recipe.model, dataset.num_classes, recipe.model_code)
    if stage == 2 and stage2.PERTURBS_FEATURES and (lacking := missing_protocol(model)):
        raise UserError(f"--method {method}: the network of --model {recipe.model} has no {' / '.join(lacking)} "
                        "method; UniMatch's feature perturbation needs encode(images) -> features and "
                        "decode(features) -> logits (docs/trainer.md 'Bring your own network'), or use --method self")
    start = load_checkpoint(source) if stage == 2 else None
    if stage == 2:  # what stage I trained on, when its checkpoint says (one from an older version does not)
        masks = start.get("masks", UNRECORDED)
    if resume:
        checkpoint = load_checkpoint(last)
        _check_compatible(checkpoint, recipe, dataset, last, factory)
        load_weights(model, checkpoint["student"] or checkpoint["model"], last, recipe.model)
    elif stage == 2:
        _check_compatible(start, recipe, dataset, source, factory)
        load_weights(model, start["model"], source, recipe.model)
    elif recipe.init_weights:
        loaded = load_init(model, recipe.init_weights, dataset.num_classes)
        if rank == 0:
            fresh = loaded["reinitialised"]
            log(f"init weights: {loaded['loaded']} tensors from {recipe.init_weights}" + (
                f"; re-initialised for {dataset.num_classes} classes (the file's are for {loaded['file_classes']}):"
                f" {', '.join(fresh)}" if fresh else ""))
    elif recipe.backbone_weights:
        loaded = load_backbone(model, recipe.backbone_weights)
        if rank == 0:
            log(f"backbone: {loaded['loaded']} tensors from {recipe.backbone_weights}")
    # channels-last on every device: faster convolutions on GPUs (tensor cores) and on CPUs (oneDNN), there
    # measured 20-30% per training step for the tiny DeepLabV3+ and for ESPNetv2's grouped convolutions
    try:
        model = model.to(dev, memory_format=torch.channels_last)
    except RuntimeError:  # a network with 5-D weights (Conv3d) has no channels-last layout
        model = model.to(dev)
    if dev.type == "cuda" and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    segmenter = Segmenter(model, dataset.num_classes, recipe.model)
    net = DistributedDataParallel(segmenter, device_ids=[dev.index] if dev.type == "cuda" else None) \
        if world > 1 else segmenter
    teacher = Segmenter(copy.deepcopy(model), dataset.num_classes, recipe.model).eval() \
        if stage == 2 and recipe.ema > 0 else None
    if stage == 2 and recipe.batch_size // world < 2:
        raise UserError(f"--batch-size {recipe.batch_size}: stage II mixes (CutMix) the unlabeled images of each "
                        f"process, so it needs at least 2 per process ({2 * world} in all)")

    criterion = Criterion(recipe.threshold, _class_weights(recipe, dataset, labeled, dev, log if rank == 0 else None))
    lr = effective_lr(recipe, recipe.batch_size)
    optimizer = _optimizer(model, recipe, lr)
    amp = dev.type == "cuda" and recipe.amp != "none"
    amp_dtype = torch.bfloat16 if recipe.amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp and amp_dtype == torch.float16)

    epochs = recipe.epochs[stage - 1]
    steps_per_epoch = max(1, len(unlabeled) // recipe.batch_size)
    # One schedule over both stages (as one 60 + 20 epoch run): stage II continues the poly decay and the
    # lambda(t) decay from the step stage I's checkpoint ended at, instead of restarting at the full rate.
    offset = start["step"] if stage == 2 else 0
    schedule_steps = offset + epochs * steps_per_epoch if stage == 2 else sum(recipe.epochs) * steps_per_epoch
    epoch, step, best = 0, 0, float("-inf")
    if resume:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        if teacher is not None:
            load_weights(teacher.model, checkpoint["model"], last, recipe.model)
        epoch, step, best = checkpoint["epoch"], checkpoint["step"], checkpoint["best"]
        rng = checkpoint["rng"][str(rank)]
        torch.set_rng_state(rng["cpu"])
        if dev.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], dev)
        if rank == 0:
            _truncate_metrics(out / "metrics.jsonl", epoch)
            log(f"resuming {out} after epoch {epoch} (step {step}, best mIoU {percent(best)})")
    if rank == 0:
        rates = (f"head x{recipe.head_lr_mult:g}" if len(optimizer.param_groups) > 1 else
                 "the network has no backbone: one rate for all of it")
        images = (f"{len(labeled)} labeled images (labeled only: the {len(unlabeled)} unlabeled pass through "
                  "BatchNorm, no masks)" if stage == 1 and recipe.labeled_only else
                  f"{len(labeled)} labeled + {len(unlabeled)} unlabeled images")
        log(f"stage {stage}: {recipe.model}, {images}, "
            f"{plural(epochs, 'epoch')} x {plural(steps_per_epoch, 'step')}, batch {recipe.batch_size} "
            f"({plural(world, 'process', 'processes')}), "
            f"crop {recipe.crop}, lr {lr:.2e} (= {recipe.lr:g} x {recipe.batch_size}/8; {rates}"
            + (f"; stage II continues the schedule from step {offset}, at lr "
               f"{lr * poly(offset, schedule_steps, recipe.poly_power):.2e}" if stage == 2 else "") + f"), device {dev}")

    per_process = recipe.batch_size // world
    # rank 0's curves; what a crash leaves unflushed lies past the last checkpoint, which a resume purges anyway
    curves = Curves(out if rank == 0 else None, offset + step if resume else None, log)
    autocast = (lambda: torch.autocast("cuda", dtype=amp_dtype)) if amp else None
    summary = {"run_dir": str(out), "stage": stage, "epochs": epochs, "best": None, "last": None, "unchanged": False}
    while epoch < epochs:
        started = time.perf_counter()
        plan = epoch_plan(len(unlabeled), len(labeled), recipe.batch_size, recipe.seed, epoch)
        mine = [(lab[rank * per_process:(rank + 1) * per_process], unl[rank * per_process:(rank + 1) * per_process])
                for lab, unl in plan]
        train_l.epoch = train_u.epoch = epoch
        loaders = [_loader(ds, [m[i] for m in mine], recipe, epoch) for i, ds in enumerate((train_l, train_u))]
        net.train()
        totals = torch.zeros(3)
        with (progress or no_progress)(f"stage {stage} epoch {epoch + 1}/{epochs}", "step") as update:
            update(0, len(mine))
            for batch_l, batch_u in zip(*loaders):
                progress_t = (offset + step) / max(schedule_steps, 1)
                weight = unlabeled_weight(progress_t, recipe.lambda_start, recipe.lambda_end, recipe.lambda_schedule)
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * poly(offset + step, schedule_steps, recipe.poly_power)
                batch_l, batch_u = _to(batch_l, dev), _to(batch_u, dev)
                with autocast() if autocast else torch.autocast("cpu", enabled=False):
                    if stage == 1:
                        sup, unsup = _stage1_losses(net, batch_l, batch_u, criterion)
                    else:
                        sup, unsup = stage2.losses(net, teacher, batch_l, batch_u, criterion)
                    loss = (1 - weight) * sup + weight * unsup
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                if teacher is not None:
                    _ema_update(teacher.model, model, recipe.ema)
                terms = [loss.item(), sup.item(), unsup.item()]
                totals += torch.tensor(terms)
                step += 1
                curves.step(offset + step, *terms, weight, optimizer.param_groups[0]["lr"])
                update(1)
        epoch += 1
        seconds = time.perf_counter() - started
        record = {"stage": stage, "epoch": epoch, "step": step, "lr": optimizer.param_groups[0]["lr"],
                  "lambda": weight, **dict(zip(("loss", "loss_sup", "loss_unsup"), (totals / len(mine)).tolist())),
                  "seconds": seconds, "images_per_s": 2 * recipe.batch_size * len(mine) / seconds}
        scored = val is not None and (epoch > recipe.eval_from * epochs or epoch == epochs)
        if scored:
            eval_model = teacher if teacher is not None else segmenter
            val_started = time.perf_counter()
            with (progress or no_progress)("val") as update:
                update(0, len(range(rank, len(val), world)))
                record.update(evaluate(eval_model, val, dataset.num_classes, dev, recipe.eval_mode, recipe.crop,
                                       autocast, rank, world, update))
            record["val_seconds"] = time.perf_counter() - val_started
        improved = val is None or (scored and record["miou"] > best)
        best = record["miou"] if scored and improved else best
        record["best_miou"] = None if val is None or best == float("-inf") else best
        # every rank's random state, so that a resumed run draws the same dropout masks on every device
        rng = distributed.gather_dicts({str(rank): {"cpu": torch.get_rng_state(), **(
            {"cuda": torch.cuda.get_rng_state(dev)} if dev.type == "cuda" else {})}})
        if rank == 0:
            # "model" holds the weights that were scored (the EMA teacher when there is one)
            state = {"model": (teacher.model if teacher is not None else model).state_dict(),
                     "model_name": recipe.model, "factory": factory,
                     "classes": list(dataset.classes), "identity": identity, "recipe": _plain(asdict(recipe)),
                     "masks": masks,
                     "stage": stage, "epoch": epoch, "step": step, "best": best,
                     "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                     "student": model.state_dict() if teacher is not None else None, "rng": rng, "metrics": record}
            _append_metrics(out / "metrics.jsonl", record)
            curves.epoch(offset + step, record, dataset.classes)
            if scored:
                curves.images(offset + step, eval_model, val, dev, recipe.eval_mode, recipe.crop, autocast)
            curves.flush()  # before the checkpoint: every step it holds has its events on disk
            write_run_record(out, stage, method, masks)
            if improved:  # before last.pt: a crash in between must not lose the best weights
                save_checkpoint(best_path, {**state, "optimizer": None, "scaler": None, "student": None})
            save_checkpoint(last, state)
            if on_epoch:
                on_epoch(record)
        distributed.barrier()
        summary.update(last=record.get("miou"), best=None if val is None else best, epochs_run=epoch)
    curves.close()
    return summary


def _finished_run(last: Path, identity: dict, epochs: int, resume: bool, factory: dict | None) -> dict | None:
    """The checkpoint of a finished run with this identity (to reuse), None when there is work to do;
    a run that exists but may not be continued or reused is an error."""
    if not last.exists():
        return None
    done = load_checkpoint(last)
    if done.get("model_name") == identity["recipe"]["model"]:  # the same factory, but is its code the same?
        check_factory(done, last, factory)
    same = _same_identity(done.get("identity"), identity)
    if same and done["epoch"] == epochs:
        return done
    if not resume and same:
        raise UserError(f"{last.parent}: a run is already there, unfinished (epoch {done['epoch']}); pass --resume to "
                        "continue it, --name for a new run, or delete the folder")
    if not resume:  # --resume would not help: a run continues only with what it started with
        raise UserError(f"{last.parent}: a run is already there, trained with other "
                        f"{_differences(done.get('identity') or {}, identity)}; pass --name for a new run, or delete "
                        "the folder")
    if not same:
        raise UserError(f"{last}: the run was started with other {_differences(done.get('identity') or {}, identity)};"
                        " resume it with the same flags and inputs, or start a new run with --name")
    return None


def _same_identity(old: dict | None, new: dict) -> bool:
    """Earlier versions recorded the masks' key for a labeled-only run too, although its result never depended on
    them (lambda 0): such a run is this one when all else is the same."""
    return old == new or (new["inputs"] is None and isinstance(old, dict) and {**old, "inputs": None} == new)


def _differences(old: dict, new: dict) -> str:
    """What differs between a run's recorded identity and this one's, e.g. "settings (lr 0.002, now 0.001)"."""
    said = []
    before, now = old.get("recipe") or {}, new["recipe"]
    def value(recipe, k):  # a later field at its default is left out of identities
        return recipe.get(k, LATER_FIELDS.get(k, "unset"))

    fields = [f"{'epochs (stage I, II)' if k == 'epochs' else k} {value(before, k)}, now {value(now, k)}"
              for k in sorted(set(before) | set(now)) if value(before, k) != value(now, k)]
    if fields:
        said.append(f"settings ({'; '.join(fields)})")
    if old.get("inputs") != new["inputs"] and new["inputs"] is not None:  # (None: labeled only, reads no inputs)
        said.append("cached masks (calibrate has rewritten them since)" if not isinstance(new["inputs"], dict) else
                    "start (another stage I checkpoint or --init file)" if (old.get("inputs") or {}).get("start") !=
                    new["inputs"]["start"] else "inputs")
    if old.get("classes") != new["classes"]:
        said.append("classes")
    if old.get("unlabeled") != new["unlabeled"]:
        said.append(f"unlabeled images ({old.get('unlabeled')}, now {new['unlabeled']})")
    return " and ".join(said) or "inputs"


def _optimizer(model: torch.nn.Module, recipe: Recipe, lr: float) -> torch.optim.Optimizer:
    """Backbone at lr, everything else (the head) at lr x head_lr_mult; ``base_lr`` kept for the schedule. A
    network without a ``backbone`` module is one part: all of it at lr."""
    if isinstance(getattr(model, "backbone", None), torch.nn.Module):
        ids = {id(p) for p in model.backbone.parameters()}
        head_lr = lr * recipe.head_lr_mult
        groups = [{"params": list(model.backbone.parameters()), "lr": lr, "base_lr": lr},
                  {"params": [p for p in model.parameters() if id(p) not in ids], "lr": head_lr, "base_lr": head_lr}]
    else:
        groups = [{"params": list(model.parameters()), "lr": lr, "base_lr": lr}]
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=recipe.weight_decay)


def _stage1_losses(net, batch_l: dict, batch_u: dict, criterion: Criterion):
    """One forward over labeled + unlabeled images (shared BatchNorm statistics), CE against GT and cached masks
    (a labeled-only run has none: its unlabeled loss is zero)."""
    n = batch_l["image"].shape[0]
    logits = net(torch.cat([batch_l["image"], batch_u["image"]]))
    unsup = criterion.ce(logits[n:], batch_u["mask"], batch_u["valid"]) if "mask" in batch_u else logits.new_zeros(())
    return criterion.ce(logits[:n], batch_l["mask"], batch_l["valid"]), unsup


def _class_weights(recipe: Recipe, dataset: Dataset, labeled: list, device: torch.device, log) -> torch.Tensor | None:
    """The recipe's class weights, from the labeled masks (the same for every process and on resume)."""
    if recipe.class_weights == "none":
        return None
    weight = class_weights(recipe.class_weights, label_counts(dataset, labeled))
    if log:
        log(f"class weights ({recipe.class_weights}, from {len(labeled)} labeled masks): " + ", ".join(
            f"{name} {w:.2f}" for name, w in zip(dataset.classes, weight)))
    return torch.tensor(weight, dtype=torch.float32, device=device)


@torch.no_grad()
def _ema_update(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(decay).add_(s.detach(), alpha=1 - decay)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)


def _check_compatible(checkpoint: dict, recipe: Recipe, dataset: Dataset, path: Path, factory: dict | None) -> None:
    trained = checkpoint.get("model_name")
    if trained != recipe.model and checkpoint.get("classes") == list(dataset.classes):
        code = (checkpoint.get("recipe") or {}).get("model_code")
        raise UserError(f"{path}: was trained as --model {trained}, this run builds {recipe.model}; give the same "
                        f"--model {trained}" + (f" --model-code {code}" if code else "") + " (or the config's [train] "
                        "table) as that run had")
    if trained != recipe.model or checkpoint.get("classes") != list(dataset.classes):
        raise UserError(f"{path}: checkpoint is a {checkpoint.get('model_name')} for classes "
                        f"{checkpoint.get('classes', [])[:4]}...; this run wants {recipe.model} for "
                        f"{list(dataset.classes)[:4]}...")
    check_factory(checkpoint, path, factory)


def _loader(dataset, batches: list, recipe: Recipe, epoch: int):
    workers = min(recipe.workers, os.cpu_count() or 1)
    generator = torch.Generator().manual_seed(recipe.seed * 1000 + epoch)  # keeps the global RNG untouched
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers, generator=generator,
                                       pin_memory=torch.cuda.is_available(), persistent_workers=False)


def _to(batch: dict, device: torch.device) -> dict:
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    for key in ("image", "strong", "strong_2"):
        if key in out:
            out[key] = out[key].contiguous(memory_format=torch.channels_last)
    return out


def _determinism(deterministic: bool, device: torch.device) -> None:
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # bilinear upsampling has no deterministic CUDA backward: warn there instead of failing
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def _append_metrics(path: Path, record: dict) -> None:
    """Append one line; written as a whole new file so a crash never leaves half a line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else ""
    write_text_atomic(path, old + json.dumps(record) + "\n")


def _fingerprint(path: Path) -> str:
    stat = Path(path).stat()
    return f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def _truncate_metrics(path: Path, epoch: int) -> None:
    """Drop lines of epochs after the checkpoint (a crash between the two writes): a resumed run redoes them."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["epoch"] <= epoch]
        write_text_atomic(path, "".join(line + "\n" for line in lines))


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


