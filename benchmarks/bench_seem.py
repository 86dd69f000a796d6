"""`make bench-seem`: SEEM's own `evaluate` against the backend's computation of the same scores.

The real SEEM architecture at full size (focal-T or focal-L v1 config, `--model`; random weights: speed and
memory do not depend on the values), one image size (375x500 VOC photo -> 512x683 model input, the presets'
size), `--batch` images per call, fp32 or fp16 autocast (`--amp`, CUDA; what stage 0 uses on a GPU), two
vocabulary sizes (`--vocab`): VOC's
(22 prompts + no-object, built through SEEM's text encoder: its time is reported) and ADE20K's (171 +
no-object, random embeddings: 81 templates x 12 text layers per prompt take ~15 s each on 2 CPU cores,
milliseconds on a GPU). Paths, all giving scores at 1/4 of the input:

* evaluate: SEEM's `evaluate(height=H/4, width=W/4)` as the shipped config builds it: every query's mask
  logits upsampled to the padded input, cropped and resized to the output, sigmoid, class sum there;
* evaluate, heads off: the same model with panoptic and instance off at build (what the adapter did
  before): the class sum at full resolution, then crop + resize of the (K, H, W) result;
* backend: this adapter's batched computation of the first (keeping the no-object entry);
* mask-res: the class sum on the head's 1/4 masks, cropped, no upsampling: cheaper still, but not
  SEEM's numbers; its deviation from `evaluate` is printed, which is why the backend does not use it.

Prints images/s and the peak memory each path adds above the loaded model (CPU: sampled RSS; CUDA:
torch's peak allocation), what the backend's speed means for stage 0 of VOC train_aug (10,582 images) and
COCO train2017 (118,287), and writes them to work/bench/seem.json (--out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import seem_cpu  # noqa: E402

seem_cpu.declare_torchvision_ops()

import fake_seem  # noqa: E402  (a CLIP-format tokenizer, offline)
from conftest import make_config  # noqa: E402
from pipeline.backends import build_backend  # noqa: E402
from pipeline.backends.seem import import_seem  # noqa: E402
from pipeline.data.datasets import ADE20K_CLASSES, COCO_CLASSES, VOC_CLASSES  # noqa: E402
from pipeline.stage0.logits import resolve_device  # noqa: E402

H, W = 512, 683  # a 375x500 image at SEEM's shorter side 512

PATHS = ("evaluate", "heads off", "backend", "mask-res")  # the table's rows, in order


class PeakRSS:
    """The highest resident set size seen while the block runs, sampled every 2 ms, above its start."""

    def __enter__(self):
        self.start = self.peak = self._rss()
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    @property
    def added_mb(self) -> float:
        return (self.peak - self.start) / 2**20


VOCABULARIES = {"voc": ("voc-92", VOC_CLASSES), "coco": ("coco-1_32", COCO_CLASSES), "ade20k": ("ade20k", ADE20K_CLASSES)}
STAGE0 = {"voc": ("VOC train_aug", 10_582), "coco": ("COCO train2017", 118_287)}  # images a store holds


def entries(vocabulary: str) -> int:
    """The preset's classes as prompts (readable synonyms included) + SEEM's no-object entry."""
    from pipeline.data.classmap import build_class_map
    from pipeline.config import load

    preset, classes = VOCABULARIES[vocabulary]
    config = replace(load(preset), classes=classes)
    return len(build_class_map(classes, config, prompted=True, no_object=True).outputs)


def measure(run, device: torch.device, repeats: int, batch: int) -> dict:
    run()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with PeakRSS() as rss:
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        took = (time.perf_counter() - start) / repeats / batch  # per image
    memory = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else rss.added_mb
    return {"seconds_per_image": took, "images_per_s": 1 / took, "peak_mb_added": memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=("focalt", "focall"), default="focalt", help="SEEM's v1 config")
    parser.add_argument("--vocab", nargs="+", choices=tuple(VOCABULARIES), default=["voc", "ade20k"])
    parser.add_argument("--batch", type=int, default=1, help="images per call")
    parser.add_argument("--amp", action="store_true", help="fp16 autocast (CUDA), as stage 0 runs on a GPU")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "work" / "bench" / "seem.json")
    args = parser.parse_args()
    code = Path(os.environ["SEEM_SRC"]).resolve()
    device = resolve_device(args.device)
    if args.amp and device.type != "cuda":
        parser.error("--amp is fp16 autocast on CUDA (stage 0 runs fp32 on a CPU)")
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad(), __import__("pytest").MonkeyPatch.context() as patch:
        if device.type != "cuda":
            seem_cpu.redirect_cuda_build(patch)
        tmp = Path(tmp)
        seem = import_seem(code)
        root = code / "seem" if (code / "seem" / "modeling").is_dir() else code
        config_path = root / "configs" / "seem" / f"{args.model}_unicl_lang_v1.yaml"
        tokenizer = fake_seem.write_clip_tokenizer(tmp / "tokenizer")
        opt = seem.load_opt([str(config_path)])
        opt["MODEL"]["TEXT"]["PRETRAINED_TOKENIZER"] = str(tokenizer)
        torch.manual_seed(0)
        weights = tmp / f"seem_{args.model}_v1.pt"
        model = seem.build_model(opt)
        params = sum(p.numel() for p in model.parameters())
        torch.save(model.state_dict(), weights)
        del model
        (weights.with_suffix(".yaml")).write_text(config_path.read_text())
        rows = []
        config = replace(make_config(tmp, "folder", tmp / "l", tmp / "u", classes=VOC_CLASSES), backend="seem",
                         weights=weights, code=code, tokenizer=tokenizer)
        start = time.perf_counter()
        backend, mapping = build_backend(config, VOC_CLASSES, device)
        built = time.perf_counter() - start
        lang = backend.core.sem_seg_head.predictor.lang_encoder
        voc_embeddings, voc_outputs = lang.default_text_embeddings, backend.outputs
        core = backend.core
        torch.manual_seed(1)
        coarse = torch.randint(0, 256, (args.batch, 3, H // 16, W // 16)).float()
        images = F.interpolate(coarse, size=(H, W), mode="bilinear").round().to(torch.uint8).to(device)
        h4, w4 = math.ceil(H / 4), math.ceil(W / 4)
        inputs = [{"image": image, "height": h4, "width": w4} for image in images]
        for name in args.vocab:
            size = len(mapping.outputs) if name == "voc" else entries(name)
            if name == "voc":  # VOC's prompts through SEEM's text encoder; other vocabularies: random unit vectors
                lang.default_text_embeddings = voc_embeddings
                backend.outputs = voc_outputs
            else:
                lang.default_text_embeddings = F.normalize(torch.randn(size, voc_embeddings.shape[1],
                                                                       device=device), dim=-1)
                backend.outputs = tuple(f"p{i}" for i in range(size - 1))
            outputs = {}

            def evaluate():
                outputs["evaluate"] = core.evaluate(inputs)[0]["sem_seg"]

            def heads_off():
                core.sem_seg_postprocess_before_inference = False  # what building with panoptic/instance off sets
                outputs["heads off"] = core.evaluate(inputs)[0]["sem_seg"]
                core.sem_seg_postprocess_before_inference = True

            def adapter():
                outputs["backend"] = backend.predict(images)[0]

            def mask_res():
                batch = seem.ImageList.from_tensors([(image - core.pixel_mean) / core.pixel_std for image in images],
                                                    core.size_divisibility)
                out = core.sem_seg_head(core.backbone(batch.tensor), target_queries=None)
                outputs["mask-res"] = torch.einsum("qe,qhw->ehw", out["pred_logits"][0].float().softmax(-1),
                                                   out["pred_masks"][0].float().sigmoid())[:, :h4, :w4]

            row = {"vocabulary": name, "entries": size, "build_s": built if name == "voc" else None}
            runs = {"evaluate": evaluate, "heads off": heads_off, "backend": adapter, "mask-res": mask_res}
            for path in PATHS:
                with torch.autocast(device.type, dtype=torch.float16, enabled=args.amp):
                    row[path] = measure(runs[path], device, args.repeats, args.batch)
            ref = outputs["evaluate"].float()
            scale = float(ref.abs().max())
            row["max_rel_diff"] = {path: float((outputs[path][: ref.shape[0]].float() - ref).abs().max()) / scale
                                   for path in ("heads off", "backend", "mask-res")}
            rows.append(row)
    threads = torch.get_num_threads()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {threads} threads"
    precision = "fp16 autocast" if args.amp else "fp32"
    print(f"SEEM {args.model} v1 architecture ({params / 1e6:.1f} M parameters, random weights), input {H}x{W}, "
          f"scores at {h4}x{w4}, batch {args.batch}, {precision}, {device_name}, torch {torch.__version__}")
    print(f"{'vocabulary':<18}{'path':<11}{'s/image':>9}{'img/s':>8}{'peak MB added':>15}{'max |diff| / max':>18}")
    for row in rows:
        for path in PATHS:
            diff = f"{row['max_rel_diff'][path]:.1e}" if path in row["max_rel_diff"] else "-"
            m = row[path]
            print(f"{row['vocabulary'] + ' (' + str(row['entries']) + ')':<18}{path:<11}{m['seconds_per_image']:>9.3f}"
                  f"{m['images_per_s']:>8.2f}{m['peak_mb_added']:>15.0f}{diff:>18}")
        if row["build_s"] is not None:
            print(f"{'':<18}(backend build incl. checkpoint load and vocabulary: {row['build_s']:.1f} s)")
    estimates = []
    for row in rows:
        if row["vocabulary"] in STAGE0:
            label, count = STAGE0[row["vocabulary"]]
            hours = count * row["backend"]["seconds_per_image"] / 3600
            store_gb = count * row["entries"] * h4 * w4 * 2 / 1e9  # fp16 scores, before compression
            estimates.append({"data": label, "images": count, "hours": hours, "store_gb_uncompressed": store_gb})
            print(f"stage 0 of {label} ({count:,} images at this size): {hours:.2f} h of model time on this device "
                  f"(backend path, image decoding and writes overlap it), store {store_gb:.0f} GB before compression")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": device_name, "torch": torch.__version__, "model": args.model,
                                    "precision": precision, "batch": args.batch, "input": [H, W],
                                    "parameters": params, "rows": rows, "stage0": estimates}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
