"""The embedded toy world: a seeded generator of a small segmentation data set in two domains.

Both domains share the classes (background + seven shapes) but differ in appearance: palette,
texture, object scale, clutter, blur and noise. A network trained on the *source* domain
(see ``pipeline.toy.train``) is the toy world's foundation model; on the *target* domain its
errors come from that gap, as SEEM's do on a new data set.

Every image is drawn from its own RNG seeded by (seed, domain, split, index), so the output
does not depend on worker count or order.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed
from PIL import Image, ImageFilter

from pipeline.labels import write_palette_png

CLASSES = ("background", "disc", "square", "triangle", "ring", "cross", "star", "capsule")
LABELED_SIZES = (16, 32, 64)
TEXTURES = ("solid", "stripes", "checker", "dots")
WORLD_VERSION = 2


@dataclass(frozen=True)
class Domain:
    """How one domain looks. Hues are degrees; scales are object radii in pixels."""

    name: str
    hues: tuple[float, ...]  # per object class 1..7
    hue_jitter: float
    style_random: float  # chance an object's hue / texture is random: how far appearance alone gives the class
    saturation: tuple[float, float]
    value: tuple[float, float]
    textures: tuple[str, ...]  # per object class 1..7
    radius: tuple[float, float]
    objects: tuple[int, int]
    background: str
    clutter: int
    blur: float
    noise: float


SOURCE = Domain(
    name="source",
    hues=(0, 50, 100, 160, 210, 260, 310),
    hue_jitter=25,
    style_random=0.4,
    saturation=(0.45, 1.0),
    value=(0.6, 1.0),
    textures=("solid", "stripes", "solid", "checker", "solid", "dots", "stripes"),
    radius=(9, 30),
    objects=(2, 5),
    background="gradient",
    clutter=3,
    blur=0.0,
    noise=3.0,
)

# The target keeps each class's colour (shifted a little) but changes two classes' textures,
# desaturates, shrinks objects, and adds clutter, blur and noise.
TARGET = Domain(
    name="target",
    hues=(5, 55, 108, 165, 215, 265, 318),
    hue_jitter=18,
    style_random=0.0,
    saturation=(0.4, 0.8),
    value=(0.55, 0.9),
    textures=("solid", "stripes", "solid", "dots", "solid", "dots", "checker"),
    radius=(5, 24),
    objects=(3, 6),
    background="noise",
    clutter=10,
    blur=0.8,
    noise=8.0,
)

DOMAINS = {"source": SOURCE, "target": TARGET}


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    h = (h % 360) / 60.0
    c = v * s
    x = c * (1 - abs(h % 2 - 1))
    rgb = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(h) % 6]
    return np.array(rgb, dtype=np.float32) + (v - c)


def _shape(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership of local coordinates (unit radius) in a class's shape."""
    rho = np.hypot(u, v)
    if kind == "disc":
        return rho <= 1.0
    if kind == "square":
        return np.maximum(abs(u), abs(v)) <= 0.8
    if kind == "triangle":
        return (v >= -0.5) & (v <= 1.0 - np.sqrt(3) * abs(u))
    if kind == "ring":
        return (rho <= 1.0) & (rho >= 0.55)
    if kind == "cross":
        return ((abs(u) <= 0.3) & (abs(v) <= 1.0)) | ((abs(v) <= 0.3) & (abs(u) <= 1.0))
    if kind == "star":
        theta = np.arctan2(v, u)
        return rho <= 0.4 + 0.6 * (0.5 + 0.5 * np.cos(5 * theta)) ** 2
    if kind == "capsule":
        return u**2 + (v / 0.38) ** 2 <= 1.0
    raise ValueError(kind)


