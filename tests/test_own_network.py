"""Bring your own network: a factory student (`--model file.py:function`, its code folder) trains both stages,
resumes exactly, is rebuilt from its checkpoint in a fresh process and refused once its factory changed;
`--init-weights` re-initialises exactly a classifier for another class count; UniMatch needs encode / decode."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import cli
from cli import app
from conftest import fresh, toy_flags
from pipeline import PROJECT_ROOT
from pipeline.config import parse
from pipeline.data.datasets import Dataset
from pipeline.errors import UserError
from test_hardening import run_cli
from test_stage2_methods import Crash
from test_trainer import TINY
from trainer.checkpoint import load_checkpoint, load_trained
from trainer.models import Segmenter, build_model, factory_record, load_init
from trainer.recipes import get_recipe
from trainer.stages import _optimizer, run_dir, train_stage

# The user's "checkout": a network at output stride 4, with a backbone; SplitNet adds encode / decode.
CHECKOUT = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, classes, width=8):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.Conv2d(width, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.classifier = nn.Conv2d(width, classes, 1)

    def forward(self, x):
        return self.classifier(self.backbone(x))


class SplitNet(Net):
    def encode(self, x):
        return [self.backbone(x)]

    def decode(self, features):
        return self.classifier(features[0])


class Halves(nn.Module):  # the backbone a property (as EdgeNets' base_net); encode only, to a dict of features
    def __init__(self, classes):
        super().__init__()
        self.base = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.head = nn.Conv2d(8, classes, 1)

    @property
    def backbone(self):
        return self.base

    def forward(self, x):
        return self.head(self.base(x))

    def encode(self, x):
        return {"x": self.base(x)}


class Whole(Halves):
    def decode(self, features):
        return self.head(features["x"])


class Broken(Net):  # a mistake in the user's own forward
    def forward(self, x):
        return self.classifier(x.flatten(1))


class Flat(nn.Module):  # no backbone: one parameter group
    def __init__(self, classes):
        super().__init__()
        self.conv = nn.Conv2d(3, classes, 3, padding=1)

    def forward(self, x):
        return self.conv(x)
'''
FACTORY = '''
def build(classes):
    from ownnet import Net  # from the code folder, on sys.path only while this runs
    return Net(classes)


def build_split(classes):
    from ownnet import SplitNet
    return SplitNet(classes)


def build_flat(classes):
    from ownnet import Flat
    return Flat(classes)


def build_halves(classes):
    from ownnet import Halves
    return Halves(classes)


def build_whole(classes):
    from ownnet import Whole
    return Whole(classes)


def build_broken(classes):
    from ownnet import Broken
    return Broken(classes)


def wrong_classes(classes):
    from ownnet import Net
    return Net(classes + 1)
'''
QUIET = dict(log=lambda *_: None, deterministic=True)


@pytest.fixture
def own(tmp_path):
    """(factory file, code folder) of the user's network."""
    (tmp_path / "checkout").mkdir()
    (tmp_path / "checkout" / "ownnet.py").write_text(CHECKOUT)
    (tmp_path / "nets.py").write_text(FACTORY)
    yield tmp_path / "nets.py", tmp_path / "checkout"
    sys.modules.pop("ownnet", None)


def recipe_of(own, function="build", **changes):
    factory, code = own
    return replace(TINY, model=f"{factory}:{function}", model_code=code, **changes)


