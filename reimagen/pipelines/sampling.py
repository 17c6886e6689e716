"""Sampling one stage (Sec. 3.1 Eq. 4 with Sec. 3.2 guidance) and per-sample seeding.

Every random number a sample consumes comes from its own generators, seeded by
``sample_seed(seed, prompt_id, sample_index, stage)``: the initial noise, the DDPM noise of every step,
the super-resolution augmentation noise and the interleaving draws R. An image is therefore a function
of (prompt, sample index, seed) alone, whatever else is in the batch, so resumed, sharded and
re-batched runs reproduce it.

At each step the guidance strategy says which predictions each row needs; they run as one batched
forward (rows stacked branch-major, as diffusers does with ``torch.cat([x] * 2)``), in which branches
that see the same text share their DStack pass. The text projection
and the neighbour memory f(c_n, 0) are computed once before the loop and reused at every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..diffusion.gaussian import (ddim_step, ddpm_step, dynamic_threshold, eps_to_x0, get_schedule, q_sample,
                                  sampling_times, to_eps, x0_to_eps)
from ..diffusion.guidance import GuidanceStrategy, branch_drop_masks
from ..diffusion.solvers import DEFAULT_SAMPLER, DEFAULT_STEPS, LIBRARY_SOLVERS, LibrarySolver, check_sampler
from ..models.unet import NeighbourMemory, ReImagenUNet, TextCond
from ..utils.seeding import sample_seed

Tensor = torch.Tensor
SamplerName = str  # one of reimagen.diffusion.solvers.SAMPLERS


class NonFiniteError(FloatingPointError):
    """Raised when a sampling step produces NaN or Inf, instead of writing black images."""


def make_generators(seed: int, prompt_ids: Sequence[str | int], sample_indices: Sequence[int], stage: int | str,
                    stream: str, device: torch.device | str = "cpu") -> list[torch.Generator]:
    gens = []
    for pid, idx in zip(prompt_ids, sample_indices):
        g = torch.Generator(device=device)
        g.manual_seed(sample_seed(seed, pid, idx, stage, stream))
        gens.append(g)
    return gens


def randn_rows(gens: Sequence[torch.Generator], shape: Sequence[int], device: torch.device | str = "cpu") -> Tensor:
    """One standard-normal tensor of ``shape`` per generator, stacked: row i depends only on gens[i]."""
    return torch.stack([torch.randn(tuple(shape), generator=g, device=device) for g in gens])


def rand_rows(gens: Sequence[torch.Generator], device: torch.device | str = "cpu") -> Tensor:
    return torch.stack([torch.rand((), generator=g, device=device) for g in gens])


@dataclass(frozen=True)
class SamplerSettings:
    """How one stage samples. The paper's: DDPM, T = 1000 for FID; 256 / 128 / 32 steps on EntityDrawBench."""

    steps: int = DEFAULT_STEPS
    sampler: SamplerName = DEFAULT_SAMPLER  # ddpm (Eq. 4), ddim, or a library solver (diffusion.solvers)
    threshold: float = 0.995  # dynamic thresholding percentile p (>= 1: static clipping to [-1, 1])
    aug_level: float = 0.0  # super-resolution stages: noise level of the low-res conditioning at sampling
    ddim_eta: float = 0.0
    start_t: float = 1.0  # < 1: start from given images noised to this time (SDEdit, Meng et al. 2022), not pure noise

    def __post_init__(self) -> None:
        check_sampler(self.sampler, self.steps)
        if self.sampler in LIBRARY_SOLVERS and self.start_t != 1.0:
            raise ValueError(f"start_t < 1 (SDEdit) runs with the ddpm or ddim sampler, not {self.sampler}")
        if not (0.0 <= self.aug_level <= 1.0):
            raise ValueError(f"aug_level must be in [0, 1], got {self.aug_level}")
        if not (0.0 <= self.ddim_eta <= 1.0):
            raise ValueError(f"ddim_eta must be in [0, 1], got {self.ddim_eta}")
        if not (0.0 < self.start_t <= 1.0):
            raise ValueError(f"start_t must be in (0, 1], got {self.start_t}")


