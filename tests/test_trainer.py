"""The trainer on CPU with tiny models: learning, weight loading, exact resume, DDP, metrics, padding."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli import app
from conftest import fresh, toy_flags
from pipeline import PROJECT_ROOT
from pipeline.data.datasets import Dataset
from pipeline.errors import UserError
from pipeline.labels import IGNORE
from pipeline.outputs.summary import collect, trained_on
from pipeline.stage1.calibrate import Settings, run_calibrate
from pipeline.stage1.record import UNRECORDED, read_calibration
from trainer.augment import random_crop
from trainer.checkpoint import load_checkpoint
from trainer.data import TrainImages, ValImages, epoch_plan, label_counts
from trainer.evaluate import evaluate, predict
from trainer.models import build_model, load_backbone
from trainer.recipes import Recipe, effective_lr, get_recipe
from trainer.schedule import poly, unlabeled_weight
from trainer.losses import Criterion, ce, class_weights
from trainer.methods import self_training
from trainer.stages import run_dir, train_stage

TINY = Recipe(model="deeplabv3plus-tiny", crop=32, batch_size=4, epochs=(2, 1), optimizer="adamw", lr=2e-3,
              head_lr_mult=1.0, scale_range=(0.75, 1.25), workers=0)




def fixed_batch(k: int = 4, size: int = 48):
    """Blocks of 8x8 pixels, each coloured by its class (plus noise): learnable in a few steps."""
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, k, (4, size // 8, size // 8), generator=gen)
    y = blocks.repeat_interleave(8, 1).repeat_interleave(8, 2)
    colours = torch.randn(k, 3, generator=gen)
    x = colours[y].permute(0, 3, 1, 2) + 0.1 * torch.randn(4, 3, size, size, generator=gen)
    y[:, :4] = IGNORE
    return x, y


@pytest.mark.parametrize("name", ["deeplabv3plus-tiny", "segformer-tiny"])
def test_training_steps_reduce_the_loss_on_a_fixed_batch(name):
    torch.manual_seed(0)
    model = build_model(name, 4)
    x, y = fixed_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    valid = torch.ones_like(y, dtype=torch.bool)
    losses = []
    for _ in range(15):
        loss = ce(model(x), y, valid)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


# Names and shapes of the published checkpoints (torchvision resnet50 / official mit_b0.pth), written down
# here independently of the model code: loading real files depends on them.
TORCHVISION_R50 = {"conv1.weight": (64, 3, 7, 7), "bn1.running_var": (64,), "layer1.0.conv1.weight": (64, 64, 1, 1),
                   "layer1.0.downsample.0.weight": (256, 64, 1, 1), "layer3.5.bn2.weight": (256,),
                   "layer4.0.downsample.1.running_mean": (2048,), "layer4.2.conv3.weight": (2048, 512, 1, 1),
                   "fc.weight": (1000, 2048), "fc.bias": (1000,)}
OFFICIAL_MIT_B0 = {"patch_embed1.proj.weight": (32, 3, 7, 7), "patch_embed1.norm.weight": (32,),
                   "block1.0.attn.q.weight": (32, 32), "block1.0.attn.kv.weight": (64, 32),
                   "block1.0.attn.sr.weight": (32, 32, 8, 8), "block1.1.attn.norm.bias": (32,),
                   "block1.0.mlp.dwconv.dwconv.weight": (128, 1, 3, 3), "block4.1.mlp.fc2.weight": (256, 1024),
                   "norm4.weight": (256,), "patch_embed4.proj.weight": (256, 160, 3, 3), "head.weight": (1000, 256),
                   "head.bias": (1000,)}


@pytest.mark.parametrize("name,known,extra", [("deeplabv3plus-r50", TORCHVISION_R50, "fc."),
                                              ("segformer-b0", OFFICIAL_MIT_B0, "head.")])
def test_backbone_weights_load_from_the_published_format(tmp_path, name, known, extra):
    model = build_model(name, 21)
    own = model.backbone.state_dict()
    for key, shape in known.items():
        if not key.startswith(extra):
            assert tuple(own[key].shape) == shape, key
    torch.manual_seed(1)
    state = {k: torch.randn(v.shape) if v.is_floating_point() else v.clone() for k, v in own.items()}
    state.update({k: torch.randn(s) for k, s in known.items() if k.startswith(extra)})  # the ImageNet classifier
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    assert load_backbone(model, path)["ignored"] == 2
    for key, value in model.backbone.state_dict().items():
        torch.testing.assert_close(value, state[key], msg=key)
    wrapped = tmp_path / "wrapped.pth"  # {"state_dict": {"module.<key>": ...}} as some trainers save it
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    load_backbone(build_model(name, 21), wrapped)

    broken = dict(state)
    first = next(iter(own))
    del broken[first]
    broken["decoder.extra.weight"] = torch.zeros(1)
    torch.save(broken, path)
    with pytest.raises(UserError, match=rf"1 missing keys \(first: {first}\); 1 unexpected keys \(first: "
                                        r"decoder.extra.weight\)"):
        load_backbone(build_model(name, 21), path)
    with pytest.raises(UserError, match="not found"):
        load_backbone(model, tmp_path / "nope.pth")


def test_miou_equals_a_hand_computed_confusion_matrix():
    # two 2x3 images, K = 3; the model below predicts exactly `pred`
    pred = torch.tensor([[[0, 0, 1], [1, 2, 2]], [[0, 1, 1], [2, 2, 0]]])
    truth = torch.tensor([[[0, 0, 0], [1, 1, 2]], [[0, 1, IGNORE], [2, 1, 0]]])

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(pred[int(x[0, 0, 0, 0])], 3).permute(2, 0, 1)[None].float() * 10

    val = [(torch.full((3, 2, 3), float(i)), truth[i]) for i in range(2)]
    result = evaluate(Fixed(), val, 3, torch.device("cpu"))
    # rows truth, cols prediction, ignore skipped:
    # class 0: truth at 5 px; predicted 0 at 4 of them (img0 (0,0),(0,1); img1 (0,0),(1,2)), img0 (0,2) -> 1
    # class 1: truth at 4 px; img0 (1,0) -> 1, (1,1) -> 2; img1 (0,1) -> 1, (1,1) -> 2
    # class 2: truth at 2 px; img0 (1,2) -> 2; img1 (1,0) -> 2
    conf = np.array([[4, 1, 0], [0, 2, 2], [0, 0, 2]])
    inter = np.diag(conf)
    iou = inter / (conf.sum(0) + conf.sum(1) - inter)
    assert result["iou"] == pytest.approx(iou.tolist())
    assert result["miou"] == pytest.approx(iou.mean())
    assert result["pixel_accuracy"] == pytest.approx(8 / 11)


def test_padding_is_neither_a_class_nor_ignore():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    mask = rng.integers(0, 3, (10, 12)).astype(np.uint8)
    mask[0, 0] = IGNORE  # a real ignore pixel
    crop_img, (crop_mask,), valid = random_crop(image, [mask], 16, rng)
    assert crop_img.shape == (16, 16, 3) and valid.sum() == 10 * 12
    assert (crop_mask[~valid] == IGNORE).all() and (crop_img[~valid] == 0).all()
    assert (crop_mask[valid] == IGNORE).sum() == 1  # the real ignore pixel is still told apart by `valid`

    # the loss never sees padding, whatever the logits say there
    logits = torch.randn(1, 3, 16, 16)
    target = torch.from_numpy(crop_mask.astype(np.int64))[None]
    v = torch.from_numpy(valid)[None]
    wild = logits.clone()
    wild[:, :, ~v[0]] = 100.0
    assert ce(logits, target, v) == pytest.approx(ce(wild, target, v).item())
    # stage II: a confident teacher on padded pixels adds nothing, and the mean is over real pixels only
    model = torch.nn.Conv2d(3, 3, 1)
    batch_u = {"image": torch.randn(2, 3, 16, 16), "strong": torch.randn(2, 3, 16, 16),
               "box": torch.zeros(2, 16, 16, dtype=torch.bool), "valid": v.repeat(2, 1, 1)}
    batch_l = {"image": torch.randn(1, 3, 16, 16), "mask": target, "valid": v}
    _, unsup = self_training.losses(model, None, batch_l, batch_u, Criterion(threshold=0.0))
    with torch.no_grad():
        pseudo = model(batch_u["image"]).softmax(1).argmax(1)
    per_pixel = torch.nn.functional.cross_entropy(model(batch_u["strong"]), pseudo, reduction="none")
    assert unsup.item() == pytest.approx(per_pixel[batch_u["valid"]].mean().item(), rel=1e-5)

    # sliding-window evaluation of an image smaller than the window cuts the padding off again
    pointwise = torch.nn.Conv2d(3, 3, 1)
    x = torch.randn(1, 3, 10, 12)
    torch.testing.assert_close(predict(pointwise, x, "sliding", crop=16), predict(pointwise, x, "whole"))
    x = torch.randn(1, 3, 40, 50)
    torch.testing.assert_close(predict(pointwise, x, "sliding", crop=16), predict(pointwise, x, "whole"))


def test_augmentation_depends_only_on_seed_epoch_and_index(toy_world, calibrated, tmp_path):
    config = fresh(toy_world, calibrated, tmp_path)
    dataset = Dataset(config)
    a = TrainImages(dataset, dataset.split("unlabeled"), "unlabeled", TINY)
    b = TrainImages(dataset, dataset.split("unlabeled"), "unlabeled", TINY)
    for key, value in a[3].items():
        assert torch.equal(value, b[3][key]), key
    assert not torch.equal(a[(3, 0)]["image"], a[(3, 5)]["image"])  # another draw of the same image differs
    b.epoch = 1
    assert not torch.equal(a[3]["image"], b[3]["image"])
    loader = torch.utils.data.DataLoader(a, batch_size=2, num_workers=2)
    first = next(iter(loader))
    assert torch.equal(first["strong"][1], a[1]["strong"])  # same in a worker process


def test_schedules_and_lr_rule():
    assert unlabeled_weight(0, 0.5, 0.1) == pytest.approx(0.5)
    assert unlabeled_weight(1, 0.5, 0.1) == pytest.approx(0.1)
    assert unlabeled_weight(0.5, 0.5, 0.1) == pytest.approx((0.5 * 0.1) ** 0.5)  # geometric mean halfway
    assert unlabeled_weight(0.5, 0.5, 0.1, "linear") == pytest.approx(0.3)
    assert unlabeled_weight(0.7, 0.4, 0.1, "constant") == 0.4
    assert poly(0, 100) == 1 and poly(100, 100) == 0 and poly(50, 100, 1.0) == pytest.approx(0.5)
    assert effective_lr(Recipe(lr=1e-3), 2) == pytest.approx(2.5e-4)
    plan = epoch_plan(10, 3, 4, seed=0, epoch=0)
    assert len(plan) == 2 and all(len(lab) == len(unl) == 4 for lab, unl in plan)
    unlabeled = [i for _, unl in plan for i, _ in unl]
    assert len(set(unlabeled)) == len(unlabeled) == 8  # one pass, no repeats
    labeled = [item for lab, _ in plan for item in lab]
    assert len(set(labeled)) == 8 and len({i for i, _ in labeled}) == 3  # repeats, each its own draw
    assert epoch_plan(10, 3, 4, 0, 0) == plan != epoch_plan(10, 3, 4, 0, 1)
    with pytest.raises(UserError, match="--optimizer"):
        get_recipe("toy", "folder", optimizer="lion")


def test_stage_one_then_two_on_the_toy_world_and_clear_errors(toy_world, calibrated, tmp_path):
    config = fresh(toy_world, calibrated, tmp_path)
    with pytest.raises(UserError, match="run `conformalsam train --stage 1 --name run` first"):
        train_stage(config, "t", TINY, 2, name="run")
    one = train_stage(config, "t", TINY, 1, name="run", log=lambda *_: None)
    two = train_stage(config, "t", TINY, 2, name="run", log=lambda *_: None)
    assert 0 <= one["best"] <= 1 and 0 <= two["best"] <= 1
    lines = [json.loads(x) for x in (Path(one["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2] and all("miou" in x and len(x["iou"]) == 8 for x in lines)
    found = collect(config.work_dir)
    assert found["calibration"]["alpha"] == 0.1
    assert found["runs"]["run"]["stage1"]["epochs"] == 2 and found["runs"]["run"]["stage2"]["epochs"] == 1
    assert found["runs"]["run"]["stage1"]["best"] == pytest.approx(one["best"])
    state = load_checkpoint(Path(two["run_dir"]) / "best.pt")
    assert state["stage"] == 2 and state["model_name"] == "deeplabv3plus-tiny"
    again = train_stage(config, "t", TINY, 1, name="run", log=lambda *_: None)  # finished, same inputs: reused
    assert again["unchanged"] and again["best"] == one["best"]
    assert train_stage(config, "t", TINY, 2, name="run", log=lambda *_: None)["unchanged"]
    with pytest.raises(UserError, match=r"other settings \(lr 0.002, now 0.001\); pass --name for a new run, or"):
        train_stage(config, "t", replace(TINY, lr=1e-3), 1, name="run")
    with pytest.raises(UserError, match=r"started with other settings \(lr 0.002, now 0.001\); resume it with the"):
        train_stage(config, "t", replace(TINY, lr=1e-3), 1, name="run", resume=True)

    # an EMA teacher is what gets scored, so it is what best.pt holds
    stage1 = Path(one["run_dir"]) / "last.pt"
    ema = train_stage(config, "t", replace(TINY, ema=0.9), 2, name="ema", init=stage1, log=lambda *_: None)
    saved = load_checkpoint(Path(ema["run_dir"]) / "best.pt")
    model = build_model(saved["model_name"], 8)
    model.load_state_dict(saved["model"])
    dataset = Dataset(config)
    rescored = evaluate(model, ValImages(dataset, dataset.split("val")), 8, torch.device("cpu"), crop=32)
    assert rescored["miou"] == pytest.approx(ema["best"])
    assert load_checkpoint(Path(ema["run_dir"]) / "last.pt")["student"] is not None
    late = train_stage(config, "t", replace(TINY, eval_from=0.5), 1, name="late", log=lambda *_: None)
    lines = [json.loads(x) for x in (Path(late["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert ["miou" in x for x in lines] == [False, True] and late["best"] == lines[-1]["miou"]
    with pytest.raises(UserError, match="at least 2 per process"):
        train_stage(config, "t", replace(TINY, batch_size=1), 2, name="small", init=stage1)

    from pipeline.stage1.calibrate import Settings, run_calibrate

    run_calibrate(config, Settings(alpha=0.3), jobs=1, warn=lambda *_: None)  # other masks than run's
    with pytest.raises(UserError, match=r"trained with other cached masks \(calibrate has rewritten them since\)"):
        train_stage(config, "t", TINY, 1, name="run")
    masks = config.work_dir / "masks"
    victim = sorted(masks.glob("*.png"))[0]
    victim.unlink()
    with pytest.raises(UserError, match=f"{victim.stem}.*--allow-missing-masks"):
        train_stage(config, "t", TINY, 1, name="other")
    train_stage(config, "t", replace(TINY, epochs=(1, 1)), 1, name="other", allow_missing_masks=True,
                log=lambda *_: None)
    (masks / ".key").write_text("stale\n")
    with pytest.raises(UserError, match="do not belong"):
        train_stage(config, "t", TINY, 1, name="third")


RESUMABLE = """
import sys
from dataclasses import replace
from pathlib import Path
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from conftest import toy_config
from test_trainer import TINY
from trainer.stages import train_stage
config = replace(toy_config(Path(sys.argv[3])), work_dir=Path(sys.argv[4]))
recipe = replace(TINY, crop=48, epochs=(4, 1))
train_stage(config, "t", recipe, 1, name=sys.argv[5], resume=sys.argv[6] == "1", deterministic=True,
            log=lambda *_: None)