def _texture(kind: str, rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Brightness multiplier over the object, in [0.55, 1.1]."""
    freq = rng.uniform(2.5, 4.5)
    if kind == "solid":
        return np.ones_like(u)
    if kind == "stripes":
        return 0.8 + 0.25 * np.sign(np.sin(freq * np.pi * (u + v)))
    if kind == "checker":
        return 0.8 + 0.25 * np.sign(np.sin(freq * np.pi * u) * np.sin(freq * np.pi * v))
    if kind == "dots":
        return np.where((np.sin(freq * 2 * np.pi * u) * np.sin(freq * 2 * np.pi * v)) > 0.5, 0.6, 1.0)
    raise ValueError(kind)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bicubically."""
    grid = (rng.random((cells, cells)) * 255).astype(np.uint8)
    img = Image.fromarray(grid).resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


def _background(domain: Domain, rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if domain.background == "gradient":
        a, b = (_hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0.1, 0.3), rng.uniform(0.3, 0.6)) for _ in range(2))
        t = (xx * np.cos(rng.uniform(0, 6.3)) + yy * np.sin(rng.uniform(0, 6.3)) + 1) / 2
        img = a * (1 - t[..., None]) + b * t[..., None]
        grid = ((np.floor(xx * 8) + np.floor(yy * 8)) % 2)[..., None]
        return img * (0.92 + 0.08 * grid)
    # target: earthy two-tone cloudy texture with fine grain
    a = _hsv_to_rgb(rng.uniform(20, 140), rng.uniform(0.15, 0.45), rng.uniform(0.25, 0.55))
    b = _hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0.1, 0.5), rng.uniform(0.35, 0.7))
    t = _smooth_noise(rng, size, int(rng.integers(4, 9)))[..., None]
    fine = _smooth_noise(rng, size, 32)[..., None]
    return (a * (1 - t) + b * t) * (0.85 + 0.3 * fine)


