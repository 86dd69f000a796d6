"""Planted faults a new user hits: each ends in one line naming the file or flag and the fix, exit code 2,
no traceback, nothing already written changed."""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

import cli
from conftest import fresh
from test_trainer import TINY
from trainer.models import build_model, load_backbone
from trainer.recipes import get_recipe
from trainer.stages import train_stage


def run_cli(monkeypatch, capsys, *args) -> str:
    """The installed entry point on these arguments: returns its one line of error (exit code 2)."""
    monkeypatch.setattr(sys, "argv", ["conformalsam", *map(str, args)])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def noise(size: int) -> bytes:
    """Random bytes, the same in every run."""
    import numpy as np

    return np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()


def flags(config):
    return ["--root", config.root, "--labeled", config.labeled, "--unlabeled", config.unlabeled, "--val",
            config.val, "--work-dir", config.work_dir, "--format", "folder"]


def test_eval_refuses_bad_splits_and_files_that_are_no_trainer_checkpoints(toy_world, calibrated, tmp_path,
                                                                          monkeypatch, capsys):
    config = fresh(toy_world, calibrated, tmp_path)
    ckpt = tmp_path / "x.pt"
    torch.save({"a": torch.zeros(1)}, ckpt)
    err = run_cli(monkeypatch, capsys, "eval", "--checkpoint", ckpt, "--split", "bogus", *flags(config))
    assert "--split bogus: choose one of labeled, unlabeled, val" in err
    err = run_cli(monkeypatch, capsys, "eval", "--checkpoint", ckpt, *flags(config))
    assert f"{ckpt}: not a checkpoint of `conformalsam train`" in err and "last.pt or best.pt" in err
    ckpt.write_bytes(noise(4000))
    err = run_cli(monkeypatch, capsys, "eval", "--checkpoint", ckpt, *flags(config))
    assert "cannot be read as a checkpoint (damaged, or not a PyTorch file of tensors)" in err
    assert "weights_only" not in err


def test_random_bytes_as_backbone_weights(tmp_path):
    path = tmp_path / "resnet.pth"
    path.write_bytes(noise(3000))
    with pytest.raises(cli.UserError, match=r"cannot be read as backbone weights \(damaged, or not a PyTorch file"):
        load_backbone(build_model("deeplabv3plus-tiny", 3), path)


@pytest.mark.parametrize("flag,value", [("lr", "nan"), ("lr", "-1"), ("lr", "0"), ("weight_decay", "inf"),
                                        ("head_lr_mult", "nan"), ("momentum", "-0.5")])
def test_non_finite_or_non_positive_numbers_are_refused(flag, value):
    with pytest.raises(cli.UserError, match=f"--{flag.replace('_', '-')} {float(value)}: must be a finite number"):
        get_recipe("toy", "folder", **{flag: float(value)})


def test_training_checks_its_output_folder_and_epochs_before_any_work(toy_world, calibrated, tmp_path,
                                                                      monkeypatch, capsys):
    config = fresh(toy_world, calibrated, tmp_path)
    err = run_cli(monkeypatch, capsys, "train", "--stage", "1", "--epochs", "0", "--crop", "32", *flags(config))
    assert "--epochs 0: stage 1 needs at least 1 epoch" in err
    assert not (config.work_dir / "runs").exists()  # nothing created
    (config.work_dir / "runs" / "t").mkdir(parents=True)
    (config.work_dir / "runs" / "t" / "stage1").write_text("a file where the run folder goes")
    spent = []
    with pytest.raises(cli.UserError, match="runs/t/stage1: cannot write there.*choose another --work-dir"):
        train_stage(config, "t", TINY, 1, name="t", on_epoch=spent.append)
    assert not spent  # refused before the first epoch


def test_square_brackets_survive_in_error_lines(toy_world, calibrated, tmp_path, monkeypatch, capsys):
    config = fresh(toy_world, calibrated, tmp_path)
    odd = tmp_path / "x [y]" / "best.pt"
    err = run_cli(monkeypatch, capsys, "eval", "--checkpoint", odd, *flags(config))
    assert f"{odd}: not found" in err


class Huge(torch.nn.Module):
    """Finite logits far beyond float16's range (65504), e.g. an unnormalised head."""

    def __init__(self, classes: int):
        super().__init__()
        self.classes = classes

    def forward(self, x):
        pooled = torch.nn.functional.avg_pool2d(x, 4)
        return torch.cat([pooled] * 3, 1)[:, : self.classes] * 1e6


