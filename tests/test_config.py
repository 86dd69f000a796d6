from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.toy import SHIPPED_ANNOTATOR
from pipeline import config as cfg
from pipeline.errors import UserError

EXAMPLE = """[data]
format = "folder"
root = "data/toy/target"
labeled = "data/toy/splits/32/labeled.txt"
unlabeled = "data/toy/splits/32/unlabeled.txt"
val = "data/toy/splits/val.txt"

[foundation]
backend = "toy"
weights = "data/toy_annotator.pt"

[work]
dir = "work"
"""


def _write(folder: Path, text: str = EXAMPLE) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "exp.toml").write_text(text)
    return folder / "exp.toml"


def test_relative_paths_follow_the_config_file(tmp_path, monkeypatch):
    path = _write(tmp_path / "exps")
    monkeypatch.chdir(tmp_path)
    config = cfg.load(path)
    assert config.root == (tmp_path / "exps" / "data/toy/target")
    assert config.work_dir == tmp_path / "exps" / "work"
    assert config.classes is None and config.backend == "toy"


def test_default_lookup_prefers_local_file_then_toy_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    toy = cfg.load()  # a preset's paths start in the current folder, its annotator is the one the package ships
    assert toy.root == tmp_path / "data/toy/target" and toy.source == "preset 'toy'"
    assert toy.work_dir == tmp_path / "work" and toy.weights == SHIPPED_ANNOTATOR and SHIPPED_ANNOTATOR.is_file()
    assert cfg.load("camvid-1_2").labeled == tmp_path / "data/splits/camvid/1_2/labeled.txt"
    (tmp_path / cfg.DEFAULT_FILE).write_text(EXAMPLE.replace('"toy"', '"torchscript"'))
    assert cfg.load().backend == "torchscript" and cfg.load().root == tmp_path / "data/toy/target"


def test_every_field_can_be_overridden(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = cfg.override(cfg.load(_write(tmp_path / "e")), format="voc", root=Path("r"), labeled=Path("l"),
                          unlabeled=Path("u"), val=Path("v"), classes="bg, a ,b", backend="seem",
                          weights=Path("w.pt"), work_dir=Path("out"))
    assert (config.format, config.backend, config.classes) == ("voc", "seem", ("bg", "a", "b"))
    assert [config.root, config.labeled, config.unlabeled, config.val, config.weights, config.work_dir] == [
        tmp_path / n for n in ("r", "l", "u", "v", "w.pt", "out")]
    assert "flags" in config.source
    untouched = cfg.override(cfg.load(_write(tmp_path / "e")), root=None)
    assert untouched.root == tmp_path / "e" / "data/toy/target"


@pytest.mark.parametrize("name", list(cfg.PRESETS))
def test_presets_parse(name):
    config = cfg.load(name)
    assert config.format in cfg.FORMATS and config.backend in cfg.BACKENDS
    assert config.val is not None and config.weights is not None


def test_voc_presets_use_unimatch_split_layout():
    config = cfg.load("voc-366")
    assert config.format == "voc" and config.labeled.parts[-3:] == ("pascal", "366", "labeled.txt")


@pytest.mark.parametrize(("text", "match"), [
    (EXAMPLE.replace('format = "folder"', 'format = "kitti"'), "data.format 'kitti' is not one of"),
    (EXAMPLE.replace('backend = "toy"', 'backend = "sam9"'), "foundation.backend 'sam9'"),
    (EXAMPLE + "[data2]\nx = 1\n", "unknown key 'data2.x'"),
    (EXAMPLE.replace("[work]", "[work]\nbatch = 3"), "unknown key 'work.batch'"),
    (EXAMPLE.replace('root = "data/toy/target"\n', ""), "missing required key 'data.root'"),
    (EXAMPLE.replace('root = "data/toy/target"', "root = 3"), "'root' must be a string"),
    (EXAMPLE.replace('[work]', 'classes = []\n[work]'), "unknown key 'foundation.classes'"),
    ("[data\n", "not valid TOML"),
])
def test_bad_files_name_the_file_and_key(tmp_path, text, match):
    path = _write(tmp_path, text)
    with pytest.raises(UserError, match=match) as err:
        cfg.load(path)
    assert str(path) in str(err.value)


def test_classes_list_in_file(tmp_path):
    text = EXAMPLE.replace('val = "data/toy/splits/val.txt"', 'val = "v.txt"\nclasses = ["bg", "x"]')
    assert cfg.load(_write(tmp_path, text)).classes == ("bg", "x")
    with pytest.raises(UserError, match="data.classes"):
        cfg.load(_write(tmp_path, text.replace('["bg", "x"]', "[]")))


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="not one of"):
        cfg.override(cfg.load("toy"), format="png")
    with pytest.raises(UserError, match="no such file"):
        cfg.load(tmp_path / "absent.toml")


def test_show_output_parses_back_to_the_same_config(tmp_path):
    config = cfg.override(cfg.load("toy"), classes="a,b,c")
    (tmp_path / "c.toml").write_text(cfg.to_toml(config))
    again = cfg.load(tmp_path / "c.toml")
    assert {**again.__dict__, "source": ""} == {**config.__dict__, "source": ""}


def test_foundation_settings_parse_validate_and_round_trip(tmp_path):
    text = EXAMPLE.replace('[work]', '''code = "third_party/seem"
tokenizer = "weights/clip-tokenizer"
outputs = ["road", "car", "truck"]
background = "prompt"

[foundation.map]
road = "road"
vehicle = ["car", "truck"]
"potted plant" = []

[work]''')
    config = cfg.load(_write(tmp_path, text))
    assert config.code == tmp_path / "third_party/seem" and config.tokenizer == tmp_path / "weights/clip-tokenizer"
    assert config.outputs == ("road", "car", "truck") and config.background == "prompt"
    assert config.class_map == (("road", ("road",)), ("vehicle", ("car", "truck")), ("potted plant", ()))
    (tmp_path / "again.toml").write_text(cfg.to_toml(config))
    again = cfg.load(tmp_path / "again.toml")
    assert {**again.__dict__, "source": ""} == {**config.__dict__, "source": ""}
    for bad, match in [('background = "prompt"', "background = \"none\""), ('vehicle = ["car", "truck"]', "vehicle = 3"),
                       ('outputs = ["road", "car", "truck"]', "outputs = []")]:
        path = _write(tmp_path / "bad", text.replace(bad, match))
        with pytest.raises(UserError, match=r"foundation\.(background|map\.vehicle|outputs)"):
            cfg.load(path)
