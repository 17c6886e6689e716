"""Stage configuration and presets (Sec. 4: 2.5B 64x64, 1.4B small 64x64, 750M 256 SR, 400M 1024 SR).

Every constructor argument of the U-Net lives in ``UNetConfig``; checkpoints store it as JSON next to
the safetensors weights, and loading refuses weights saved under another configuration.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class UNetConfig:
    image_size: int = 64                     # side of the images this stage produces
    in_channels: int = 3                     # image channels
    base_channels: int = 128                 # width of the first level
    channel_mults: tuple[int, ...] = (1, 2, 4)  # width multiplier per level; level i has side image_size / 2^i
    num_res_blocks: tuple[int, ...] = (2, 2, 2)  # residual blocks per level of the DStack
    # Residual blocks per level of the UStack. None: num_res_blocks + 1 per level (guided-diffusion style, one
    # skip per DStack activation). Fewer shifts compute into the DStack (Imagen's Efficient U-Net, Saharia
    # et al. 2022, App. B.1); a level's up blocks take its deepest skips, 1 <= up_res_blocks <= num_res_blocks + 1.
    up_res_blocks: tuple[int, ...] | None = None
    attn_resolutions: tuple[int, ...] = (16, 8)  # sides at which self-attention + text cross-attention run
    head_dim: int = 64                       # width of one attention head
    text_dim: int = 384                      # width of the text encoder's token embeddings (d in c_p in R^{n x d})
    cond_dim: int = 512                      # width of the time / pooled-text / noise-aug embedding
    text_width: int = 512                    # width text tokens are projected to inside the U-Net
    dropout: float = 0.0                     # dropout inside residual blocks
    neighbour_attention: bool = True         # Re-Imagen's neighbour path (False: a plain Imagen stage)
    neighbour_heads: int = 8                 # heads of the DStack-output neighbour attention (Sec. 3.2)
    neighbour_null_tokens: int = 4           # learned keys/values that stand in for dropped neighbours
    neighbour_film: bool = False             # also FiLM the UStack with the pooled neighbour attention (not in
                                             # the paper; see NeighbourAttention.summary)
    lowres_size: int | None = None           # set for super-resolution stages: side of the conditioning image
    prediction: str = "eps"                  # eps | x0 | v: what the network outputs
    schedule: str = "cosine"                 # cosine | linear noise schedule (log-SNR form), NAME:SHIFT shifts it
    norm_groups: int = 32                    # GroupNorm groups (capped by the channel count)
    # A learned position embedding added to the image tokens of every text attention (queries and keys), so that
    # a location can answer a word such as "left" (toyworld/README.md: without it the toy base stages never read
    # the position word). Not in Imagen's U-Net, which learns layout from padding cues at scale.
    attn_position_embedding: bool = False
    # At every text attention, a shift of the S x S feature map predicted linearly (zero-initialised) from the
    # text tokens pooled by this many learned attention queries (0: off): a direct route from a layout word to the
    # locations it names. Attention pooling, because the mean of the tokens hardly carries one word.
    text_layout: int = 0
    text_layout_rank: int = 0  # > 0: the map goes through this many dimensions (~4096 x fewer weights per rank)

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mults", tuple(self.channel_mults))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
        for name in ("num_res_blocks", "up_res_blocks"):  # an int means the same count at every level
            v = getattr(self, name)
            if v is None:
                continue
            v = (v,) * len(self.channel_mults) if isinstance(v, int) else tuple(v)
            object.__setattr__(self, name, v)
            if len(v) != len(self.channel_mults):
                raise ValueError(f"{name} needs one entry per level of channel_mults")
        if self.up_res_blocks is not None and any(
                not 1 <= u <= n + 1 for u, n in zip(self.up_res_blocks, self.num_res_blocks)):
            raise ValueError(f"up_res_blocks {self.up_res_blocks} must be between 1 and num_res_blocks + 1 "
                             f"{tuple(n + 1 for n in self.num_res_blocks)} per level")
        if self.image_size % (2 ** (len(self.channel_mults) - 1)):
            raise ValueError(f"image_size {self.image_size} is not divisible by 2^(levels-1)")
        if self.lowres_size is not None and self.lowres_size >= self.image_size:
            raise ValueError("lowres_size must be smaller than image_size for a super-resolution stage")
        from ..diffusion.gaussian import get_schedule

        get_schedule(self.schedule)  # a clear error for an unknown schedule now, not at the first step
        if self.prediction not in ("eps", "x0", "v"):
            raise ValueError(f"prediction must be eps, x0 or v, got {self.prediction!r}")

    @property
    def is_super_resolution(self) -> bool:
        return self.lowres_size is not None

    @property
    def ustack_res_blocks(self) -> tuple[int, ...]:
        """Residual blocks per level of the UStack (``up_res_blocks``, or ``num_res_blocks + 1``)."""
        if self.up_res_blocks is not None:
            return self.up_res_blocks
        return tuple(n + 1 for n in self.num_res_blocks)

    @property
    def feature_size(self) -> int:
        """F, the side of the DStack's output feature map f(x_t, c_p, t) in R^{F x F x d}."""
        return self.image_size // 2 ** (len(self.channel_mults) - 1)

    @property
    def feature_dim(self) -> int:
        """d, the channel width of the DStack's output feature map."""
        return self.base_channels * self.channel_mults[-1]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["up_res_blocks"] is None:  # the default is left out: configs, checkpoints and run manifests of
            del d["up_res_blocks"]      # U-Nets without the option serialise exactly as before it existed
        if not d["attn_position_embedding"]:  # (likewise)
            del d["attn_position_embedding"]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UNetConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown UNetConfig fields {sorted(unknown)}")
        return cls(**d)


