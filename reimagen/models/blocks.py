"""The U-Net's building blocks (Sec. 3.2, Fig. 3): the conditioning containers, FiLM residual blocks, text
attention (Imagen's self + cross attention, with the optional text layout map) and the neighbour attention
Attn(query = f(x_t, c_p, t), keys/values = f(c_n, 0)) between the DStack and the UStack."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------
# Conditioning containers
# ----------------------------------------------------------------------------------------------
@dataclass
class TextCond:
    """Text tokens projected into the U-Net (computed once per prompt, reused at every step)."""

    tokens: Tensor  # (B, n, text_width)
    mask: Tensor  # (B, n) bool, True where a real token is
    pooled: Tensor  # (B, cond_dim), masked mean of the tokens, projected

    def index(self, idx: Tensor) -> "TextCond":
        return TextCond(self.tokens[idx], self.mask[idx], self.pooled[idx])


@dataclass
class NeighbourMemory:
    """The neighbour cache: keys and values of f(c_n, 0) for the neighbour attention.

    They depend on neither x_t nor t, so a sampler computes them once per sample and reuses them at every
    step and in every guidance branch (Sec. 3.2; issue "neighbour cache").
    """

    k: Tensor  # (B, heads, K*F*F, head_dim)
    v: Tensor  # (B, heads, K*F*F, head_dim)
    valid: Tensor | None = None  # (B, K*F*F) bool: False for the tokens of missing neighbours

    @property
    def num_tokens(self) -> int:
        return self.k.shape[2]

    def index(self, idx: Tensor) -> "NeighbourMemory":
        return NeighbourMemory(self.k[idx], self.v[idx], None if self.valid is None else self.valid[idx])


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of continuous t in [0, 1] (scaled by 1000 as for DDPM's integer steps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def group_count(channels: int, groups: int) -> int:
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return g


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------
class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv residual block with FiLM (scale, shift) from the conditioning embedding."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(group_count(c_in, groups), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.film = nn.Linear(cond_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(group_count(c_out, groups), c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return h + self.skip(x)


def text_attention_for(cfg, channels: int, res: int) -> "TextAttention":
    """The text attention of a ``channels``-wide level at side ``res``, with the config's layout options."""
    return TextAttention(channels, cfg.text_width, cfg.head_dim, cfg.norm_groups,
                         res if cfg.attn_position_embedding else None,
                         (cfg.text_layout, res, cfg.text_layout_rank) if cfg.text_layout else None)


