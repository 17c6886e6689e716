"""A tiny random-weight Stable Diffusion pipeline, built offline, for tests of the diffusers baselines.

``make_tiny_sd_pipeline(folder)`` writes a ``StableDiffusionPipeline`` folder (``model_index.json``, ``unet/``,
``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) that ``DiffusionPipeline.from_pretrained(folder)``
loads with no network: the components follow diffusers' own ``get_dummy_components``
(tests/pipelines/stable_diffusion/test_stable_diffusion.py), made smaller still, and the CLIP tokenizer is
built from a byte-level vocab.json / merges.txt written here, so that any prompt tokenizes without unknown
tokens. The weights are random (seeded), so the images are noise; what it is for is the plumbing.

This is a helper module, not a test file (pytest collects only ``test_*.py``); import it from a test as
``from tiny_diffusers import make_tiny_sd_pipeline`` (tests/ is on sys.path under pytest's default import mode).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from reimagen.utils.compat import patch_torchvision_if_broken

# diffusers and transformers import torchvision; on a CPU torch + CUDA torchvision install that fails
# unless the workaround runs first.
patch_torchvision_if_broken()

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

MAX_LENGTH = 77  # CLIP's context length, as in the real Stable Diffusion tokenizer
HIDDEN = 32  # text width = the UNet's cross_attention_dim
CHANNELS = (8, 16)  # UNet and VAE block widths
GROUPS = 4  # GroupNorm groups; divides every width above
MERGES = ["t h", "th e</w>", "a n", "an d</w>", "r e", "re d</w>", "o n", "o f</w>", "i n", "in g</w>"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's map of the 256 bytes to printable characters (what byte-level BPE tokens are made of)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _write_tokenizer_files(folder: Path) -> int:
    """vocab.json (every byte, alone and word-final, a few merges, the two specials) and merges.txt; the vocab size."""
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n", encoding="utf-8")
    return len(vocab)


def make_tiny_sd_pipeline(folder: Path, size: int = 32, seed: int = 0) -> Path:
    """Build a tiny random Stable Diffusion text-to-image pipeline making ``size`` px images; save it to ``folder``.

    The VAE downsamples by 2 (two blocks), so the UNet works on (size/2)^2 latents; ``size`` must be a multiple
    of 4. Deterministic in ``seed`` (the global torch RNG is left as it was).
    Returns ``folder``.
    """
    folder = Path(folder)
    vae_scale = 2 ** (len(CHANNELS) - 1)  # image px per latent px
    multiple = vae_scale * 2 ** (len(CHANNELS) - 1)  # the UNet halves the latents len(CHANNELS) - 1 times
    if size <= 0 or size % multiple:
        raise ValueError(f"size must be a positive multiple of {multiple}, got {size}")

    with tempfile.TemporaryDirectory() as tmp:
        vocab_size = _write_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=MAX_LENGTH)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            block_out_channels=CHANNELS,
            layers_per_block=1,
            sample_size=size // vae_scale,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=HIDDEN,
            attention_head_dim=2,
            norm_num_groups=GROUPS,
        )
        vae = AutoencoderKL(
            block_out_channels=CHANNELS,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(CHANNELS),
            up_block_types=("UpDecoderBlock2D",) * len(CHANNELS),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=GROUPS,
            sample_size=size,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=HIDDEN,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_LENGTH,
            layer_norm_eps=1e-5,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)

    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder
