"""Mix Transformer (MiT-B0..B5), SegFormer's encoder, with the official parameter names so the
released ImageNet weights (`mit_b*.pth`) load as they are."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# (embed dims, depths) per variant; heads 1/2/5/8, spatial reduction 8/4/2/1 and MLP ratio 4 for all.
VARIANTS = {
    "mit-b0": ((32, 64, 160, 256), (2, 2, 2, 2)),
    "mit-b1": ((64, 128, 320, 512), (2, 2, 2, 2)),
    "mit-b2": ((64, 128, 320, 512), (3, 4, 6, 3)),
    "mit-b3": ((64, 128, 320, 512), (3, 4, 18, 3)),
    "mit-b4": ((64, 128, 320, 512), (3, 8, 27, 3)),
    "mit-b5": ((64, 128, 320, 512), (3, 6, 40, 3)),
    "mit-tiny": ((16, 32, 80, 128), (1, 1, 1, 1)),
}
HEADS, SR_RATIOS = (1, 2, 5, 8), (8, 4, 2, 1)


class OverlapPatchEmbed(nn.Module):
    def __init__(self, cin: int, dim: int, patch: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(cin, dim, patch, stride, patch // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor):
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class Attention(nn.Module):
    """Efficient self-attention: keys and values come from a map shrunk by ``sr`` in each direction."""

    def __init__(self, dim: int, heads: int, sr: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr
        if sr > 1:
            self.sr = nn.Conv2d(dim, dim, sr, sr)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
        if self.sr_ratio > 1:
            x = self.norm(self.sr(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2))
        k, v = self.kv(x).reshape(b, -1, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class DWConv(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        return self.dwconv(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.fc2(F.gelu(self.dwconv(self.fc1(x), h, w)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, sr: int, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, sr)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, dim * 4)
        self.drop_path = drop_path

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        """Stochastic depth: drop the whole residual branch of some samples while training."""
        if not self.training or self.drop_path == 0:
            return x
        keep = 1 - self.drop_path
        mask = x.new_empty(x.shape[0], 1, 1).bernoulli_(keep)
        return x * mask / keep

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self._drop(self.attn(self.norm1(x), h, w))
        return x + self._drop(self.mlp(self.norm2(x), h, w))


class MixTransformer(nn.Module):
    """Returns the four stages' feature maps (1/4, 1/8, 1/16, 1/32)."""

    def __init__(self, name: str = "mit-b5", drop_path: float = 0.1):
        super().__init__()
        if name not in VARIANTS:
            raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(VARIANTS)}")
        dims, depths = VARIANTS[name]
        self.dims = dims
        rates = torch.linspace(0, drop_path, sum(depths)).tolist()
        start = 0
        for i, (dim, depth) in enumerate(zip(dims, depths), 1):
            cin = 3 if i == 1 else dims[i - 2]
            setattr(self, f"patch_embed{i}", OverlapPatchEmbed(cin, dim, 7 if i == 1 else 3, 4 if i == 1 else 2))
            setattr(self, f"block{i}", nn.ModuleList(Block(dim, HEADS[i - 1], SR_RATIOS[i - 1], rates[start + j])
                                                     for j in range(depth)))
            setattr(self, f"norm{i}", nn.LayerNorm(dim, eps=1e-6))
            start += depth
        self.apply(_init)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i in range(1, 5):
            x, h, w = getattr(self, f"patch_embed{i}")(x)
            for block in getattr(self, f"block{i}"):
                x = block(x, h, w)
            x = getattr(self, f"norm{i}")(x)
            x = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)
            outs.append(x)
        return outs


def _init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