class TextAttention(nn.Module):
    """Self-attention over image tokens with the text tokens' keys/values concatenated (Imagen)."""

    def __init__(self, channels: int, text_width: int, head_dim: int, groups: int, size: int | None = None,
                 layout: tuple[int, int, int] | None = None):
        super().__init__()
        self.heads = max(1, channels // head_dim)
        # ``size``: a learned position embedding of the size x size image tokens (UNetConfig.attn_position_embedding)
        self.pos = nn.Parameter(torch.randn(1, size * size, channels) * 0.02) if size else None
        # ``layout`` (pooling queries, side, rank): UNetConfig.text_layout, text_layout_rank
        self.layout = self.layout_down = None
        if layout is not None:
            queries, side, rank = layout
            self.layout_queries = nn.Parameter(torch.randn(queries, text_width) / text_width ** 0.5)
            if rank:
                self.layout_down = nn.Linear(queries * text_width, rank, bias=False)
            self.layout = nn.Linear(rank or queries * text_width, channels * side ** 2)
            nn.init.zeros_(self.layout.weight)
            nn.init.zeros_(self.layout.bias)
        self.norm = nn.GroupNorm(group_count(channels, groups), channels)
        self.to_qkv = nn.Linear(channels, 3 * channels, bias=False)
        self.text_to_kv = nn.Linear(text_width, 2 * channels, bias=False)
        self.to_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)
        self.ff = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, 4 * channels), nn.GELU(),
                                nn.Linear(4 * channels, channels))
        nn.init.zeros_(self.ff[-1].weight)
        nn.init.zeros_(self.ff[-1].bias)

    def forward(self, x: Tensor, text: TextCond) -> Tensor:
        b, c, hh, ww = x.shape
        if self.layout is not None:
            x = x + self.layout_shift(text).view(b, c, hh, ww)
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        if self.pos is not None:
            tokens = tokens + self.pos
        q, k, v = self.to_qkv(tokens).chunk(3, dim=-1)
        tk, tv = self.text_to_kv(text.tokens).chunk(2, dim=-1)
        k, v = torch.cat([k, tk], 1), torch.cat([v, tv], 1)
        mask = torch.cat([text.mask.new_ones(b, hh * ww), text.mask], 1)[:, None, None, :]
        split = lambda t: t.reshape(b, t.shape[1], self.heads, c // self.heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
        out = self.to_out(out.transpose(1, 2).reshape(b, hh * ww, c))
        h = x.flatten(2).transpose(1, 2) + out
        h = h + self.ff(h)
        return h.transpose(1, 2).reshape(b, c, hh, ww)

    def layout_pooled(self, text: TextCond) -> Tensor:
        """UNetConfig.text_layout: the text tokens pooled by the learned queries, (B, queries x text_width)."""
        q = self.layout_queries.to(text.tokens.dtype)
        scores = torch.einsum("bld,qd->bql", text.tokens, q) / text.tokens.shape[-1] ** 0.5
        scores = scores.masked_fill(~text.mask[:, None, :], float("-inf"))
        return torch.einsum("bql,bld->bqd", scores.softmax(-1), text.tokens).flatten(1)

    def layout_shift(self, text: TextCond) -> Tensor:
        """The pooled tokens mapped to a shift of every location and channel, (B, C x S x S)."""
        pooled = self.layout_pooled(text)
        return self.layout(pooled if self.layout_down is None else self.layout_down(pooled))


class NeighbourAttention(nn.Module):
    """Sec. 3.2: f' = Attn(query = f(x_t, c_p, t), keys/values = f(c_n, 0)), multi-head, residual.

    Learned null keys/values are always attendable; a row whose neighbours are dropped (training dropout,
    or the eps(x_t, c_p) guidance branch) masks out the neighbour tokens and attends to the nulls alone.
    A learned F x F position embedding is added to queries and keys so that locations can correspond.
    """

    def __init__(self, dim: int, heads: int, feature_size: int, null_tokens: int, groups: int,
                 film_dim: int | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"neighbour attention width {dim} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, dim // heads
        self.norm_q = nn.GroupNorm(group_count(dim, groups), dim)
        self.norm_kv = nn.GroupNorm(group_count(dim, groups), dim)
        self.pos = nn.Parameter(torch.randn(feature_size * feature_size, dim) * 0.02)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.null_kv = nn.Parameter(torch.randn(2, null_tokens, dim) * 0.02)
        self.to_out = nn.Linear(dim, dim)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)
        self.film = None
        if film_dim is not None:  # see ``attend``; zero-initialised, so a new stage starts as the paper's
            self.film = nn.Linear(dim, film_dim)
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)

    def _split(self, t: Tensor) -> Tensor:
        return t.reshape(t.shape[0], t.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def memory(self, feats: Tensor, num_neighbours: int, valid: Tensor | None = None) -> NeighbourMemory:
        """Keys/values of the neighbour feature maps f(c_n, 0), feats of shape (B*K, d, F, F);
        ``valid`` (B, K) marks which neighbours exist (a query may retrieve fewer than K)."""
        bk, d, fh, fw = feats.shape
        tokens = self.norm_kv(feats).flatten(2).transpose(1, 2) + self.pos  # (B*K, FF, d)
        tokens = tokens.reshape(bk // num_neighbours, num_neighbours * fh * fw, d)
        k, v = self.to_kv(tokens).chunk(2, dim=-1)
        valid_tokens = None if valid is None else valid.bool().repeat_interleave(fh * fw, dim=1)
        return NeighbourMemory(self._split(k), self._split(v), valid_tokens)

    def forward(self, h: Tensor, memory: NeighbourMemory | None, drop: Tensor) -> Tensor:
        return self.attend(h, memory, drop)[0]

    def attend(self, h: Tensor, memory: NeighbourMemory | None, drop: Tensor) -> tuple[Tensor, Tensor | None]:
        """f' = f + Attn(f, f(c_n, 0)) and, with ``film_dim``, the summary: the attended values averaged over
        the F x F queries, projected to the conditioning width, for the UStack's FiLM (``ReImagenUNet.forward``).

        Why the summary (not in the paper; a reading of the evidence, not an ablation): what a neighbour mostly
        tells a query that cannot yet see where the entity is (high noise) is global, its colours. Attention
        that does not know where to look returns nearly the same vector at every position, and a spatially
        constant shift is what GroupNorm removes (exactly so when a group holds one channel, as in a
        32-64-channel toy U-Net with 32 groups), so the UStack can hardly see it or send gradient back. Large
        U-Nets have many channels per group and are less exposed. The toy world's first base stage, trained without it, ignored its neighbours'
        content (``toyworld.diagnose``); the FiLM path, like the pooled text embedding's, cannot be
        normalised away."""
        b, d, fh, fw = h.shape
        q = self._split(self.to_q(self.norm_q(h).flatten(2).transpose(1, 2) + self.pos))
        nk, nv = (self._split(t.expand(b, -1, -1)) for t in self.null_kv)
        if memory is None:
            k, v, mask = nk, nv, None
        else:
            k, v = torch.cat([nk, memory.k], 2), torch.cat([nv, memory.v], 2)
            present = (~drop)[:, None].expand(b, memory.num_tokens)
            if memory.valid is not None:
                present = present & memory.valid
            keep = torch.cat([drop.new_ones(b, nk.shape[2]), present], 1)
            mask = keep[:, None, None, :]
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, fh * fw, d)
        out = self.to_out(att)
        summary = None if self.film is None else self.film(att.mean(1))
        return h + out.transpose(1, 2).reshape(b, d, fh, fw), summary


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
