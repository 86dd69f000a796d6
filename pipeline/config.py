"""Experiment config: a small TOML file, every field overridable from the command line.

Lookup: ``--config FILE`` (or a preset name), else ``conformalsam.toml`` in the current folder,
else the built-in toy preset. Relative paths in a file are relative to that file's folder;
preset paths are relative to the project checkout; paths given as CLI flags to the current folder.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path

from pipeline.toy import SHIPPED_ANNOTATOR as TOY_ANNOTATOR
from pipeline.errors import UserError
from pipeline.factory import absolute_spec, is_factory

FORMATS = ("voc", "ade20k", "cityscapes", "coco", "camvid", "folder")
# backend name -> the class that loads it, imported only when chosen (SEEM and transformers are heavy imports)
BACKENDS = {
    "seem": "pipeline.backends.seem:SeemBackend",
    "sam3": "pipeline.backends.hf:Sam3Backend",
    "clipseg": "pipeline.backends.hf:ClipSegBackend",
    "pytorch": "pipeline.backends.pytorch:PyTorchBackend",
    "torchscript": "pipeline.backends.torchscript:TorchScriptBackend",
    "toy": "pipeline.backends.toy:ToyBackend",
}
DEFAULT_FILE = "conformalsam.toml"


@dataclass(frozen=True)
class Config:
    format: str
    root: Path
    labeled: Path
    unlabeled: Path
    val: Path | None
    classes: tuple[str, ...] | None  # None: the format's own list (folder: root/classes.txt)
    backend: str
    weights: Path | None
    work_dir: Path
    source: str  # where it came from, for messages
    code: Path | None = None  # a third-party checkout the backend imports from (SEEM)
    tokenizer: Path | None = None  # SEEM's CLIP tokenizer folder (offline)
    outputs: tuple[str, ...] | None = None  # a closed-set model's output channels, in order
    background: str = "no-object"  # SEEM: what scores the data set's "background" class
    class_map: tuple[tuple[str, tuple[str, ...]], ...] = ()  # [foundation.map]: class -> outputs / prompts
    factory: str | None = None  # pytorch backend: "module:function" or "path/to/file.py:function"
    resize: int | tuple[int, int] | None = None  # pytorch backend: shorter side, or (H, W); None: as is
    mean: tuple[float, float, float] | None = None  # pytorch backend: normalisation of RGB in [0, 1]
    std: tuple[float, float, float] | None = None
    model: str | None = None  # [train] the student network: a built-in name or "file.py:function" (None: recipe's)
    model_code: Path | None = None  # [train] the folder that factory imports from
    init_weights: Path | None = None  # [train] the student's starting weights (a whole-network state dict)


# (table, key) of each TOML field -> Config attribute
FIELDS = {
    ("data", "format"): "format",
    ("data", "root"): "root",
    ("data", "labeled"): "labeled",
    ("data", "unlabeled"): "unlabeled",
    ("data", "val"): "val",
    ("data", "classes"): "classes",
    ("foundation", "backend"): "backend",
    ("foundation", "weights"): "weights",
    ("foundation", "code"): "code",
    ("foundation", "tokenizer"): "tokenizer",
    ("foundation", "outputs"): "outputs",
    ("foundation", "background"): "background",
    ("foundation", "map"): "class_map",
    ("foundation", "factory"): "factory",
    ("foundation", "resize"): "resize",
    ("foundation", "mean"): "mean",
    ("foundation", "std"): "std",
    ("train", "model"): "model",
    ("train", "code"): "model_code",
    ("train", "init_weights"): "init_weights",
    ("work", "dir"): "work_dir",
}
PATHS = {"root", "labeled", "unlabeled", "val", "weights", "work_dir", "code", "tokenizer", "model_code", "init_weights"}
NAME_LISTS = {"classes": "data.classes", "outputs": "foundation.outputs"}
BACKGROUND = ("no-object", "prompt")


def _camvid(n: int) -> str:
    return f"""[data]
format = "camvid"
root = "data/CamVid"
labeled = "data/splits/camvid/1_{n}/labeled.txt"
unlabeled = "data/splits/camvid/1_{n}/unlabeled.txt"
val = "data/splits/camvid/val.txt"

[foundation]  # ESPNetv2 trained on Cityscapes, from the user's EdgeNets checkout (docs/data.md 'CamVid')
backend = "pytorch"
factory = "benchmarks/real/espnetv2_city.py:build"
code = "third_party/EdgeNets"
weights = "data/weights/espnetv2_s_2.0_city_1024x512.pth"
resize = [512, 1024]
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]
outputs = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
           "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle", "background"]