def _clutter(domain: Domain, rng: np.random.Generator, img: np.ndarray) -> None:
    """Background distractors: blobs and strokes that belong to no class (label stays background)."""
    size = img.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(int(rng.integers(domain.clutter // 2, domain.clutter + 1))):
        cx, cy = rng.uniform(0, size, 2)
        color = _hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0.1, 0.6), rng.uniform(0.3, 0.8))
        if rng.random() < 0.5:  # irregular blob
            r = rng.uniform(2, 7)
            wobble = 1 + 0.35 * np.sin(3 * np.arctan2(yy - cy, xx - cx) + rng.uniform(0, 6.3))
            sel = np.hypot(xx - cx, yy - cy) <= r * wobble
        else:  # thin stroke
            ang, length = rng.uniform(0, np.pi), rng.uniform(10, 40)
            u = (xx - cx) * np.cos(ang) + (yy - cy) * np.sin(ang)
            v = -(xx - cx) * np.sin(ang) + (yy - cy) * np.cos(ang)
            sel = (abs(u) <= length / 2) & (abs(v) <= rng.uniform(0.7, 1.8))
        img[sel] = color


def render(domain: Domain, rng: np.random.Generator, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """One (uint8 RGB image HxWx3, uint8 label mask HxW) pair of the given domain."""
    img = _background(domain, rng, size)
    _clutter(domain, rng, img)
    mask = np.zeros((size, size), dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(int(rng.integers(domain.objects[0], domain.objects[1] + 1))):
        cls = int(rng.integers(1, len(CLASSES)))
        radius = float(np.exp(rng.uniform(*np.log(domain.radius))))
        cx, cy = rng.uniform(0, size, 2)
        ang = rng.uniform(0, 2 * np.pi)
        u = ((xx - cx) * np.cos(ang) + (yy - cy) * np.sin(ang)) / radius
        v = (-(xx - cx) * np.sin(ang) + (yy - cy) * np.cos(ang)) / radius
        sel = _shape(CLASSES[cls], u, v)
        if not sel.any():
            continue
        hue = domain.hues[cls - 1] + rng.normal(0, domain.hue_jitter)
        if rng.random() < domain.style_random:
            hue = rng.uniform(0, 360)
        texture = domain.textures[cls - 1]
        if rng.random() < domain.style_random:
            texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
        color = _hsv_to_rgb(hue, rng.uniform(*domain.saturation), rng.uniform(*domain.value))
        shade = _texture(texture, rng, u, v) * (1 + 0.15 * (u * rng.normal() + v * rng.normal()) / 2)
        img[sel] = color * shade[sel][:, None]
        mask[sel] = cls  # painter's order: later objects occlude earlier ones
    pil = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
    if domain.blur:
        pil = pil.filter(ImageFilter.GaussianBlur(domain.blur))
    out = np.asarray(pil, dtype=np.float32) + rng.normal(0, domain.noise, (size, size, 3))
    return np.clip(out, 0, 255).astype(np.uint8), mask


def sample_rng(seed: int, domain: str, split: str, index: int) -> np.random.Generator:
    """The RNG of one image: independent of generation order and worker count."""
    key = [seed, ["source", "target"].index(domain), ["train", "val"].index(split), index]
    return np.random.default_rng(key)


@dataclass(frozen=True)
class WorldSpec:
    """What `generate` builds; stored as world.json so an identical world is not rebuilt."""

    seed: int = 0
    train: int = 1064  # target train pool: the largest labeled split + ~1000 unlabeled
    val: int = 200
    source_val: int = 200
    size: int = 128
    version: int = WORLD_VERSION


def _write_pair(folder: Path, name: str, image: np.ndarray, mask: np.ndarray) -> None:
    Image.fromarray(image).save(folder / "images" / f"{name}.jpg", quality=92)
    write_palette_png(folder / "masks" / f"{name}.png", mask)


def _render_and_write(spec: WorldSpec, domain: str, split: str, index: int, folder: Path) -> None:
    image, mask = render(DOMAINS[domain], sample_rng(spec.seed, domain, split, index), spec.size)
    _write_pair(folder, f"{split}_{index:05d}", image, mask)


def is_current(out: Path, spec: WorldSpec) -> bool:
    """Whether ``out`` already holds the world of ``spec``."""
    meta = Path(out) / "world.json"
    return meta.is_file() and json.loads(meta.read_text()) == asdict(spec)


def generate(out: Path, spec: WorldSpec = WorldSpec(), force: bool = False, progress=None) -> bool:
    """Write the toy world under ``out``; returns False when an identical world is already there.

    Layout (the `folder` data set format):
      out/target/{images,masks,classes.txt}   out/source/{images,masks,classes.txt} (source val)
      out/splits/{16,32,64}/{labeled,unlabeled}.txt   out/splits/{val,source_val}.txt   out/world.json
    Built in a temporary sibling folder and renamed into place, so a crash leaves no half world.
    """
    out = Path(out)
    if not force and is_current(out, spec):
        return False
    if spec.train < max(LABELED_SIZES) + 1:
        raise ValueError(f"train pool must exceed the largest labeled split ({max(LABELED_SIZES)})")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for domain in ("target", "source"):
        (tmp / domain / "images").mkdir(parents=True)
        (tmp / domain / "masks").mkdir(parents=True)
        (tmp / domain / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    jobs = [("target", "train", i) for i in range(spec.train)]
    jobs += [("target", "val", i) for i in range(spec.val)]
    jobs += [("source", "val", i) for i in range(spec.source_val)]
    tasks = (delayed(_render_and_write)(spec, d, s, i, tmp / d) for d, s, i in jobs)
    for _ in Parallel(n_jobs=-1, batch_size=32, return_as="generator")(tasks):
        if progress is not None:
            progress(1, len(jobs))
    _write_splits(tmp / "splits", spec)
    (tmp / "world.json").write_text(json.dumps(asdict(spec), indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return True


def _write_splits(folder: Path, spec: WorldSpec) -> None:
    """UniMatch-format split lists; labeled splits are nested (16 within 32 within 64)."""
    line = lambda split, i: f"images/{split}_{i:05d}.jpg masks/{split}_{i:05d}.png\n"  # noqa: E731
    order = np.random.default_rng([spec.seed, 99]).permutation(spec.train)
    for n in LABELED_SIZES:
        (folder / str(n)).mkdir(parents=True)
        (folder / str(n) / "labeled.txt").write_text("".join(line("train", i) for i in sorted(order[:n])))
        (folder / str(n) / "unlabeled.txt").write_text("".join(line("train", i) for i in sorted(order[n:])))
    (folder / "val.txt").write_text("".join(line("val", i) for i in range(spec.val)))
    # source-domain val (root: out/source): how good the annotator is on its own domain
    (folder / "source_val.txt").write_text("".join(line("val", i) for i in range(spec.source_val)))