def test_logits_beyond_float16_are_stored_softmax_equal_and_calibrate_runs(toy_world, tmp_path):
    from dataclasses import replace

    from conftest import toy_config
    from pipeline.stage1.calibrate import Settings, run_calibrate
    from pipeline.data.datasets import Dataset, read_image
    from pipeline.stage0.logits import run_logits
    from pipeline.stage0.store import LogitsStore

    base = toy_config(toy_world)
    classes = Dataset(base).classes
    path = tmp_path / "huge.pt"
    torch.jit.script(Huge(len(classes))).save(str(path))
    config = replace(base, backend="torchscript", weights=path, work_dir=tmp_path / "work", outputs=classes)
    for split in ("labeled", "unlabeled"):
        run_logits(config, split, workers=0, info=lambda m: None, warn=lambda m: None, encoding="float16")
    store = LogitsStore(config.work_dir / "logits.zarr")
    sample = Dataset(base).split("labeled")[0]
    stored = torch.from_numpy(store.read(sample.id)).float()
    assert torch.isfinite(stored).all() and stored.max() <= 0
    x = torch.from_numpy(read_image(sample.image)).permute(2, 0, 1)[None].float() / 255
    expected = Huge(len(classes))(x)[0].softmax(0)
    torch.testing.assert_close(store.probabilities(sample.id).float(), expected, atol=2e-3, rtol=0)
    record = run_calibrate(config, Settings(alpha=0.1), jobs=1, warn=lambda m: None)
    assert 0 < record["diagnostics"]["unlabeled"]["kept_fraction"] <= 1


def test_16_bit_images_are_scaled_and_exif_rotation_is_warned(tmp_path):
    import numpy as np
    from PIL import Image

    from conftest import make_config, write_gray_png, write_image
    from pipeline.data.check import check_dataset
    from pipeline.data.datasets import Dataset, read_image

    rng = np.random.default_rng(0)
    deep = (np.arange(24 * 32).reshape(24, 32) * 85).astype(np.uint16)  # 0 .. 65195
    (tmp_path / "images").mkdir()
    Image.fromarray(deep).save(tmp_path / "images" / "deep.png")
    rotated = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    rotated.save(tmp_path / "images" / "rotated.jpg", exif=exif)
    write_image(tmp_path / "images" / "plain.jpg", rng)
    for name in ("deep", "rotated", "plain"):
        write_gray_png(tmp_path / "masks" / f"{name}.png", rng.integers(0, 2, (24, 32)))
    (tmp_path / "l.txt").write_text("images/deep.png masks/deep.png\nimages/rotated.jpg masks/rotated.png\n")
    (tmp_path / "u.txt").write_text("images/plain.jpg\n")
    dataset = Dataset(make_config(tmp_path, "folder", tmp_path / "l.txt", tmp_path / "u.txt",
                                  classes=("background", "thing")))
    image = read_image(tmp_path / "images" / "deep.png")
    assert image.dtype == np.uint8 and image.shape == (24, 32, 3)
    np.testing.assert_array_equal(image[..., 0], np.round(deep / 257).astype(np.uint8))  # not clipped to 255
    assert len(np.unique(image)) > 200
    report = check_dataset(dataset, n_jobs=1)
    assert report.ok and list(report.warnings) == ["EXIF orientation"]
    assert "rotated.jpg: EXIF orientation 6" in report.warnings["EXIF orientation"][0]


def test_advice_for_an_image_stage_0_could_not_read_and_split_warnings(toy_world, tmp_path):
    import shutil
    from dataclasses import replace

    from conftest import ANNOTATOR, toy_config
    from pipeline.stage1.calibrate import Settings, run_calibrate
    from pipeline.data.datasets import Dataset, parse_split
    from pipeline.stage0.logits import run_logits

    world = tmp_path / "toy"
    shutil.copytree(toy_world, world)
    config = replace(toy_config(world), weights=ANNOTATOR, work_dir=tmp_path / "work")
    victim = Dataset(config).split("unlabeled")[5]
    victim.image.write_bytes(b"not a jpeg")
    for split in ("labeled", "unlabeled"):
        run_logits(config, split, workers=0, info=lambda m: None, warn=lambda m: None)
    warnings = []
    run_calibrate(config, Settings(alpha=0.1), jobs=1, warn=warnings.append)
    with pytest.raises(cli.UserError, match=f"'{victim.id}' has no mask: stage 0 could not read it.*fix the image"):
        train_stage(config, "t", TINY, 1, name="run")

    # labeled images listed as unlabeled too: every stage warns
    first = open(config.labeled).readline()
    with open(config.unlabeled, "a") as f:
        f.write(first)
    assert "1 images are in both the labeled and the unlabeled split" in Dataset(config).overlap()
    warnings.clear()
    try:
        run_calibrate(config, Settings(alpha=0.1), jobs=1, warn=warnings.append)
    except cli.UserError:
        pass
    assert any("both the labeled and the unlabeled split" in w for w in warnings)

    # a path with a space is a bad line, and the message says why
    spaced = tmp_path / "spaced.txt"
    spaced.write_text("images/my image.jpg masks/my image.png\n")
    _, problems = parse_split(spaced, world, need_masks=True)
    assert "paths with spaces are not supported" in str(problems[0])