def test_a_factory_network_trains_both_stages_resumes_exactly_and_is_rebuilt_in_a_fresh_process(
        toy_world, calibrated, tmp_path, own):
    config = fresh(toy_world, calibrated, tmp_path)
    recipe = recipe_of(own, epochs=(3, 1), ema=0.9)
    one = train_stage(config, "t", recipe, 1, name="run", **QUIET)
    state = load_checkpoint(Path(one["run_dir"]) / "last.pt")
    assert state["model_name"] == recipe.model and state["factory"]["sha256"] and "def build" in \
        state["factory"]["source"]
    assert not any(k.startswith("model.") for k in state["model"])  # the network's own keys

    def crash_after_first(record):
        if record["epoch"] == 1:
            raise Crash

    with pytest.raises(Crash):
        train_stage(config, "t", recipe, 1, name="again", on_epoch=crash_after_first, **QUIET)
    resumed = train_stage(config, "t", recipe, 1, name="again", resume=True, **QUIET)
    again = load_checkpoint(Path(resumed["run_dir"]) / "last.pt")
    assert again["epoch"] == state["epoch"] == 3 and resumed["best"] == one["best"]
    for key, value in state["model"].items():
        assert torch.equal(value, again["model"][key]), key

    two = train_stage(config, "t", recipe, 2, name="run", **QUIET)  # self-training with an EMA teacher
    best = Path(two["run_dir"]) / "best.pt"
    assert load_checkpoint(best)["student"] is None and load_checkpoint(Path(two["run_dir"]) / "last.pt")["student"]

    # eval rebuilds the network from the checkpoint alone, in another process and another folder
    flags = toy_flags(config)
    out = subprocess.run([sys.executable, str(PROJECT_ROOT / "cli.py"), "eval", "--checkpoint", str(best), *flags],
                         capture_output=True, text=True, cwd=tmp_path / "checkout", timeout=300)
    assert out.returncode == 0, out.stderr
    assert re.search(rf"mean\s+│\s+{100 * two['best']:.1f}\s", out.stdout), out.stdout  # results: stdout
    assert f"mIoU {100 * two['best']:.1f}%" in out.stdout


def test_the_network_s_backbone_gets_the_base_rate_and_a_network_without_one_is_one_part(own):
    for function, groups in (("build", [1e-3, 1e-2]), ("build_halves", [1e-3, 1e-2]), ("build_flat", [1e-3])):
        recipe = recipe_of(own, function, head_lr_mult=10.0, optimizer="sgd")
        model = build_model(recipe.model, 3, recipe.model_code)
        optimizer = _optimizer(model, recipe, 1e-3)
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(groups)
        assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_a_changed_factory_is_refused_with_the_difference(toy_world, calibrated, tmp_path, own, monkeypatch,
                                                          capsys):
    config = fresh(toy_world, calibrated, tmp_path)
    recipe = recipe_of(own, epochs=(2, 1))
    one = train_stage(config, "t", recipe, 1, name="run", **QUIET)
    last = Path(one["run_dir"]) / "last.pt"
    classes = load_checkpoint(last)["classes"]
    load_trained(last, classes)  # unchanged: fine
    with pytest.raises(UserError, match=r"a run is already there, trained with other settings \(model \S+:build, now "
                                        r"\S+:build_split\)"):  # another network
        train_stage(config, "t", recipe_of(own, "build_split", epochs=(2, 1)), 1, name="run", **QUIET)
    factory, _ = own
    factory.write_text(FACTORY.replace("return Net(classes)", "return Net(classes, width=16)"))
    changed = r"nets.py changed since \(sha256 \w+ -> \w+\): '-    return Net\(classes\)'; '\+    return Net\(classes, width=16\)'"
    for attempt in (lambda: load_trained(last, classes),
                    lambda: train_stage(config, "t", recipe, 1, name="run", **QUIET),  # the finished run
                    lambda: train_stage(config, "t", recipe, 2, name="run", **QUIET)):  # stage II from it
        with pytest.raises(UserError, match=changed) as err:
            attempt()
        assert "\n" not in str(err.value) and "Restore that file" in str(err.value)
    said = run_cli(monkeypatch, capsys, "eval", "--checkpoint", last, "--config", "toy", "--root", config.root,
                   "--val", config.val)
    assert "changed since" in said


def test_init_weights_reinitialise_exactly_the_classifier_for_another_class_count(toy_world, calibrated, tmp_path,
                                                                                   own):
    recipe = recipe_of(own)
    torch.manual_seed(1)
    published = build_model(recipe.model, 21, recipe.model_code).state_dict()  # "trained on another label set"
    path = tmp_path / "published.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in published.items()}}, path)  # wrapped and prefixed
    torch.manual_seed(2)
    model = build_model(recipe.model, 8, recipe.model_code)
    fresh_head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("classifier")}
    loaded = load_init(model, path, 8)
    assert loaded["reinitialised"] == ["classifier.weight", "classifier.bias"] and loaded["file_classes"] == 21
    for key, value in model.state_dict().items():
        expected = fresh_head[key] if key.startswith("classifier") else published[key]
        assert torch.equal(value, expected), key

    # through the trainer: one printed line names what was re-initialised; stage I starts from the file
    config = fresh(toy_world, calibrated, tmp_path)
    lines = []
    train_stage(config, "t", replace(recipe, init_weights=path, epochs=(1, 1)), 1, name="init", log=lines.append)
    said = [line for line in lines if line.startswith("init weights")]
    assert said == [f"init weights: 14 tensors from {path}; re-initialised for 8 classes (the file's are for 21): "
                    "classifier.weight, classifier.bias"]

    # a checkpoint of this trainer (the network under "model", beside the optimiser and the rest) loads too
    trained = run_dir(config, "init", 1) / "last.pt"
    assert load_init(build_model(recipe.model, 8, recipe.model_code), trained, 8) == {
        "loaded": 16, "reinitialised": [], "file_classes": None}

    # the same class count: everything loads, nothing is re-initialised
    torch.save(build_model(recipe.model, 8, recipe.model_code).state_dict(), path)
    assert load_init(build_model(recipe.model, 8, recipe.model_code), path, 8)["reinitialised"] == []


def test_weights_that_do_not_fit_are_one_line_with_counts_and_an_example(tmp_path, own):
    recipe = recipe_of(own)
    model = build_model(recipe.model, 8, recipe.model_code)
    sys.path.insert(0, str(own[1]))
    try:
        from ownnet import Net

        wider = Net(21, width=16).state_dict()
    finally:
        sys.path.remove(str(own[1]))
    extra = {**model.state_dict(), "aux.weight": torch.zeros(3)}
    missing = {k: v for k, v in model.state_dict().items() if k != "backbone.0.weight"}
    # the counts add up: the model's tensors = fit + another shape + not in the file; the file's = fit + another
    # shape + the model does not have them
    cases = [(wider, r"does not fit the model: of the model's 16 tensors, fit 2, another shape in the file 14 \(only by "
                     r"the class count 12\), absent from the file 0; in the file but not in the model 0 \(e.g. "
                     r"backbone.3.weight: \(16, 16, 3, 3\) in the file, \(8, 8, 3, 3\) in the model\)"),
             (extra, r"16 tensors, fit 16, another shape in the file 0 .* absent from the file 0; in the file but not "
                     r"in the model 1 \(e.g. aux.weight "),
             (missing, r"16 tensors, fit 15, .* absent from the file 1; in the file but not in the model 0 \(e.g. "
                       r"backbone.0.weight missing\)"),
             ({"a": 1}, "expected a state dict")]
    for i, (state, match) in enumerate(cases):
        path = tmp_path / f"bad{i}.pth"
        torch.save(state, path)
        with pytest.raises(UserError, match=match) as err:
            load_init(build_model(recipe.model, 8, recipe.model_code), path, 8)
        assert "\n" not in str(err.value)
    # a width that equals the class count is not taken for a classifier: the 8 -> 8 convolution differs twice
    with pytest.raises(UserError, match=r"16 tensors, fit 2, another shape in the file 14"):
        torch.save(wider, path)
        load_init(build_model(recipe.model, 8, recipe.model_code), path, 8)
    with pytest.raises(UserError, match="give one"):
        get_recipe("toy", "folder", init_weights=path, backbone_weights=path)
    with pytest.raises(UserError, match="no `backbone` module.*--init-weights"):
        from trainer.models import load_backbone

        load_backbone(build_model(f"{own[0]}:build_flat", 8, own[1]), path)


def test_unimatch_needs_encode_and_decode(toy_world, calibrated, tmp_path, own):
    splits = toy_world / "splits" / "64"  # 1 step an epoch
    config = replace(fresh(toy_world, calibrated, tmp_path), labeled=splits / "labeled.txt",
                     unlabeled=splits / "unlabeled.txt")
    plain, split = recipe_of(own, epochs=(1, 1), threshold=0.5), recipe_of(own, "build_split", epochs=(1, 1),
                                                                            threshold=0.5)
    train_stage(config, "t", plain, 1, name="plain", **QUIET)
    with pytest.raises(UserError, match=r"--method unimatch: the network of --model .*nets.py:build has no encode / "
                                        r"decode method; .*encode\(images\) -> features and decode\(features\)"):
        train_stage(config, "t", plain, 2, name="plain", method="unimatch", **QUIET)
    train_stage(config, "t", split, 1, name="split", **QUIET)
    done = train_stage(config, "t", split, 2, name="split", method="unimatch", **QUIET)
    assert done["epochs_run"] == 1 and 0 <= done["best"] <= 1

    halves = recipe_of(own, "build_halves", epochs=(1, 1), threshold=0.5)
    train_stage(config, "t", halves, 1, name="halves", **QUIET)
    with pytest.raises(UserError, match=r"has no decode method"):
        train_stage(config, "t", halves, 2, name="halves", method="unimatch", **QUIET)

    # the perturbed branch decodes dropped-out features (a list or a dict of them), only in training mode, at the
    # input size
    for function in ("build_split", "build_whole"):
        spec = f"{own[0]}:{function}"
        net = Segmenter(build_model(spec, 4, own[1]), 4, spec).train()
        x = torch.randn(2, 3, 20, 28)
        clean, perturbed = net(x, perturb=True)
        assert clean.shape == perturbed.shape == (2, 4, 20, 28) and not torch.allclose(clean, perturbed)
        clean, perturbed = net.eval()(x, perturb=True)
        torch.testing.assert_close(clean, perturbed)


def test_factory_mistakes_are_one_line(toy_world, calibrated, tmp_path, own):
    factory, code = own
    config = fresh(toy_world, calibrated, tmp_path)
    cases = [(f"{factory}:wrong_classes", r"returned \(8, 9, 8, 8\) for images \(8, 3, 32, 32\); it must return "
                                          r"logits \(N, 8, h, w\)"),
             (f"{factory}:absent", "has no function 'absent'"),
             (f"{tmp_path}/nope.py:build", "nope.py not found")]
    for spec, match in cases:
        with pytest.raises(UserError, match=match) as err:
            train_stage(config, "t", replace(TINY, model=spec, model_code=code), 1, name="bad", **QUIET)
        assert "\n" not in str(err.value)
    sys.modules.pop("ownnet", None)  # as in a fresh process
    with pytest.raises(UserError, match=r"ModuleNotFoundError: No module named 'ownnet'.*name the folder it imports from \(--model-code, or code in the config's \[train\]\)"):
        build_model(f"{factory}:build", 8)
    with pytest.raises(UserError, match="--model-code .*only a factory"):
        build_model("deeplabv3plus-tiny", 8, code)
    assert factory_record("deeplabv3plus-tiny", None) is None