def guided_eps(model: ReImagenUNet, x: Tensor, t: Tensor, log_snr_t: Tensor, text: TextCond,
               neighbours: NeighbourMemory | None, guidance: GuidanceStrategy, codes: Tensor,
               lowres: Tensor | None = None, aug_t: Tensor | None = None) -> Tensor:
    """The guided eps of one step (k-diffusion's CFGDenoiser): the branches ``codes`` (nb, B) asks for run as
    one batched forward, rows stacked branch-major (diffusers' ``torch.cat([x] * 2)``), the branches of a sample
    that see the same text sharing their DStack pass (``source``); the predictions become eps and the guidance
    combines them (Eq. 5 / Eq. 6). ``text``, ``neighbours``, ``lowres`` and ``aug_t`` are already expanded to
    the nb * B rows; ``x``, ``t`` and ``log_snr_t`` are the B samples'."""
    nb, b = codes.shape
    source = torch.arange(b, device=x.device).repeat(nb)
    drop_text, drop_nbr = branch_drop_masks(codes.reshape(-1))
    if neighbours is None:
        drop_nbr = torch.ones_like(drop_nbr)
    x_in = x.repeat(nb, 1, 1, 1)
    with torch.no_grad():
        # .float(): under bf16 / fp16 autocast the sampler's arithmetic stays in fp32
        pred = model(x_in, t.repeat(nb), text, neighbours, drop_text, drop_nbr, lowres, aug_t, source=source).float()
    eps_branches = to_eps(pred, x_in, log_snr_t.repeat(nb), model.cfg.prediction).reshape(nb, b, *x.shape[1:])
    return guidance.combine(eps_branches, codes)


def sample_stage(
    model: ReImagenUNet,
    text: TextCond,
    neighbours: NeighbourMemory | None,
    guidance: GuidanceStrategy,
    settings: SamplerSettings,
    noise_gens: Sequence[torch.Generator],
    guidance_gens: Sequence[torch.Generator],
    lowres: Tensor | None = None,
    stage_name: str = "stage",
    callback: Callable[[int, int], None] | None = None,
    init: Tensor | None = None,
) -> Tensor:
    """Sample B images in [-1, 1] from one stage.

    ``text`` and ``neighbours`` are the once-per-sample projections (``model.project_text`` and
    ``model.encode_neighbours``, the neighbour cache); ``lowres`` (B, C, s, s) in [-1, 1] is the previous
    stage's output for super-resolution stages. ``callback(step, total)`` is called after every step.
    With ``settings.start_t`` < 1, ``init`` (B, C, size, size) in [-1, 1] is noised to that time by Eq. 1 (with
    the row's own initial noise) and the loop runs from there to t = 0 in ``settings.steps`` steps (SDEdit).
    """
    cfg = model.cfg
    device = text.tokens.device
    b = text.tokens.shape[0]
    if len(noise_gens) != b or len(guidance_gens) != b:
        raise ValueError(f"need one noise and one guidance generator per sample ({b}), got "
                         f"{len(noise_gens)} and {len(guidance_gens)}")
    if guidance.needs_neighbours and (neighbours is None or model.neighbour_attn is None):
        raise ValueError(f"{type(guidance).__name__} needs neighbours; give neighbours, or use "
                         "JointGuidance(use_neighbours=False) to sample without retrieval")
    log_snr = get_schedule(cfg.schedule)
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    x = randn_rows(noise_gens, shape, device)
    if (init is None) != (settings.start_t == 1.0):
        raise ValueError(f"{stage_name}: give init images exactly when start_t < 1 (start_t = {settings.start_t})")
    if init is not None:
        if tuple(init.shape) != (b, *shape):
            raise ValueError(f"{stage_name}: init images must be {(b, *shape)}, got {tuple(init.shape)}")
        x = q_sample(init.to(device, x.dtype), log_snr(torch.full((b,), settings.start_t, device=device)), x)

    # 1. Low-resolution conditioning (super-resolution stages), noise-augmented once to aug_level.
    lowres_in = aug_t = None
    if cfg.is_super_resolution:
        if lowres is None:
            raise ValueError(f"{stage_name} is a super-resolution stage and needs the low-resolution images")
        if lowres.shape[0] != b:
            raise ValueError(f"batch length mismatch: {b} prompts, {lowres.shape[0]} low-resolution images")
        aug_t = torch.full((b,), settings.aug_level, device=device)
        lowres_in = model.lowres_input(lowres, aug_t, randn_rows(noise_gens, shape, device))

    # 2. Expand the once-computed conditioning to the branch-major batch of one step.
    nb = guidance.num_branches
    rep = torch.arange(b, device=device).repeat(nb)
    text_rep = text.index(rep)
    nbr_rep = neighbours.index(rep) if neighbours is not None else None
    low_rep = lowres_in[rep] if lowres_in is not None else None
    aug_rep = aug_t[rep] if aug_t is not None else None

    # 3. The denoising loop: one guided evaluation per step.
    def denoise(x: Tensor, t: Tensor, lt: Tensor) -> Tensor:
        """The dynamically thresholded x0 at time t."""
        codes = guidance.plan(rand_rows(guidance_gens, device))  # (nb, B): a fresh R per row and step (Eq. 6)
        eps = guided_eps(model, x, t, lt, text_rep, nbr_rep, guidance, codes, low_rep, aug_rep)
        return dynamic_threshold(eps_to_x0(x, eps, lt), settings.threshold)

    loop = _library_loop if settings.sampler in LIBRARY_SOLVERS else _native_loop
    return loop(x, denoise, log_snr, settings, noise_gens, stage_name, callback)