[foundation.map]  # Cityscapes -> CamVid; the model's own background channel goes to no class
Sky = "sky"
Building = ["building", "wall"]
Pole = "pole"
Road = "road"
Pavement = "sidewalk"
Tree = ["vegetation", "terrain"]
SignSymbol = ["traffic light", "traffic sign"]
Fence = "fence"
Car = ["car", "truck", "bus", "train"]
Pedestrian = "person"
Bicyclist = ["rider", "motorcycle", "bicycle"]

[work]
dir = "work/camvid-1_{n}"
"""


def _seem(fmt: str, root: str, splits: str, split: str, work: str) -> str:
    """A preset over split files laid out as UniMatch's (``<splits>/<split>/{labeled,unlabeled}.txt`` and
    ``<splits>/val.txt``), annotated by SEEM."""
    return f"""[data]
format = "{fmt}"
root = "{root}"
labeled = "{splits}/{split}/labeled.txt"
unlabeled = "{splits}/{split}/unlabeled.txt"
val = "{splits}/val.txt"

[foundation]
backend = "seem"
weights = "data/weights/seem_focall_v1.pt"
code = "third_party/SEEM-v1.0"
tokenizer = "data/weights/clip-vit-base-patch32"

[work]
dir = "work/{work}"
"""


PRESETS = {
    "toy": f"""[data]
format = "folder"
root = "data/toy/target"
labeled = "data/toy/splits/32/labeled.txt"
unlabeled = "data/toy/splits/32/unlabeled.txt"
val = "data/toy/splits/val.txt"

[foundation]
backend = "toy"
weights = "{TOY_ANNOTATOR}"

[work]
dir = "work"
""",
    **{f"voc-{n}": _seem("voc", "data/VOCdevkit/VOC2012", "data/splits/pascal", str(n), f"voc-{n}")
       for n in (92, 183, 366, 732, 1464)},
    **{f"cityscapes-1_{n}": _seem("cityscapes", "data/cityscapes", "data/splits/cityscapes", f"1_{n}",
                                  f"cityscapes-1_{n}") for n in (30, 16, 8, 4, 2)},
    **{f"coco-1_{n}": _seem("coco", "data/coco", "data/splits/coco", f"1_{n}", f"coco-1_{n}")
       for n in (512, 256, 128, 64, 32)},
    **{f"camvid-1_{n}": _camvid(n) for n in (16, 8, 4, 2)},
    "ade20k": _seem("ade20k", "data/ADEChallengeData2016", "data/splits/ade20k", "1_64", "ade20k"),
}


def parse(text: str, base: Path, source: str) -> Config:
    """A Config from TOML text; relative paths are resolved against ``base``."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{source}: not valid TOML ({exc})")
    values: dict = {}
    for table, body in doc.items():
        if not isinstance(body, dict):
            raise UserError(f"{source}: top-level key '{table}' must be a table like [data], [foundation], [train] or "
                            "[work]")
        for key, value in body.items():
            if (table, key) not in FIELDS:
                known = ", ".join(f"{t}.{k}" for t, k in FIELDS)
                raise UserError(f"{source}: unknown key '{table}.{key}' (known: {known})")
            values[FIELDS[table, key]] = value
    for name in ("format", "root", "labeled", "unlabeled", "backend"):
        if name not in values:
            table, key = next(tk for tk, attr in FIELDS.items() if attr == name)
            raise UserError(f"{source}: missing required key '{table}.{key}'")
    for name, value in values.items():
        if name in NAME_LISTS:
            if not (isinstance(value, list) and value and all(isinstance(c, str) and c for c in value)):
                raise UserError(f"{source}: '{NAME_LISTS[name]}' must be a non-empty list of name strings")
            values[name] = tuple(value)
        elif name == "class_map":
            values[name] = _class_map(value, source)
        elif name in ("resize", "mean", "std"):
            values[name] = _numbers(name, value, source)
        elif not isinstance(value, str):
            raise UserError(f"{source}: '{name}' must be a string, got {type(value).__name__}")
    resolved = {k: (base / v if k in PATHS else v) for k, v in values.items()}
    for name in ("factory", "model"):  # a factory file is found beside the config
        if is_factory(values.get(name) or ""):
            resolved[name] = absolute_spec(values[name], base)
    resolved.setdefault("work_dir", base / "work")
    defaults = {f.name: None if f.default is MISSING else f.default for f in fields(Config) if f.name != "source"}
    config = Config(**{name: resolved.get(name, default) for name, default in defaults.items()}, source=source)
    return validate(config)