"""


def test_kill_and_resume_gives_the_parameters_of_an_uninterrupted_run(toy_world, calibrated, tmp_path):
    config = fresh(toy_world, calibrated, tmp_path)
    tests = Path(__file__).resolve().parent

    def command(name, resume):
        return [sys.executable, "-c", RESUMABLE, str(tests), str(PROJECT_ROOT), str(toy_world), str(config.work_dir),
                name, "1" if resume else "0"]

    subprocess.run(command("straight", False), check=True)
    proc = subprocess.Popen(command("killed", False))
    last = config.work_dir / "runs" / "killed" / "stage1" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert load_checkpoint(last)["epoch"] < 4, "the run finished before it could be killed"
    subprocess.run(command("killed", True), check=True)
    a = load_checkpoint(config.work_dir / "runs" / "straight" / "stage1" / "last.pt")
    b = load_checkpoint(last)
    assert a["epoch"] == b["epoch"] == 4 and a["step"] == b["step"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    timing = ("seconds", "images_per_s", "val_seconds")

    def log(run):
        lines = (config.work_dir / "runs" / run / "stage1" / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k not in timing} for x in lines]

    assert [x["epoch"] for x in log("killed")] == [1, 2, 3, 4]
    assert log("killed") == log("straight")  # the resumed run's log is the uninterrupted run's


def test_a_run_killed_before_its_first_checkpoint_starts_clean_and_resume_needs_a_run(toy_world, calibrated,
                                                                                      tmp_path, monkeypatch, capsys):
    from test_hardening import run_cli

    config = fresh(toy_world, calibrated, tmp_path)
    out = config.work_dir / "runs" / "early" / "stage1"
    out.mkdir(parents=True)
    (out / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "loss": 9.0}) + "\n")  # killed before last.pt
    train_stage(config, "t", TINY, 1, name="early", log=lambda *_: None)
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    flags = toy_flags(config)
    for stage in ("1", "2", "all"):
        line = run_cli(monkeypatch, capsys, "train", "--stage", stage, "--resume", "--name", "erly", *flags)
        assert "--resume:" in line and "runs there: early" in line
    assert not (config.work_dir / "runs" / "erly").exists()


def test_torchrun_two_processes_train_an_epoch(toy_world, calibrated, tmp_path):
    config = fresh(toy_world, calibrated, tmp_path)
    flags = toy_flags(config)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(PROJECT_ROOT / "cli.py"), "train", "--stage", "1", "--epochs", "1", "--crop", "32",
                    "--batch-size", "4", "--workers", "0", "--name", "ddp", *flags],
                   check=True, env=env, cwd=tmp_path, timeout=300)
    run = config.work_dir / "runs" / "ddp" / "stage1"
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert load_checkpoint(run / "last.pt")["step"] == len(Dataset(config).split("unlabeled")) // 4

    result = CliRunner().invoke(app, ["eval", "--checkpoint", str(run / "last.pt"), "--mode", "sliding",
                                      "--crop", "24", *flags], terminal_width=120)
    assert result.exit_code == 0, result.output
    assert "mean" in result.output


def test_class_weights_weigh_rare_classes_up_and_keep_the_loss_size():
    # image 1: 90 px of class 0, 10 of class 1; image 2: 100 of class 0; class 2 in no labeled image
    counts = np.array([[90, 10, 0], [100, 0, 0]])
    weight = class_weights("median-frequency", counts)
    # frequencies: class 0 190 / 200, class 1 10 / 100 (only image 1 holds it): median 0.525
    assert weight[1] / weight[0] == pytest.approx(0.95 / 0.1)
    assert weight[2] == weight[1]  # unseen: the largest weight
    enet = class_weights("enet", counts)  # 1 / ln(1.02 + share): shares 0.95, 0.05, 0
    assert enet[1] / enet[0] == pytest.approx(np.log(1.97) / np.log(1.07))
    assert enet[2] / enet[0] == pytest.approx(np.log(1.97) / np.log(1.02))
    for w in (weight, enet):  # an average labeled pixel weighs 1
        assert (w * counts.sum(0)).sum() == pytest.approx(counts.sum())
    assert np.allclose(class_weights("median-frequency", np.array([[5, 5], [5, 5]])), 1.0)
    with pytest.raises(ValueError):
        class_weights("enet", np.zeros((2, 3)))


def test_class_weights_scale_each_pixel_by_its_class():
    logits = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    target = torch.randint(0, 3, (2, 4, 4), generator=torch.Generator().manual_seed(1))
    target[0, 0] = IGNORE
    valid = torch.ones_like(target, dtype=torch.bool)
    valid[1, :, 0] = False
    weight = torch.tensor([1.0, 2.0, 0.5])
    per_pixel = torch.nn.functional.cross_entropy(logits, target.clamp(max=2), reduction="none")
    counted = (target != IGNORE) & valid
    expected = (per_pixel * weight[target.clamp(max=2)] * counted).sum() / counted.sum()
    assert Criterion(weight=weight).ce(logits, target, valid) == pytest.approx(expected.item())
    assert Criterion().ce(logits, target, valid) == pytest.approx(((per_pixel * counted).sum() / counted.sum()).item())
    conf = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(2))
    pseudo = target.clamp(max=2)
    kept = (conf >= 0.5) & valid
    expected = (per_pixel * weight[pseudo] * kept).sum() / valid.sum()
    assert Criterion(0.5, weight).confident_ce(logits, pseudo, conf, valid) == pytest.approx(expected.item())


def test_a_class_weighted_run_says_its_weights_and_is_another_run(toy_world, calibrated, tmp_path):
    config = fresh(toy_world, calibrated, tmp_path)
    said = []
    recipe = replace(TINY, epochs=(1, 1), class_weights="median-frequency")
    weighted = train_stage(config, "t", recipe, 1, name="w", log=said.append)
    dataset = Dataset(config)
    expected = class_weights("median-frequency", label_counts(dataset, dataset.split("labeled")))
    line = next(x for x in said if x.startswith("class weights"))
    assert line.endswith(", ".join(f"{c} {w:.2f}" for c, w in zip(dataset.classes, expected)))
    assert load_checkpoint(Path(weighted["run_dir"]) / "last.pt")["identity"]["recipe"]["class_weights"] == \
        "median-frequency"
    plain = train_stage(config, "t", replace(recipe, class_weights="none"), 1, name="p", log=lambda *_: None)
    assert "class_weights" not in load_checkpoint(Path(plain["run_dir"]) / "last.pt")["identity"]["recipe"]
    with pytest.raises(UserError, match=r"other settings \(class_weights median-frequency, now none\)"):
        train_stage(config, "t", replace(recipe, class_weights="none"), 1, name="w")
    with pytest.raises(UserError, match="--class-weights inverse: choose one of none, median-frequency, enet"):
        get_recipe("toy", "folder", class_weights="inverse")


def test_a_labeled_only_run_needs_no_calibration_and_equals_one_that_read_masks(toy_world, calibrated, tmp_path,
                                                                                monkeypatch):
    """Lambda 0 throughout: no masks are read; the result is the one a run that read (and weighed by 0) the
    cached masks got, so such a run, recorded with its masks' key by earlier versions, is reused."""
    config = fresh(toy_world, calibrated, tmp_path)
    recipe = replace(TINY, epochs=(1, 1), lambda_start=0.0, lambda_end=0.0, lambda_schedule="constant")
    with monkeypatch.context() as patch:  # as earlier versions ran it: the cached masks read, weighed by 0
        patch.setattr(Recipe, "labeled_only", property(lambda self: False))
        with_masks = train_stage(config, "t", recipe, 1, name="old", log=lambda *_: None)
        assert load_checkpoint(Path(with_masks["run_dir"]) / "last.pt")["identity"]["inputs"] is not None
    assert train_stage(config, "t", recipe, 1, name="old", log=lambda *_: None)["unchanged"]

    for name in ("calibration.json", "masks"):  # no calibration at all
        path = config.work_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    said = []
    alone = train_stage(config, "t", recipe, 1, name="new", log=said.append)
    assert "16 labeled images (labeled only: the 54 unlabeled pass through BatchNorm, no masks)" in said[0]
    old, new = (load_checkpoint(Path(r["run_dir"]) / "last.pt") for r in (with_masks, alone))
    assert all(torch.equal(old["model"][k], new["model"][k]) for k in old["model"])
    assert new["masks"] is None and json.loads((Path(alone["run_dir"]) / "run.json").read_text())["masks"] is None
    with pytest.raises(UserError, match="--allow-missing-masks: a labeled-only run"):
        train_stage(config, "t", recipe, 1, name="third", allow_missing_masks=True)
    with pytest.raises(UserError, match="no calibration"):  # a run that weighs the masks still needs them
        train_stage(config, "t", replace(recipe, lambda_end=0.1), 1, name="fourth")


