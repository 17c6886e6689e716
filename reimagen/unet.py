"""The Re-Imagen U-Net, split into DStack and UStack with neighbour attention between them (Sec. 3.2, Fig. 3).

    DStack  f(x_t, c_p, t) -> feature map in R^{F x F x d} (plus the skip activations for the UStack)
    neighbours: the same DStack encodes each retrieved (image_j, text_j) with t = 0: f(c_n, 0) in R^{K x F x F x d}
    Attn    f'(x_t, c_p, c_n, t) = Attn(query = f(x_t, c_p, t), keys/values = f(c_n, 0))
    UStack  f' (and the skips) -> eps(x_t, c_p, c_n, t)

Conditioning follows Imagen: a time embedding plus a pooled-text embedding modulate every residual block
(FiLM scale/shift); at the resolutions in ``attn_resolutions`` the image tokens attend to themselves and to
the text tokens in one attention (text keys/values concatenated, as in Imagen/GLIDE). Super-resolution
stages (Imagen's cascade) take the noise-augmented, upsampled low-resolution image as extra input channels
and embed its augmentation level next to t.

Dropped conditions use learned null embeddings: a null text token for c_p and learned null keys/values in
the neighbour attention for c_n, so one network gives eps(x,c_p,c_n), eps(x,c_n), eps(x,c_p) and eps(x).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import UNetConfig
from .diffusion import get_schedule, q_sample

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


def _groups(channels: int, groups: int) -> int:
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
        self.norm1 = nn.GroupNorm(_groups(c_in, groups), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.film = nn.Linear(cond_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out, groups), c_out)
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


def _text_attention(cfg, channels: int, res: int) -> "TextAttention":
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
        self.norm = nn.GroupNorm(_groups(channels, groups), channels)
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
        self.norm_q = nn.GroupNorm(_groups(dim, groups), dim)
        self.norm_kv = nn.GroupNorm(_groups(dim, groups), dim)
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


# ----------------------------------------------------------------------------------------------
# DStack and UStack
# ----------------------------------------------------------------------------------------------
class DStack(nn.Module):
    """The downsampling encoder: (x_t, c_p, t) -> (feature map f in R^{F x F x d}, skips, cond embedding).

    It owns the conditioning embeddings (time, pooled text, noise-augmentation level), so that encoding a
    neighbour with t = 0 through the same module is one call.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch, g = cfg.base_channels, cfg.norm_groups
        self.time_mlp = nn.Sequential(nn.Linear(ch, cfg.cond_dim), nn.SiLU(), nn.Linear(cfg.cond_dim, cfg.cond_dim))
        self.aug_mlp = (nn.Sequential(nn.Linear(ch, cfg.cond_dim), nn.SiLU(), nn.Linear(cfg.cond_dim, cfg.cond_dim))
                        if cfg.is_super_resolution else None)
        in_ch = cfg.in_channels * (2 if cfg.is_super_resolution else 1)
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.blocks = nn.ModuleList()
        self.skip_channels = [ch]
        res, c = cfg.image_size, ch
        for level, (mult, nrb) in enumerate(zip(cfg.channel_mults, cfg.num_res_blocks)):
            for _ in range(nrb):
                c_out = cfg.base_channels * mult
                self.blocks.append(ResBlock(c, c_out, cfg.cond_dim, g, cfg.dropout))
                c = c_out
                if res in cfg.attn_resolutions:
                    self.blocks.append(_text_attention(cfg, c, res))
                self.skip_channels.append(c)
            if level < len(cfg.channel_mults) - 1:
                self.blocks.append(Downsample(c))
                res //= 2
                self.skip_channels.append(c)
        self.mid1 = ResBlock(c, c, cfg.cond_dim, g, cfg.dropout)
        self.mid_attn = _text_attention(cfg, c, res)
        self.mid2 = ResBlock(c, c, cfg.cond_dim, g, cfg.dropout)

    def embed(self, t: Tensor, text: TextCond, aug_t: Tensor | None) -> Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.cfg.base_channels)) + text.pooled
        if self.aug_mlp is not None:
            if aug_t is None:
                raise ValueError("a super-resolution stage needs the noise-augmentation level of its low-res input")
            emb = emb + self.aug_mlp(timestep_embedding(aug_t, self.cfg.base_channels))
        return emb

    def forward(self, x: Tensor, t: Tensor, text: TextCond, aug_t: Tensor | None = None,
                keep_skips: bool = True) -> tuple[Tensor, list[Tensor], Tensor]:
        emb = self.embed(t, text, aug_t)
        h = self.conv_in(x)
        skips = [h] if keep_skips else []
        for block in self.blocks:
            if isinstance(block, ResBlock):
                h = block(h, emb)
            elif isinstance(block, TextAttention):
                h = block(h, text)
                if keep_skips:
                    skips[-1] = h  # the skip after a level's block is its attention output
                continue
            else:
                h = block(h)
            if keep_skips:
                skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb), text), emb)
        return h, skips, emb