def test_inspect_pictures_have_an_ignore_colour_outside_the_palette_a_legend_and_a_marked_alpha(
        toy_world, calibrated, tmp_path):
    import numpy as np
    from PIL import Image

    from pipeline.outputs.inspect import IGNORE_COLOUR, legend_of, run_inspect
    from pipeline.labels import PALETTE

    assert not (PALETTE[:255] == IGNORE_COLOUR).all(1).any()  # no class is painted like ignore
    config = fresh(toy_world, calibrated, tmp_path)
    mask = np.array([[0, 3], [255, 3]], np.uint8)
    assert legend_of(("a", "b", "c", "d"), [mask]) == [("a", tuple(PALETTE[0])), ("d", tuple(PALETTE[3])),
                                                        ("ignore (255)", IGNORE_COLOUR)]
    result = run_inspect(config, count=2)
    sheet = np.asarray(Image.open(result["sheets"][0]))
    swatch = tuple(PALETTE[0])  # background is in every toy mask: its legend swatch is drawn below the tiles
    below = sheet[280:]
    assert (below == swatch).all(2).any()
    swept = result["sweep"]
    sweep = np.asarray(Image.open(result["figures"][0]))
    elsewhere = tmp_path / "elsewhere.png"
    from pipeline.outputs.plots import plot_sweep
    plot_sweep({**swept, "alpha": 0.3}, elsewhere)  # the same curves with another alpha marked
    assert (np.asarray(Image.open(elsewhere)) != sweep).any()


def test_a_damaged_store_is_refused_on_read_and_rebuilt_by_logits(toy_world, scored, tmp_path):
    import numpy as np

    from conftest import work_copy
    from pipeline.stage1.calibrate import Settings, run_calibrate
    from pipeline.stage0.logits import run_logits
    from pipeline.stage0.store import CHUNK, LogitsStore, write_scores

    config = work_copy(toy_world, scored, tmp_path)
    store = LogitsStore(config.work_dir / "logits.zarr")
    ids = store.ids()
    chunk = {i: store.path.joinpath("scores", i, *CHUNK) for i in ids[:4]}
    original = {i: p.read_bytes() for i, p in chunk.items()}
    quiet = dict(workers=0, info=lambda m: None, warn=lambda m: None)

    def rebuild(verify=False):
        return sum(run_logits(config, split, verify=verify, **quiet)["written"] for split in ("labeled", "unlabeled"))

    # 1. a deleted chunk: the rerun finds it (a stat) and writes exactly that image again, byte for byte
    chunk[ids[0]].unlink()
    with pytest.raises(cli.UserError, match=f"image '{ids[0]}' are damaged.*logits --verify"):
        store.read(ids[0])
    assert rebuild() == 1 and chunk[ids[0]].read_bytes() == original[ids[0]]

    # 2. bytes overwritten in place (same size): every read refuses it, --verify rebuilds it
    flipped = bytearray(original[ids[1]])
    flipped[40:80] = bytes(b ^ 0xFF for b in flipped[40:80])
    chunk[ids[1]].write_bytes(bytes(flipped))
    with pytest.raises(cli.UserError, match=f"'{ids[1]}' are damaged .*CRC-32"):
        run_calibrate(config, Settings(alpha=0.1), jobs=1, warn=lambda m: None)
    assert rebuild() == 0  # a stat cannot see it
    assert rebuild(verify=True) == 1 and chunk[ids[1]].read_bytes() == original[ids[1]]

    # 3. a garbage header (the decompressor is never reached: no abort) and stored NaN
    chunk[ids[2]].write_bytes(noise(len(original[ids[2]])))
    values = store.read(ids[3])
    values[0, 0, 0] = np.nan
    write_scores(store.path, ids[3], values, store.image_size(ids[3]))
    for victim in ids[2:4]:
        with pytest.raises(cli.UserError, match=f"'{victim}' are damaged"):
            store.read(victim)
    assert rebuild(verify=True) == 2
    assert all(chunk[i].read_bytes() == original[i] for i in ids[:4])
    run_calibrate(config, Settings(alpha=0.1), jobs=1, warn=lambda m: None)


