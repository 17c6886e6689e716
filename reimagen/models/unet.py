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

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..diffusion.gaussian import get_schedule, q_sample
from .blocks import (Downsample, NeighbourAttention, NeighbourMemory, ResBlock, TextAttention, TextCond, Upsample,
                     group_count, text_attention_for, timestep_embedding)
from .config import UNetConfig

Tensor = torch.Tensor


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
                    self.blocks.append(text_attention_for(cfg, c, res))
                self.skip_channels.append(c)
            if level < len(cfg.channel_mults) - 1:
                self.blocks.append(Downsample(c))
                res //= 2
                self.skip_channels.append(c)
        self.mid1 = ResBlock(c, c, cfg.cond_dim, g, cfg.dropout)
        self.mid_attn = text_attention_for(cfg, c, res)
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
                    self.blocks.append(text_attention_for(cfg, c, res))
            del unused[len(unused) - (cfg.num_res_blocks[level] + 1 - ups):]  # the level's shallower skips: unused
            if level > 0:
                self.blocks.append(Upsample(c))
                res *= 2
        self.norm_out = nn.GroupNorm(group_count(c, g), c)
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
        """Replace the text of rows where ``drop`` by the learned null token (classifier-free dropout). No branch on
        the values of ``drop`` (a graph break under torch.compile): rows that keep their text are selected
        unchanged, so the result is the same with no row dropped."""
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
    def _shared_dstack(self, x: Tensor, t: Tensor, text: TextCond, aug_t: Tensor | None, source: Tensor,
                       drop_text: Tensor) -> tuple[Tensor, list[Tensor | None], Tensor]:
        """One DStack pass per (source, drop_text) group of rows, spread back to every row of the group."""
        b = x.shape[0]
        key = source.long() * 2 + drop_text.long()
        uniq, inverse = torch.unique(key, return_inverse=True)
        first = torch.full_like(uniq, b).scatter_reduce(0, inverse, torch.arange(b, device=key.device), "amin")
        h, skips, emb = self.dstack(x[first], t[first], text.index(first), aug_t=None if aug_t is None else aug_t[first])
        used = set(self.ustack.skip_index)
        skips = [sk[inverse] if i in used else None for i, sk in enumerate(skips)]
        return h[inverse], skips, emb[inverse]

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
        _check_rows(b, t=t, text=text.tokens, drop_text=drop_text, drop_neighbours=drop_neighbours, lowres=lowres,
                    aug_t=aug_t, neighbours=None if neighbours is None else neighbours.k)
        if drop_text is not None:
            text = self.drop_text(text, drop_text)
        else:  # (no data-dependent branch: the forward also runs on fake tensors, reimagen.models.memory)
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
            h, skips, emb = self._shared_dstack(x, t, text, aug_t, source, drop_text)
        if self.neighbour_attn is not None:
            h, summary = self.neighbour_attn.attend(h, neighbours, drop_neighbours)
            if summary is not None:
                emb = emb + summary  # cfg.neighbour_film: the UStack's FiLM sees the neighbours too
        return self.ustack(h, skips, emb, text)


def _check_rows(b: int, **tensors: Tensor | None) -> None:
    for name, v in tensors.items():
        if v is not None and v.shape[0] != b:
            raise ValueError(f"batch length mismatch: x_t has {b} rows, {name} has {v.shape[0]}")


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