def test_summary_says_what_each_run_trained_on(toy_world, calibrated, tmp_path):
    config = fresh(toy_world, calibrated, tmp_path)
    quiet = dict(log=lambda *_: None)
    short = replace(TINY, epochs=(1, 1))
    train_stage(config, "t", replace(short, lambda_start=0.0, lambda_end=0.0), 1, name="alone", **quiet)
    train_stage(config, "t", short, 1, name="filtered", **quiet)
    train_stage(config, "t", short, 2, name="filtered", **quiet)
    run_calibrate(config, Settings(rule="argmax"), jobs=1, warn=lambda *_: None)
    train_stage(config, "t", short, 1, name="raw", **quiet)

    runs = collect(config.work_dir)["runs"]
    current = read_calibration(config.work_dir)
    said = {(run, stage): trained_on(r["masks"], current) for run, stages in runs.items() for stage, r in stages.items()}
    assert said == {("alone", "stage1"): "labeled only",
                    ("filtered", "stage1"): "filtered masks (paper, alpha 0.1, rule paper), recalibrated since",
                    ("filtered", "stage2"): "filtered masks (paper, alpha 0.1, rule paper), recalibrated since",
                    ("raw", "stage1"): "raw masks (rule argmax), the current masks"}
    (Path(run_dir(config, "raw", 1)) / "run.json").unlink()  # a run of an earlier version
    assert collect(config.work_dir)["runs"]["raw"]["stage1"]["masks"] == UNRECORDED
    assert trained_on(UNRECORDED, current) == "not recorded"