def test_damaged_masks_are_refused_before_training_and_rewritten_by_calibrate(toy_world, scored, tmp_path):
    from PIL import Image

    from conftest import work_copy
    from pipeline.stage1.calibrate import Settings, run_calibrate

    config = work_copy(toy_world, scored, tmp_path)
    run_calibrate(config, Settings(alpha=0.1), jobs=1)
    masks = config.work_dir / "masks"
    original = {p.name: p.read_bytes() for p in masks.glob("*.png")}
    names = sorted(original)
    (masks / names[0]).unlink()
    (masks / names[1]).write_bytes(original[names[1]][:40])  # truncated
    Image.new("P", (5, 7)).save(masks / names[2])  # a valid PNG of the wrong size
    with pytest.raises(cli.UserError, match=f"{names[1]}: cached mask is damaged.*rerun `conformalsam calibrate`"):
        train_stage(config, "t", TINY, 1, name="run")
    record = run_calibrate(config, Settings(alpha=0.1), jobs=1)
    assert sorted(record["repaired"]) == [n[:-4] for n in names[:3]] and not record["unchanged"]
    assert {p.name: p.read_bytes() for p in masks.glob("*.png")} == original  # byte for byte
    assert run_calibrate(config, Settings(alpha=0.1), jobs=1)["unchanged"]