class UStack(nn.Module):
    """The upsampling decoder: (f', skips, cond) -> the network output (eps by default)."""

    def __init__(self, cfg: UNetConfig, skip_channels: list[int]):
        super().__init__()
        g = cfg.norm_groups
        unused = list(range(len(skip_channels)))  # DStack activations not yet given to an up block
        self.skip_index: list[int] = []  # the skip each ResBlock concatenates, in block order
        self.blocks = nn.ModuleList()
        c = cfg.base_channels * cfg.channel_mults[-1]
        res = cfg.feature_size
        for level in reversed(range(len(cfg.channel_mults))):
            c_out = cfg.base_channels * cfg.channel_mults[level]
            ups = cfg.ustack_res_blocks[level]
            for _ in range(ups):  # the level's deepest skips first (by default every one of its nrb + 1)
                self.skip_index.append(unused.pop())
                self.blocks.append(ResBlock(c + skip_channels[self.skip_index[-1]], c_out, cfg.cond_dim, g,
                                            cfg.dropout))
                c = c_out
                if res in cfg.attn_resolutions:
                    self.blocks.append(_text_attention(cfg, c, res))
            del unused[len(unused) - (cfg.num_res_blocks[level] + 1 - ups):]  # the level's shallower skips: unused
            if level > 0:
                self.blocks.append(Upsample(c))
                res *= 2
        self.norm_out = nn.GroupNorm(_groups(c, g), c)
        self.conv_out = nn.Conv2d(c, cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, h: Tensor, skips: list[Tensor | None], emb: Tensor, text: TextCond) -> Tensor:
        index = iter(self.skip_index)
        for block in self.blocks:
            if isinstance(block, ResBlock):
                h = block(torch.cat([h, skips[next(index)]], 1), emb)
            elif isinstance(block, TextAttention):
                h = block(h, text)
            else:
                h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------
