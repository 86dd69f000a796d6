"""A fake SEEM that mirrors the real interface and output semantics, for testing the adapter offline.

Real SEEM cannot be installed here (git-only, CUDA build). This fake has the same entry points
(`modeling.BaseModel.BaseModel`, `modeling.build_model`, `utils.arguments.load_opt_from_config_files`,
`utils.distributed.init_distributed`), the same vocabulary call, and the same output: for each image,
``sem_seg`` (K, height, width) = sum_q softmax(class_logits_q)[:K] * sigmoid(mask_logits_q), where the
softmax runs over K+1 entries and the LAST (no-object) one is dropped.
"""

FILES = {
    "modeling/__init__.py": '''
import torch

class _Lang:
    def __init__(self, owner):
        self.owner = owner
    def get_text_embeddings(self, names, is_eval=False):
        assert is_eval
        self.owner.vocabulary = list(names)
        g = torch.Generator().manual_seed(len(names))
        self.owner.text = torch.randn(len(names), 8, generator=g)

class _Head:
    def __init__(self, owner):
        self.predictor = type("P", (), {})()
        self.predictor.lang_encoder = _Lang(owner)
        self.num_classes = 133  # COCO panoptic default, like the real model

class Core(torch.nn.Module):
    QUERIES = 5
    def __init__(self, opt):
        super().__init__()
        test = opt["MODEL"]["DECODER"]["TEST"]
        self.built_with = dict(test)
        self.sem_seg_head = _Head(self)
        self.proj = torch.nn.Conv2d(3, 8, 4, stride=4)
        self.calls = []
    def evaluate(self, batched_inputs):
        self.calls.append(len(batched_inputs))
        assert not self.built_with["PANOPTIC_ON"] and not self.built_with["INSTANCE_ON"]
        images = torch.stack([b["image"] for b in batched_inputs]).float()
        assert images.max() > 1.5, "SEEM takes 0..255 pixels"
        feats = self.proj(images / 255.0)                                   # (B, 8, H/4, W/4)
        queries = feats.mean((2, 3))[:, None, :] + torch.arange(self.QUERIES)[None, :, None] * 0.1
        cls = torch.einsum("bqd,kd->bqk", queries, self.text)               # (B, Q, K+1)
        masks = torch.einsum("bqd,bdhw->bqhw", queries, feats)              # (B, Q, H/4, W/4)
        out = []
        for b, inp in enumerate(batched_inputs):
            m = torch.nn.functional.interpolate(masks[b:b + 1], size=(inp["height"], inp["width"]),
                                                mode="bilinear", align_corners=False)[0]
            probs = cls[b].softmax(-1)[:, :-1]                              # drop the no-object entry
            out.append({"sem_seg": torch.einsum("qk,qhw->khw", probs, m.sigmoid())})
        return out

def build_model(opt):
    return Core(opt)
''',
    "modeling/BaseModel.py": '''
import torch

class BaseModel(torch.nn.Module):
    def __init__(self, opt, module):
        super().__init__()
        self.opt, self.model = opt, module
    def from_pretrained(self, path):
        self.loaded = path
        return self
''',
    "utils/__init__.py": "",
    "utils/arguments.py": '''
def load_opt_from_config_files(paths):
    assert all(str(p).endswith(".yaml") for p in paths)
    return {"MODEL": {"DECODER": {"TEST": {"SEMANTIC_ON": True, "PANOPTIC_ON": True, "INSTANCE_ON": True}}}}
''',
    "utils/distributed.py": '''
def init_distributed(opt):
    opt["world_size"] = 1
    return opt
''',
}


def install(root, package: bool) -> None:
    """Write the fake under ``root``: as ``seem.*`` (package branch) or top-level (v1.0 layout)."""
    base = root / "seem" if package else root
    if package:
        base.mkdir(parents=True)
        (base / "__init__.py").write_text("")
    for name, text in FILES.items():
        path = base / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (base / "configs" / "seem").mkdir(parents=True)
    (base / "configs" / "seem" / "focalt_unicl_lang_v1.yaml").write_text("MODEL: {}\n")