def _class_map(table, source: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """[foundation.map]: each data set class -> one name or a list of names (prompts or model outputs)."""
    if not isinstance(table, dict):
        raise UserError(f"{source}: 'foundation.map' must be a table like [foundation.map] with "
                        'class = ["prompt", ...] lines')
    pairs = []
    for name, value in table.items():
        value = [value] if isinstance(value, str) else value
        if not (isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value)):
            raise UserError(f"{source}: foundation.map.{name} must be a name or a list of names (an empty list "
                            "gives the class no model output)")
        pairs.append((name, tuple(v.strip() for v in value)))
    return tuple(pairs)


def _numbers(name: str, value, source: str):
    """resize: a shorter side (int) or [H, W]; mean, std: three numbers."""
    if name == "resize":
        if isinstance(value, int) and value > 0:
            return value
        if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
            return tuple(value)
        raise UserError(f"{source}: 'foundation.resize' must be a shorter side (512) or [height, width]")
    if isinstance(value, list) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value):
        if name == "std" and any(v <= 0 for v in value):
            raise UserError(f"{source}: 'foundation.std' values must be positive")
        return tuple(float(v) for v in value)
    raise UserError(f"{source}: 'foundation.{name}' must be three numbers (per RGB channel, for pixels in [0, 1])")


def validate(config: Config) -> Config:
    if config.format not in FORMATS:
        raise UserError(f"{config.source}: data.format '{config.format}' is not one of {', '.join(FORMATS)}")
    if config.backend not in BACKENDS:
        raise UserError(f"{config.source}: foundation.backend '{config.backend}' is not one of {', '.join(BACKENDS)}")
    if config.background not in BACKGROUND:
        raise UserError(f"{config.source}: foundation.background '{config.background}' is not one of "
                        f"{', '.join(BACKGROUND)}")
    return config


def preset_names() -> str:
    """The presets for help texts, runs of one data set shortened: 'toy, voc-92 .. voc-1464, ...'."""
    groups: dict[str, list[str]] = {}
    for name in PRESETS:
        groups.setdefault(name.split("-")[0], []).append(name)
    return ", ".join(names[0] if len(names) == 1 else ", ".join(names) if len(names) == 2 else
                     f"{names[0]} .. {names[-1]}" for names in groups.values())


def load(path: str | Path | None = None) -> Config:
    """The config named by ``path`` (a file or a preset name), or the default lookup."""
    if path is None:
        local = Path.cwd() / DEFAULT_FILE
        if not local.is_file():
            return parse(PRESETS["toy"], Path.cwd(), "preset 'toy'")
        path = local
    if str(path) in PRESETS:  # a preset is a config file in the current folder: its paths start there
        return parse(PRESETS[str(path)], Path.cwd(), f"preset '{path}'")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config {path}: no such file (give a TOML file or a preset: {preset_names()})")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--config {path}: cannot read it ({exc})")
    return parse(text, path.resolve().parent, str(path))


def override(config: Config, **flags) -> Config:
    """Apply CLI flags that were given (not None); paths are taken relative to the current folder."""
    given = {k: v for k, v in flags.items() if v is not None}
    if not given:
        return config
    for name, value in given.items():
        if name in PATHS:
            given[name] = Path(value).absolute()
        elif name == "classes":
            names = tuple(c.strip() for c in str(value).split(",") if c.strip())
            if not names:
                raise UserError("--classes: give class names separated by commas, background first")
            given[name] = names
    return validate(replace(config, **given, source=f"{config.source} + command-line flags"))


def to_toml(config: Config) -> str:
    """The config as TOML with absolute paths (what `config show` prints)."""
    lines, table = [], None
    for (tbl, key), attr in FIELDS.items():
        value = getattr(config, attr)
        if value is None or attr == "class_map" or (attr == "background" and config.backend != "seem"
                                                    and value == BACKGROUND[0]):
            continue  # (SEEM's default: shown for another backend, it reads as if it meant something there)
        if tbl != table:
            lines.append(("\n" if lines else "") + f"[{tbl}]")
            table = tbl
        if isinstance(value, tuple):
            lines.append(f"{key} = {json.dumps(list(value))}")
        elif isinstance(value, int):
            lines.append(f"{key} = {value}")
        else:
            lines.append(f"{key} = {json.dumps(str(value))}")  # a JSON string is a valid TOML string
    if config.class_map:  # a sub-table comes after its parent's keys
        lines.append("\n[foundation.map]")
        lines += [f"{json.dumps(name)} = {json.dumps(list(names))}" for name, names in config.class_map]
    return "\n".join(lines) + "\n"