# ----------------------------------------------------------------------------------------------
# Presets. Paper sizes are matched in parameter count (tests check within 15%), not in every detail:
# the paper does not publish the architectures; widths follow Imagen's 64x64 and Efficient-U-Net
# recipes (Saharia et al. 2022, Appendix F) with T5-XXL text (d = 4096).
# ----------------------------------------------------------------------------------------------
T5_XXL_DIM = 4096


@dataclass(frozen=True)
class Preset:
    config: UNetConfig
    paper_params: int | None = None  # parameter count reported in the paper, where there is one
    note: str = ""


_TOY_32 = UNetConfig(image_size=32, base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=(1, 2, 2),
                     attn_resolutions=(8,), head_dim=32, text_dim=384, cond_dim=192, text_width=192,
                     neighbour_heads=4, prediction="v", norm_groups=8, neighbour_film=True)

PRESETS: dict[str, Preset] = {
    # The paper's stages.
    "paper-64": Preset(
        UNetConfig(image_size=64, base_channels=512, channel_mults=(1, 2, 3, 4), num_res_blocks=(3, 3, 3, 3),
                   attn_resolutions=(32, 16, 8), text_dim=T5_XXL_DIM, cond_dim=2048, text_width=2048,
                   neighbour_heads=16),
        paper_params=2_500_000_000, note="Re-Imagen 64x64 text-to-image, 2.5B"),
    "paper-64-small": Preset(
        UNetConfig(image_size=64, base_channels=384, channel_mults=(1, 2, 3, 4), num_res_blocks=(3, 3, 3, 3),
                   attn_resolutions=(32, 16, 8), text_dim=T5_XXL_DIM, cond_dim=1536, text_width=1536,
                   neighbour_heads=16),
        paper_params=1_400_000_000, note="Re-Imagen-small 64x64 text-to-image, 1.4B"),
    "paper-sr256": Preset(
        UNetConfig(image_size=256, lowres_size=64, base_channels=128, channel_mults=(1, 2, 4, 8),
                   num_res_blocks=(2, 4, 6, 6), attn_resolutions=(32,), text_dim=T5_XXL_DIM,
                   cond_dim=1024, text_width=1024, neighbour_heads=16),
        paper_params=750_000_000, note="64 -> 256 super-resolution, 750M"),
    "paper-sr1024": Preset(
        UNetConfig(image_size=1024, lowres_size=256, base_channels=128, channel_mults=(1, 2, 4, 4, 8),
                   num_res_blocks=(2, 2, 4, 4, 3), attn_resolutions=(), text_dim=T5_XXL_DIM,
                   cond_dim=1024, text_width=1024, neighbour_heads=16),
        paper_params=400_000_000, note="256 -> 1024 super-resolution, 400M (no self-attention, as in Imagen)"),
    # Small presets that train and sample on a CPU (demo, toy world, benchmarks).
    "small-32": Preset(
        UNetConfig(image_size=32, base_channels=64, channel_mults=(1, 2, 2), num_res_blocks=(2, 2, 2),
                   attn_resolutions=(8,), head_dim=32, text_dim=384, cond_dim=256, text_width=256,
                   neighbour_heads=4), note="CPU-sized 32x32 base stage"),
    # small-32's widths and (almost) its parameter count, Efficient-U-Net style (Saharia et al. 2022, App. B.1):
    # residual blocks moved from the UStack to the DStack's lower resolutions, one up block per level. The
    # DStack is 55% of a forward instead of 28%, so the neighbour cache saves more (benchmarks/README.md).
    "small-32-eff": Preset(
        UNetConfig(image_size=32, base_channels=64, channel_mults=(1, 2, 2), num_res_blocks=(2, 3, 6),
                   up_res_blocks=(1, 1, 1), attn_resolutions=(8,), head_dim=32, text_dim=384, cond_dim=256,
                   text_width=256, neighbour_heads=4), note="CPU-sized 32x32 base stage, Efficient-U-Net style"),
    "small-sr64": Preset(
        UNetConfig(image_size=64, lowres_size=32, base_channels=32, channel_mults=(1, 2, 4), num_res_blocks=(1, 2, 2),
                   attn_resolutions=(), head_dim=32, text_dim=384, cond_dim=256, text_width=256,
                   neighbour_heads=4), note="CPU-sized 32 -> 64 super-resolution stage"),
    # The toy world's shipped cascade: sized to train in ~90 CPU minutes and ship in fp16 under 30 MB.
    "toy-32": Preset(_TOY_32, note="toy world 32x32 base stage (v-prediction, pooled neighbour FiLM)"),
    # toy-32 with text_layout: the shipped cascade's base stage (toyworld/README.md, "Reading left and right").
    "toy-32-layout": Preset(replace(_TOY_32, text_layout=4),
                            note="toy world base stage: toy-32 with a text layout map at its text attentions"),
    # World v3's base stage: toy-32 whose text attentions know where each token is (attn_position_embedding).
    "toy-32-v3": Preset(replace(_TOY_32, attn_position_embedding=True),
                        note="toy world v3 base stage: toy-32 with position-aware text attention"),
    # toy-32 with one level fewer: the DStack output, where the neighbour attention runs (Sec. 3.2), is 16x16
    # instead of 8x8, and so are self- and text cross-attention. ~1.6x the CPU time per step of toy-32.
    "toy-32-n16": Preset(replace(_TOY_32, channel_mults=(1, 2), num_res_blocks=(1, 2), attn_resolutions=(16,)),
                         note="toy world 32x32 base stage, neighbour attention at 16x16 (experiment, README)"),
    "toy-sr64": Preset(
        UNetConfig(image_size=64, lowres_size=32, base_channels=24, channel_mults=(1, 2, 2), num_res_blocks=(1, 1, 1),
                   attn_resolutions=(), head_dim=32, text_dim=384, cond_dim=128, text_width=128,
                   neighbour_heads=4), note="toy world 32 -> 64 super-resolution stage"),
    # Tiny presets for tests.
    "tiny-16": Preset(
        UNetConfig(image_size=16, base_channels=16, channel_mults=(1, 2), num_res_blocks=(1, 1),
                   attn_resolutions=(8,), head_dim=16, text_dim=32, cond_dim=32, text_width=32,
                   neighbour_heads=2, neighbour_null_tokens=2, norm_groups=8), note="unit tests"),
    "tiny-sr32": Preset(
        UNetConfig(image_size=32, lowres_size=16, base_channels=16, channel_mults=(1, 2), num_res_blocks=(1, 1),
                   attn_resolutions=(), head_dim=16, text_dim=32, cond_dim=32, text_width=32,
                   neighbour_heads=2, neighbour_null_tokens=2, norm_groups=8), note="unit tests"),
}


def get_preset(name: str, **overrides: Any) -> UNetConfig:
    """The configuration of a named preset, with optional field overrides (e.g. ``text_dim=384``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name].config
    return UNetConfig.from_dict({**cfg.to_dict(), **overrides}) if overrides else cfg


__all__ = ["UNetConfig", "Preset", "PRESETS", "get_preset", "T5_XXL_DIM"]
