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

from pipeline import PROJECT_ROOT
from pipeline.errors import UserError

FORMATS = ("voc", "ade20k", "folder")
BACKENDS = ("seem", "sam3", "clipseg", "torchscript", "toy")
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
    ("work", "dir"): "work_dir",
}
PATHS = {"root", "labeled", "unlabeled", "val", "weights", "work_dir", "code", "tokenizer"}
NAME_LISTS = {"classes": "data.classes", "outputs": "foundation.outputs"}
BACKGROUND = ("no-object", "prompt")


def _voc(n: int) -> str:
    return f"""[data]
format = "voc"
root = "data/VOCdevkit/VOC2012"
labeled = "data/splits/pascal/{n}/labeled.txt"
unlabeled = "data/splits/pascal/{n}/unlabeled.txt"
val = "data/splits/pascal/val.txt"

[foundation]
backend = "seem"
weights = "data/weights/seem_focall_v1.pt"
code = "third_party/SEEM-v1.0"
tokenizer = "data/weights/clip-vit-base-patch32"

[work]
dir = "work/voc-{n}"
"""


PRESETS = {
    "toy": """[data]
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
""",
    **{f"voc-{n}": _voc(n) for n in (92, 183, 366, 732, 1464)},
    "ade20k": """[data]
format = "ade20k"
root = "data/ADEChallengeData2016"
labeled = "data/splits/ade20k/1_64/labeled.txt"
unlabeled = "data/splits/ade20k/1_64/unlabeled.txt"
val = "data/splits/ade20k/val.txt"

[foundation]
backend = "seem"
weights = "data/weights/seem_focall_v1.pt"
code = "third_party/SEEM-v1.0"
tokenizer = "data/weights/clip-vit-base-patch32"

[work]
dir = "work/ade20k"
""",
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
            raise UserError(f"{source}: top-level key '{table}' must be a table like [data], [foundation] or [work]")
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
        elif not isinstance(value, str):
            raise UserError(f"{source}: '{name}' must be a string, got {type(value).__name__}")
    resolved = {k: (base / v if k in PATHS else v) for k, v in values.items()}
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


def validate(config: Config) -> Config:
    if config.format not in FORMATS:
        raise UserError(f"{config.source}: data.format '{config.format}' is not one of {', '.join(FORMATS)}")
    if config.backend not in BACKENDS:
        raise UserError(f"{config.source}: foundation.backend '{config.backend}' is not one of {', '.join(BACKENDS)}")
    if config.background not in BACKGROUND:
        raise UserError(f"{config.source}: foundation.background '{config.background}' is not one of "
                        f"{', '.join(BACKGROUND)}")
    return config


def load(path: str | Path | None = None) -> Config:
    """The config named by ``path`` (a file or a preset name), or the default lookup."""
    if path is None:
        local = Path.cwd() / DEFAULT_FILE
        if not local.is_file():
            return parse(PRESETS["toy"], PROJECT_ROOT, "preset 'toy'")
        path = local
    if str(path) in PRESETS:
        return parse(PRESETS[str(path)], PROJECT_ROOT, f"preset '{path}'")
    path = Path(path)
    if not path.is_file():
        presets = ", ".join(PRESETS)
        raise UserError(f"--config {path}: no such file (give a TOML file or a preset: {presets})")
    try:
        text = path.read_text()
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
        if value is None or attr == "class_map":
            continue
        if tbl != table:
            lines.append(("\n" if lines else "") + f"[{tbl}]")
            table = tbl
        if isinstance(value, tuple):
            lines.append(f"{key} = {json.dumps(list(value))}")
        else:
            lines.append(f"{key} = {json.dumps(str(value))}")  # a JSON string is a valid TOML string
    if config.class_map:  # a sub-table comes after its parent's keys
        lines.append("\n[foundation.map]")
        lines += [f"{json.dumps(name)} = {json.dumps(list(names))}" for name, names in config.class_map]
    return "\n".join(lines) + "\n"