def test_an_error_inside_the_users_network_is_one_line_and_leaves_no_run_folder(toy_world, calibrated, tmp_path, own,
                                                                                monkeypatch, capsys):
    factory, code = own
    config = fresh(toy_world, calibrated, tmp_path)
    args = ["train", "--stage", "1", "--epochs", "1", "--crop", "32", "--batch-size", "4", "--workers", "0", "--name",
            "broken", "--model", f"{factory}:build_broken", "--model-code", code, *toy_flags(config)]
    def train() -> str:
        monkeypatch.setattr(sys, "argv", ["conformalsam", *map(str, args)])
        with pytest.raises(SystemExit) as exit_:
            cli.main()
        assert exit_.value.code == 2
        return capsys.readouterr().err

    said = train()  # the run's start line, then the error in one line
    err = said.strip().splitlines()[-1]
    assert "Traceback" not in said and err == (
        f"error: --model {factory}:build_broken: the network raised RuntimeError on images (8, 3, 32, 32): Expected "
        "3D (unbatched) or 4D (batched) input to conv2d, but got input of size: [8, 3072] (CONFORMALSAM_DEBUG=1 "
        "shows the traceback)")
    assert not (config.work_dir / "runs").exists()  # nothing left of a run that never took a step
    monkeypatch.setenv("CONFORMALSAM_DEBUG", "1")
    said = train()
    assert "Traceback" in said and "ownnet.py" in said  # and the line no longer says how to get it
    assert said.strip().splitlines()[-1] == err.replace(" (CONFORMALSAM_DEBUG=1 shows the traceback)", "")
    with pytest.raises(RuntimeError):  # a built-in network's error is the trainer's own: raised as it is
        Segmenter(build_model("deeplabv3plus-tiny", 8), 8, "deeplabv3plus-tiny")(torch.zeros(2, 5, 32, 32))


def test_stage_two_without_the_network_of_stage_one_says_which_to_give(toy_world, calibrated, tmp_path, own):
    factory, code = own
    config = fresh(toy_world, calibrated, tmp_path)
    train_stage(config, "t", recipe_of(own, epochs=(1, 1)), 1, name="run", **QUIET)
    with pytest.raises(UserError, match=rf"was trained as --model {re.escape(str(factory))}:build, this run builds "
                                        rf"deeplabv3plus-tiny; give the same --model \S+:build --model-code "
                                        rf"{re.escape(str(code))} \(or the config's \[train\] table\)"):
        train_stage(config, "t", replace(TINY, epochs=(1, 1)), 2, name="run", **QUIET)


def test_config_names_the_student_beside_the_annotator(tmp_path, own):
    text = ('[data]\nformat = "folder"\nroot = "d"\nlabeled = "l.txt"\nunlabeled = "u.txt"\n'
            '[foundation]\nbackend = "toy"\n[train]\nmodel = "nets.py:build"\ncode = "checkout"\n'
            'init_weights = "w.pth"\n')
    config = parse(text, tmp_path, "test")
    assert config.model == f"{tmp_path / 'nets.py'}:build" and config.model_code == tmp_path / "checkout"
    assert config.init_weights == tmp_path / "w.pth"
    assert parse(text.replace("nets.py:build", "pkg.mod:build"), tmp_path, "t").model == "pkg.mod:build"


def test_the_cli_takes_the_network_from_flags(toy_world, calibrated, tmp_path, own):
    config = fresh(toy_world, calibrated, tmp_path)
    factory, code = own
    flags = toy_flags(config)
    result = CliRunner().invoke(app, ["train", "--stage", "1", "--epochs", "1", "--crop", "32", "--batch-size", "4",
                                      "--workers", "0", "--name", "cli", "--model", f"{factory}:build",
                                      "--model-code", str(code), *flags], terminal_width=200)
    assert result.exit_code == 0, result.output
    metrics = run_dir(config, "cli", 1) / "metrics.jsonl"
    assert [json.loads(x)["epoch"] for x in metrics.read_text().splitlines()] == [1]