# The stage network
# ----------------------------------------------------------------------------------------------
class ReImagenUNet(nn.Module):
    """One cascade stage: DStack -> neighbour attention -> UStack (Fig. 3)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.text_proj = nn.Linear(cfg.text_dim, cfg.text_width)
        self.pool_proj = nn.Linear(cfg.text_width, cfg.cond_dim)
        self.null_text = nn.Parameter(torch.randn(cfg.text_width) * 0.02)  # learned null c_p
        self.dstack = DStack(cfg)
        self.neighbour_attn = (NeighbourAttention(cfg.feature_dim, cfg.neighbour_heads, cfg.feature_size,
                                                  cfg.neighbour_null_tokens, cfg.norm_groups,
                                                  cfg.cond_dim if cfg.neighbour_film else None)
                               if cfg.neighbour_attention else None)
        self.ustack = UStack(cfg, self.dstack.skip_channels)
        self._log_snr = get_schedule(cfg.schedule)

    # -- conditioning -----------------------------------------------------------------------
    def project_text(self, emb: Tensor, mask: Tensor) -> TextCond:
        """Project text-encoder tokens (B, n, text_dim) into the U-Net; compute once per prompt."""
        if emb.dim() != 3 or emb.shape[-1] != self.cfg.text_dim:
            raise ValueError(f"text embeddings must be (B, n, {self.cfg.text_dim}), got {tuple(emb.shape)}; "
                             "is the text encoder the one this stage was trained with?")
        if mask.shape != emb.shape[:2]:
            raise ValueError(f"text mask {tuple(mask.shape)} does not match embeddings {tuple(emb.shape[:2])}")
        mask = mask.bool()
        tokens = self.text_proj(emb)
        m = mask[..., None].to(tokens.dtype)
        pooled = (tokens * m).sum(1) / m.sum(1).clamp(min=1.0)
        return TextCond(tokens, mask, self.pool_proj(pooled))

    def drop_text(self, text: TextCond, drop: Tensor) -> TextCond:
        """Replace the text of rows where ``drop`` by the learned null token (classifier-free dropout)."""
        if not bool(drop.any()):
            return text
        d = drop[:, None, None]
        tokens = torch.where(d, self.null_text.to(text.tokens.dtype), text.tokens)
        first = torch.zeros_like(text.mask)
        first[:, 0] = True
        mask = torch.where(drop[:, None], first, text.mask)
        pooled = torch.where(drop[:, None], self.pool_proj(self.null_text)[None].to(text.pooled.dtype), text.pooled)
        return TextCond(tokens, mask, pooled)

    def lowres_input(self, lowres: Tensor, aug_t: Tensor, noise: Tensor | None) -> Tensor:
        """Imagen's noise-conditioning augmentation: upsample c_x to the stage size, then noise it to aug_t."""
        cfg = self.cfg
        if lowres.shape[-1] != cfg.lowres_size or lowres.shape[-2] != cfg.lowres_size:
            raise ValueError(f"low-resolution input must be {cfg.lowres_size}x{cfg.lowres_size}, "
                             f"got {tuple(lowres.shape[-2:])}")
        up = F.interpolate(lowres, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False,
                           antialias=False)
        if noise is None or not bool((aug_t > 0).any()):
            return up
        noisy = q_sample(up, self._log_snr(aug_t), noise)
        return torch.where((aug_t > 0).view(-1, 1, 1, 1), noisy, up)  # level 0 means no augmentation, per row

    def _check_images(self, x: Tensor, what: str) -> None:
        s = self.cfg.image_size
        if x.dim() != 4 or x.shape[1] != self.cfg.in_channels or x.shape[-1] != s or x.shape[-2] != s:
            raise ValueError(f"{what} must be (B, {self.cfg.in_channels}, {s}, {s}) for this stage, "
                             f"got {tuple(x.shape)}")

    # -- neighbours -------------------------------------------------------------------------
    def encode_neighbours(self, images: Tensor, text: TextCond, valid: Tensor | None = None) -> NeighbourMemory:
        """f(c_n, 0): the K neighbour (image, text) pairs through the shared DStack at t = 0.

        images: (B, K, C, S, S) at this stage's resolution; text: the neighbours' texts, B*K rows in the
        same order; valid: optional (B, K) bool, False for padding where a query retrieved fewer than K
        neighbours (a row with none attends to the learned null neighbour alone). For super-resolution
        stages a neighbour's low-resolution input is its own downsampled image, without augmentation noise.
        """
        if self.neighbour_attn is None:
            raise ValueError("this stage was built without neighbour attention (neighbour_attention=False)")
        if images.dim() != 5:
            raise ValueError(f"neighbour images must be (B, K, C, H, W), got {tuple(images.shape)}")
        b, k = images.shape[:2]
        if k == 0:
            raise ValueError("K = 0 neighbours given to a stage that attends to neighbours; pass at least one "
                             "neighbour, or sample without retrieval explicitly")
        flat = images.reshape(b * k, *images.shape[2:])
        self._check_images(flat, "neighbour images")
        if text.tokens.shape[0] != b * k:
            raise ValueError(f"got {text.tokens.shape[0]} neighbour texts for {b} x {k} neighbour images")
        zeros = flat.new_zeros(b * k)
        x = flat
        if self.cfg.is_super_resolution:
            low = F.interpolate(flat, size=(self.cfg.lowres_size,) * 2, mode="bilinear", antialias=True,
                                align_corners=False)
            x = torch.cat([flat, self.lowres_input(low, zeros, None)], 1)
        feats, _, _ = self.dstack(x, zeros, text, aug_t=zeros if self.cfg.is_super_resolution else None,
                                  keep_skips=False)
        if valid is not None and tuple(valid.shape) != (b, k):
            raise ValueError(f"neighbour validity mask must be ({b}, {k}), got {tuple(valid.shape)}")
        return self.neighbour_attn.memory(feats, k, valid)

    # -- the network ------------------------------------------------------------------------
    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        text: TextCond,
        neighbours: NeighbourMemory | None = None,
        drop_text: Tensor | None = None,
        drop_neighbours: Tensor | None = None,
        lowres: Tensor | None = None,
        aug_t: Tensor | None = None,
        source: Tensor | None = None,
    ) -> Tensor:
        """The network output (eps by default) for noisy images x_t at times t (shape (B,)).

        ``text`` is ``project_text(...)`` of the prompts; ``neighbours`` is ``encode_neighbours(...)``
        (the cache); ``drop_text`` / ``drop_neighbours`` are per-row booleans selecting the guidance branch.
        Super-resolution stages take ``lowres`` (B, C, s, s) already noise-augmented to level ``aug_t`` (use
        ``lowres_input``).

        ``source`` (B,) marks guidance-branch rows that are copies of one sample (same x_t, t, text, lowres):
        the DStack f(x_t, c_p, t) does not see the neighbours, so rows of one source that agree on
        ``drop_text`` share one DStack pass (e.g. eps(x_t, c_p, c_n) and eps(x_t, c_p) of Eq. 6); only the
        neighbour attention and the UStack run per row.
        """
        self._check_images(x_t, "x_t")
        b = x_t.shape[0]
        for name, v in (("t", t), ("text", text.tokens), ("drop_text", drop_text), ("drop_neighbours", drop_neighbours),
                        ("lowres", lowres), ("aug_t", aug_t)):
            if v is not None and v.shape[0] != b:
                raise ValueError(f"batch length mismatch: x_t has {b} rows, {name} has {v.shape[0]}")
        if neighbours is not None and neighbours.k.shape[0] != b:
            raise ValueError(f"batch length mismatch: x_t has {b} rows, neighbours have {neighbours.k.shape[0]}")
        if drop_text is not None:
            text = self.drop_text(text, drop_text)
        else:  # (no data-dependent branch: the forward also runs on fake tensors, reimagen.memory)
            drop_text = torch.zeros(b, dtype=torch.bool, device=x_t.device)
        if drop_neighbours is None:
            drop_neighbours = torch.zeros(b, dtype=torch.bool, device=x_t.device)
        if self.neighbour_attn is not None and neighbours is None and not bool(drop_neighbours.all()):
            raise ValueError("this stage attends to neighbours: pass neighbours=encode_neighbours(...) or set "
                             "drop_neighbours for every row (sampling without retrieval)")
        x = x_t
        if self.cfg.is_super_resolution:
            if lowres is None or aug_t is None:
                raise ValueError("a super-resolution stage needs lowres (the upsampled, augmented c_x) and aug_t")
            if lowres.shape != x_t.shape:
                raise ValueError(f"lowres must be upsampled to {tuple(x_t.shape)} (use lowres_input), "
                                 f"got {tuple(lowres.shape)}")
            x = torch.cat([x_t, lowres], 1)
        if source is None:
            h, skips, emb = self.dstack(x, t, text, aug_t=aug_t)
        else:
            key = source.long() * 2 + drop_text.long()
            uniq, inverse = torch.unique(key, return_inverse=True)
            first = torch.full_like(uniq, b).scatter_reduce(0, inverse, torch.arange(b, device=key.device), "amin")
            h, skips, emb = self.dstack(x[first], t[first], text.index(first),
                                        aug_t=None if aug_t is None else aug_t[first])
            used = set(self.ustack.skip_index)
            h, emb = h[inverse], emb[inverse]
            skips = [sk[inverse] if i in used else None for i, sk in enumerate(skips)]
        if self.neighbour_attn is not None:
            h, summary = self.neighbour_attn.attend(h, neighbours, drop_neighbours)
            if summary is not None:
                emb = emb + summary  # cfg.neighbour_film: the UStack's FiLM sees the neighbours too
        return self.ustack(h, skips, emb, text)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