def test_a_worker_wrapped_user_error_prints_its_own_line():
    from pipeline.ui import one_line

    wrapped = ("Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 1, in f\npipeline.errors.UserError: /m/a.png: cached mask is damaged; rerun')
    assert one_line(wrapped) == "/m/a.png: cached mask is damaged; rerun"
    assert one_line("plain message") == "plain message"


def test_logits_and_calibrate_refuse_an_unwritable_work_folder_before_any_work(toy_world, scored, tmp_path,
                                                                              monkeypatch):
    from dataclasses import replace

    from conftest import work_copy
    from pipeline.stage1.calibrate import Settings, run_calibrate
    from pipeline.stage0.logits import run_logits

    config = work_copy(toy_world, scored, tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(cli.UserError, match="a-file/work: cannot write there"):
        run_logits(replace(config, work_dir=blocker / "work"), "labeled", workers=0, info=lambda m: None)
    # a read-only work folder (simulated: tests run as root, whom permissions do not stop)
    import pipeline.atomic

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(pipeline.atomic.tempfile, "NamedTemporaryFile", read_only)
    with pytest.raises(cli.UserError, match="work: cannot write there \\(Permission denied\\)"):
        run_calibrate(config, Settings(alpha=0.1), jobs=1, warn=lambda m: None)
    assert not (config.work_dir / "calibration.json").exists() and not (config.work_dir / "masks").exists()


def test_a_byte_order_mark_in_split_lists_classes_and_config_is_read_everywhere(toy_world, tmp_path, monkeypatch,
                                                                                 capsys):
    """Windows editors start UTF-8 files with U+FEFF: invisible, and not part of the first path."""
    import shutil
    from dataclasses import replace

    from conftest import ANNOTATOR, toy_config
    from pipeline.config import load
    from pipeline.data.datasets import Dataset
    from pipeline.stage0.logits import run_logits

    world = tmp_path / "toy"
    shutil.copytree(toy_world, world)
    config = replace(toy_config(world), weights=ANNOTATOR, work_dir=tmp_path / "work")
    bom = "\ufeff"
    for path in (config.labeled, config.unlabeled, config.root / "classes.txt"):
        path.write_text(bom + path.read_text(), encoding="utf-8")
    dataset = Dataset(config)
    first = dataset.split("labeled")[0]
    assert not first.id.startswith(bom) and first.image.is_file() and dataset.classes[0] == "background"
    result = run_logits(config, "labeled", workers=0, info=lambda m: None, warn=lambda m: None)
    assert result["failed"] == 0 and result["written"] == len(dataset.split("labeled"))

    out = tmp_path / "split"
    monkeypatch.setattr(sys, "argv", ["conformalsam", "data", "split", str(config.unlabeled), "--out", str(out),
                                      "--labeled", "3", "--root", str(config.root)])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code in (0, None), capsys.readouterr().err
    for name in ("labeled.txt", "unlabeled.txt"):
        assert bom not in (out / name).read_text(encoding="utf-8")

    toml = tmp_path / "exp.toml"
    toml.write_text(bom + f'[data]\nformat = "folder"\nroot = "{config.root}"\nlabeled = "{config.labeled}"\n'
                    f'unlabeled = "{config.unlabeled}"\n[foundation]\nbackend = "toy"\n', encoding="utf-8")
    assert load(toml).format == "folder"


def test_reports_say_only_what_applies(toy_world, calibrated, tmp_path):
    import shutil

    from conftest import fresh

    config = fresh(toy_world, calibrated, tmp_path)
    runner = CliRunner()
    result = runner.invoke(cli.app, ["calibrate", "--rule", "argmax", "--no-masks", *map(str, flags(config))],
                           terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "rule argmax: the masks are the annotator's argmax with every pixel kept" in result.output
    for absent in ("qhat", "coverage", "set sizes", "held out"):
        assert absent not in result.output, absent
    result = runner.invoke(cli.app, ["calibrate", "--no-masks", *map(str, flags(config))], terminal_width=200)
    assert "qhat" in result.output and "coverage" in result.output  # a filtering rule reports them

    other = tmp_path / "test.txt"
    shutil.copy(config.val, other)
    run_logits_val = runner.invoke(cli.app, ["logits", "--split", "val", "--workers", "0", *map(str, flags(config)),
                                             "--val", str(other)])
    assert run_logits_val.exit_code == 0, run_logits_val.output
    result = runner.invoke(cli.app, ["eval", "--scores", *map(str, flags(config)), "--val", str(other)],
                           terminal_width=200)
    assert result.exit_code == 0, result.output
    assert f"on the 6 images of {other}" in result.stdout and "val images" not in result.output
    assert "val split" not in result.output  # --val test.txt is not called the val split

    result = runner.invoke(cli.app, ["data", "split", str(config.unlabeled), "--out", str(tmp_path / "split"),
                                     "--labeled", "3", "--root", str(config.root)], terminal_width=80)
    assert result.exit_code == 0, result.output
    assert "3 labeled images" in " ".join(result.output.split()) and not any(line.rstrip().endswith(";")
                                                           for line in result.output.splitlines())


STAGE_FLAGS = [  # (stage, flags, what the refusal says)
    ("1", ["--init", "nowhere.pt"], "--init applies to stage II (--stage 2 or all) only, not to --stage 1"),
    ("all", ["--init", "nowhere.pt"], "--init gives stage II another start than stage I's checkpoint"),
    ("1", ["--method", "unimatch"], "--method applies to stage II"),
    ("1", ["--method", "self"], "--method applies to stage II"),
    ("1", ["--threshold", "0.5"], "--threshold applies to stage II"),
    ("1", ["--ema", "0.99"], "--ema applies to stage II"),
    ("2", ["--init-weights", "nowhere.pt"], "--init-weights applies to stage I (--stage 1 or all) only, not to --stage 2"),
    ("2", ["--backbone-weights", "nowhere.pt"], "--backbone-weights applies to stage I"),
    ("2", ["--allow-missing-masks"], "--allow-missing-masks applies to stage I"),
]


@pytest.mark.parametrize("stage,given,said", STAGE_FLAGS, ids=[f"{s} {g[0]}" for s, g, _ in STAGE_FLAGS])
def test_an_option_of_the_other_stage_is_refused(toy_world, calibrated, tmp_path, monkeypatch, capsys, stage, given,
                                                 said):
    config = fresh(toy_world, calibrated, tmp_path)
    err = run_cli(monkeypatch, capsys, "train", "--stage", stage, *given, *flags(config))
    assert said in err
    assert not (config.work_dir / "runs").exists()


OTHER_FLAGS = [  # (command, flags, what the refusal says)
    (["calibrate", "--rule", "argmax", "--alpha", "0.2"], "--alpha: --rule argmax keeps the annotator's argmax"),
    (["calibrate", "--rule", "argmax", "--mode", "crc", "--folds", "3"], "--mode, --folds: --rule argmax"),
    (["eval", "--scores", "--device", "cpu"], "--mode, --crop and --device do not apply"),
    (["inspect", "--ids", "x", "--count", "3"], "--count and --seed choose images at random; --ids names them"),
    (["eval", "--checkpoint", "x.pt", "--crop", "64"], "--crop is the sliding window's size: it applies to --mode"),
    (["eval", "--checkpoint", "x.pt", "--scores"], "give one, not both"),
    (["train", "--stage", "1", "--device", "cpu", "--amp", "fp16"], "--amp fp16: mixed precision is for GPUs"),
    (["train", "--stage", "1", "--lambda-start", "0", "--lambda-end", "0", "--lambda-schedule", "linear"],
     "--lambda-schedule linear: lambda is 0 throughout"),
]


@pytest.mark.parametrize("given,said", OTHER_FLAGS, ids=[" ".join(g[:3]) for g, _ in OTHER_FLAGS])
def test_an_option_that_does_not_apply_to_the_mode_is_refused(toy_world, calibrated, tmp_path, monkeypatch, capsys,
                                                              given, said):
    config = fresh(toy_world, calibrated, tmp_path)
    before = (config.work_dir / "calibration.json").read_bytes()
    assert said in run_cli(monkeypatch, capsys, *given, *flags(config))
    assert (config.work_dir / "calibration.json").read_bytes() == before


# a command has override flags only for the config sections it reads: the others are unknown options
UNREAD = [(["summary"], "--root"), (["summary"], "--backend"), (["calibrate"], "--backend"), (["train"], "--weights"),
          (["eval"], "--backend"), (["export"], "--weights"), (["inspect"], "--weights"), (["data", "check"], "--work-dir"),
          (["toy", "evaluate"], "--work-dir")]


@pytest.mark.parametrize("command,flag", UNREAD, ids=[f"{' '.join(c)} {f}" for c, f in UNREAD])
def test_a_config_setting_the_command_never_reads_is_no_option_of_it(command, flag):
    runner = CliRunner()
    result = runner.invoke(cli.app, [*command, flag, "x"])
    assert result.exit_code == 2 and "No such option" in result.output
    assert flag not in runner.invoke(cli.app, [*command, "--help"], terminal_width=200).output
    assert flag in runner.invoke(cli.app, ["config", "show", "--help"], terminal_width=200).output


def test_calibrate_no_masks_says_what_it_left(toy_world, scored, tmp_path, monkeypatch, capsys):
    from conftest import work_copy

    config = work_copy(toy_world, scored, tmp_path)

    def calibrate(*extra) -> str:
        monkeypatch.setattr(sys, "argv", ["conformalsam", "calibrate", *extra, *map(str, flags(config))])
        with pytest.raises(SystemExit) as exit_:
            cli.main()
        assert exit_.value.code == 0
        return capsys.readouterr().err

    assert "nothing written (run without --no-masks" in calibrate("--no-masks")
    assert not (config.work_dir / "calibration.json").exists() and not (config.work_dir / "masks").exists()
    calibrate()
    assert "calibration.json and the masks were left as they were" in calibrate("--no-masks", "--alpha", "0.3")


def test_small_wordings_say_what_is_there(toy_world, calibrated, tmp_path, monkeypatch, capsys):
    from conftest import fresh
    from pipeline.config import load, to_toml
    from pipeline.outputs import inspect

    config = fresh(toy_world, calibrated, tmp_path)
    said = []
    train_stage(config, "t", replace(TINY, epochs=(1, 1)), 1, name="one", log=said.append)
    assert "1 epoch x 13 steps" in said[0] and "(1 process)" in said[0]
    assert "background" not in to_toml(load("toy")) and 'background = "no-object"' in to_toml(load("voc-92"))

    captions = []
    monkeypatch.setattr(inspect, "contact_sheet", lambda tiles, legend: captions.append([c for c, _ in tiles]) or
                        inspect.Image.new("RGB", (4, 4)))
    best = config.work_dir / "runs" / "one" / "stage1" / "best.pt"
    monkeypatch.setattr(sys, "argv", ["conformalsam", "inspect", "--count", "1", "--checkpoint", str(best),
                                      *map(str, flags(config))])
    with pytest.raises(SystemExit):
        cli.main()
    assert captions[0][-1] == "one/stage1/best.pt, epoch 1"
    assert "wrote 1 contact sheet, alpha-sweep.png, training-curves.png and the page" in capsys.readouterr().err

    monkeypatch.setattr(sys, "argv", ["conformalsam", "export", str(tmp_path / "list"), "--to", "list",
                                      *map(str, flags(config))])
    with pytest.raises(SystemExit):
        cli.main()
    line = capsys.readouterr().err
    assert "(54 unlabeled images with filtered masks)" in line and "labeled," not in line
