"""The heads beyond the linear probe, as plain torch modules (no stores, no training).

    head = AttentionHead(channels=1024, pool=16, n_classes=1000, dim=1024, depth=2, num_heads=8)
    logits = head(x)                                  # x: (N, 1024, 16, 16) -> (N, 1000)
    fusion = FusionHead([(1024, 8), (1024, 16), (512, 16)], n_timesteps=3, n_classes=1000, dim=1024)
    logits = fusion([[x19_t90, x24_t90, x30_t90], [x19_t150, ...], [...]])

- `TokenEmbed` (one per block): LayerNorm over the whole C x P x P map (one normalisation per
  image, with a learned affine per value), then a 1x1 convolution to D: P*P tokens of width D.
- `Transformer`: a learnable CLS token prepended to the tokens, L pre-norm blocks
  (x + MHA(LN(x)), x + MLP(LN(x)), GELU MLP of width mlp_ratio * D), a final LayerNorm;
  returns the CLS output. No positional embedding (the paper has none).
- `AttentionHead`: one block's tokens -> Transformer -> linear classifier.
- `FusionHead` (DifFormer): for each timestep, the tokens of all blocks (each block its own
  `TokenEmbed`, shared across timesteps) through one Transformer shared across timesteps; the CLS
  outputs of all timesteps concatenated into the linear classifier.
- `FeedbackLayer` (DifFeed): Conv1x1 -> BatchNorm -> ReLU from a decoder block's channels to its
  skip-connected encoder block's channels (the pairing is derived in probe/feedback.py).

`auto_dim` is how the token width scales with the model when ``heads.dim`` is 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def auto_dim(channels, num_heads: int) -> int:
    """Default D: the largest input channel count, rounded up to a multiple of ``num_heads``.

    ADM-256 at blocks 19/24/30 (1024/1024/512 channels) gives the paper's 1024; the tiny
    model's block 24 (128 channels) gives 128, so the head is as wide as the features it reads
    and its size follows the model's instead of dwarfing a small one.
    """
    c = max(channels)
    return -(-c // num_heads) * num_heads


class TokenEmbed(nn.Module):
    """(N, C, P, P) map -> (N, P*P, D) tokens: LayerNorm over C x P x P, then a 1x1 projection."""

    def __init__(self, channels: int, pool: int, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm((channels, pool, pool))
        self.proj = nn.Conv2d(channels, dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x)).flatten(2).transpose(1, 2)


class Block(nn.Module):
    """Pre-norm transformer block: x + MHA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"token width {dim} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        hidden = int(round(dim * mlp_ratio))
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(n, s, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, s, d)
        x = x + self.proj(a)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """CLS token + L pre-norm blocks + final LayerNorm: (N, S, D) tokens -> (N, D) CLS output."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.cls, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.cls.expand(len(tokens), -1, -1), tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 0])


class AttentionHead(nn.Module):
    """Attention pooling of one block's P x P map: (N, C, P, P) -> (N, n_classes) logits."""

    def __init__(
        self,
        channels: int,
        pool: int,
        n_classes: int,
        dim: int = 0,
        depth: int = 2,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        dim = dim or auto_dim([channels], num_heads)
        self.embed = TokenEmbed(channels, pool, dim)
        self.transformer = Transformer(dim, depth, num_heads, mlp_ratio)
        self.classifier = nn.Linear(dim, n_classes)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(N, P*P, D) tokens (without the CLS token)."""
        return self.embed(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.transformer(self.embed(x)))


class FusionHead(nn.Module):
    """DifFormer: blocks x timesteps of maps -> (N, n_classes) logits.

    ``inputs``: (channels, pool) of each block, in the order the maps are passed. forward takes
    ``xs[i][j]``, the map of timestep i and block j, (N, C_j, P_j, P_j).
    """

    def __init__(
        self,
        inputs: list[tuple[int, int]],
        n_timesteps: int,
        n_classes: int,
        dim: int = 0,
        depth: int = 2,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        dim = dim or auto_dim([c for c, _ in inputs], num_heads)
        self.n_timesteps = n_timesteps
        self.embeds = nn.ModuleList(TokenEmbed(c, p, dim) for c, p in inputs)  # shared across t
        self.transformer = Transformer(dim, depth, num_heads, mlp_ratio)  # shared across t
        self.classifier = nn.Linear(n_timesteps * dim, n_classes)

    def tokens(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """The tokens of one timestep: every block's, concatenated, (N, sum P_j^2, D)."""
        return torch.cat([e(x) for e, x in zip(self.embeds, maps, strict=True)], dim=1)

    def forward(self, xs: list[list[torch.Tensor]]) -> torch.Tensor:
        if len(xs) != self.n_timesteps:
            raise ValueError(f"expected maps at {self.n_timesteps} timesteps, got {len(xs)}")
        return self.classifier(torch.cat([self.transformer(self.tokens(maps)) for maps in xs], dim=1))


class FeedbackLayer(nn.Sequential):
    """DifFeed's feedback: (N, C_decoder, H, W) -> (N, C_encoder, H, W), Conv1x1 -> BatchNorm -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel_size=1), nn.BatchNorm2d(out_channels), nn.ReLU())