def _check_finite(x: Tensor, stage_name: str, i: int, steps: int, t: float) -> None:
    if not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x.flatten(1))).any(1).nonzero().flatten().tolist()
        raise NonFiniteError(f"{stage_name}: non-finite values at step {i + 1}/{steps} (t = {t:.4f}) in samples "
                             f"{bad}; the model or the guidance weights are unstable (try lower weights or a "
                             "checkpoint with more training)")


def _native_loop(x, denoise, log_snr, settings, noise_gens, stage_name, callback) -> Tensor:
    """DDPM (Eq. 4) or DDIM on the uniform times of ``sampling_times``."""
    device, b, shape = x.device, x.shape[0], x.shape[1:]
    times = sampling_times(settings.steps, device, start=settings.start_t)
    for i in range(settings.steps):
        t, s = times[i].expand(b), times[i + 1].expand(b)
        lt, ls = log_snr(t), log_snr(s)
        x0 = denoise(x, t, lt)
        if i == settings.steps - 1:
            x = x0  # the last step lands on t = 0: the (thresholded) x0 estimate is the sample
        elif settings.sampler == "ddpm":
            x = ddpm_step(x, x0, lt, ls, randn_rows(noise_gens, shape, device))  # Eq. 4
        else:
            eps_thr = x0_to_eps(x, x0, lt)  # eps consistent with the thresholded x0
            noise = randn_rows(noise_gens, shape, device) if settings.ddim_eta > 0 else None
            x = ddim_step(x, x0, eps_thr, lt, ls, noise, settings.ddim_eta)
        _check_finite(x, stage_name, i, settings.steps, float(times[i]))
        if callback is not None:
            callback(i + 1, settings.steps)
    return x


def _library_loop(x, denoise, log_snr, settings, noise_gens, stage_name, callback) -> Tensor:
    """A diffusers solver (``diffusion.solvers``) fed the thresholded x0; a stochastic one gets each sample's
    noise from the sample's own generator, as DDPM."""
    solver = LibrarySolver(settings.sampler, log_snr, settings.steps, x.device)
    b, shape = x.shape[0], x.shape[1:]
    for i in range(settings.steps):
        t = solver.times[i].expand(b)
        noise = randn_rows(noise_gens, shape, x.device) if solver.stochastic else None
        x = solver.step(denoise(x, t, log_snr(t)), i, x, noise)
        _check_finite(x, stage_name, i, settings.steps, float(solver.times[i]))
        if callback is not None:
            callback(i + 1, settings.steps)
    return x