def test_torchrun_two_processes_run_unimatch_on_a_factory_network(toy_world, calibrated, tmp_path, own):
    config = fresh(toy_world, calibrated, tmp_path)
    factory, code = own
    flags = [*toy_flags(config), "--crop", "32", "--batch-size", "4", "--workers", "0", "--epochs", "1", "--name",
             "ddp", "--model", f"{factory}:build_split", "--model-code", str(code)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train_stage(config, "toy", recipe_of(own, "build_split", epochs=(1, 1)), 1, name="ddp", log=lambda *_: None)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(PROJECT_ROOT / "cli.py"), "train", "--stage", "2", "--method", "unimatch", *flags],
                   check=True, env=env, cwd=tmp_path, timeout=300)
    run = run_dir(config, "ddp", 2, "unimatch")
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert load_checkpoint(run / "last.pt")["step"] == len(Dataset(config).split("unlabeled")) // 4


def test_a_package_module_factory_and_relative_paths_from_the_command_line(toy_world, calibrated, tmp_path, own,
                                                                          monkeypatch, capsys):
    config = fresh(toy_world, calibrated, tmp_path)
    factory, code = own
    (code / "studentpkg").mkdir()
    (code / "studentpkg" / "__init__.py").write_text("")
    (code / "studentpkg" / "nets.py").write_text(FACTORY)
    flags = toy_flags(config)
    train = ["train", "--stage", "1", "--epochs", "1", "--crop", "32", "--batch-size", "4", "--workers", "0"]
    monkeypatch.chdir(tmp_path)  # relative paths, taken from the current folder
    torch.manual_seed(3)
    torch.save(build_model(f"{factory}:build", 21, code).state_dict(), tmp_path / "w.pth")
    for name, model in (("file", "nets.py:build"), ("package", "studentpkg.nets:build")):
        result = CliRunner().invoke(app, [*train, "--name", name, "--model", model, "--model-code", "checkout",
                                          "--init-weights", "w.pth", *flags], terminal_width=200)
        assert result.exit_code == 0, result.output
        state = load_checkpoint(run_dir(config, name, 1) / "last.pt")
        assert state["factory"]["sha256"] and Path(state["factory"]["file"]).name == "nets.py"
        assert state["recipe"]["model_code"] == str(code) and state["recipe"]["init_weights"] == str(tmp_path / "w.pth")
    assert load_checkpoint(run_dir(config, "file", 1) / "last.pt")["model_name"] == f"{factory}:build"
    sys.modules.pop("studentpkg.nets", None)
    sys.modules.pop("studentpkg", None)
    (code / "studentpkg" / "nets.py").write_text(FACTORY + "\n# tuned\n")
    said = run_cli(monkeypatch, capsys, "eval", "--checkpoint", run_dir(config, "package", 1) / "last.pt", *flags)
    assert "studentpkg/nets.py changed since" in said and "'+# tuned'" in said
    with pytest.raises(UserError, match="importing no_such_pkg.nets failed .*name the folder it imports from"):
        build_model("no_such_pkg.nets:build", 8)


def test_runs_of_the_previous_version_are_still_reused_resumed_and_evaluated(toy_world, calibrated, tmp_path):
    config = fresh(toy_world, calibrated, tmp_path)

    def crash_after_first(record):
        if record["epoch"] == 1:
            raise Crash

    def as_before(path):  # what the previous version wrote: no factory, no model_code / init_weights
        state = load_checkpoint(path)
        del state["factory"]
        for key in ("model_code", "init_weights"):
            del state["recipe"][key]
            assert key not in state["identity"]["recipe"]
        torch.save(state, path)
        return state

    one = train_stage(config, "t", TINY, 1, name="old", **QUIET)
    state = as_before(Path(one["run_dir"]) / "last.pt")
    assert train_stage(config, "t", TINY, 1, name="old", **QUIET)["unchanged"]
    load_trained(Path(one["run_dir"]) / "last.pt", state["classes"])
    with pytest.raises(Crash):
        train_stage(config, "t", TINY, 1, name="cut", on_epoch=crash_after_first, **QUIET)
    as_before(run_dir(config, "cut", 1) / "last.pt")
    assert train_stage(config, "t", TINY, 1, name="cut", resume=True, **QUIET)["best"] == one["best"]
