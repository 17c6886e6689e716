"""Fast deterministic solvers from diffusers' schedulers, behind the project's guided denoiser.

DPM-Solver++ (2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2) and UniPC (Zhao et al. 2023, UniP-2 + UniC,
bh2) reach the quality of hundreds of DDPM steps in 10-25 network evaluations. (diffusers' DEIS was tried too:
on this adapter's exact-denoiser check its error at 20 steps was 5x DDIM's, so it is not offered.) They
come from diffusers, whose schedulers are how DeepFloyd IF (a pixel cascade like this one) samples; k-diffusion
was the other candidate, but it is not a dependency and its samplers need Karras sigmas rather than the
discrete alpha_bar grid both libraries agree on.

The adapter. A stage is continuous in time, with a log-SNR schedule lambda(t) (``gaussian.get_schedule``);
diffusers' schedulers are discrete and read ``alphas_cumprod`` on ``GRID`` = 1000 training steps. The scheduler
is given this stage's schedule on that grid, alpha_bar_k = sigmoid(lambda(t_k)) with t_k = (k + 1) / GRID, in
float32 as the native samplers compute it, and ``trailing`` timestep spacing: the first evaluation is at t = 1
and the last step lands on t = 0. A scheduler timestep k is evaluated at t_k. With N dividing GRID, the times
are the native sampler's ``sampling_times(N)``.

What stays ours. The scheduler is handed the dynamically thresholded x0 (``prediction_type="sample"``), as the
native DDIM uses it: eps would lose x0 to cancellation near t = 1, where alpha_t is ~1e-7. So v- and
x0-predicting stages, guidance (Eq. 5 / Eq. 6, a fresh R per row and step) and Imagen's thresholding work with
every solver. The solvers are deterministic (no noise): an image stays a function of its own generators,
whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .gaussian import Schedule

Tensor = torch.Tensor

GRID = 1000  # diffusers' num_train_timesteps: the discrete times a library solver can step to


@dataclass(frozen=True)
class SolverSpec:
    scheduler: str  # diffusers class name
    options: dict[str, Any]
    title: str
    stochastic: bool = False  # takes fresh noise at every step (given per sample: ``LibrarySolver.step``)


# Public names -> diffusers schedulers. ``ddim-diffusers`` is diffusers' DDIM: the check of the adapter against
# the native ``ddim`` (tests), not a sampler to choose.
LIBRARY_SOLVERS: dict[str, SolverSpec] = {
    "dpmpp-2m": SolverSpec("DPMSolverMultistepScheduler",
                           {"algorithm_type": "dpmsolver++", "solver_order": 2, "final_sigmas_type": "zero",
                            "lower_order_final": True}, "DPM-Solver++ (2M)"),
    # DPM-Solver++ (2M) on the SDE (Lu et al. 2022, Sec. 5 / Appendix: SDE-DPM-Solver++): noise at every step, as
    # DDPM's Eq. 4, which the deterministic solvers and DDIM lack (the toy world's scene rate: benchmarks/README.md)
    "dpmpp-2m-sde": SolverSpec("DPMSolverMultistepScheduler",
                               {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "final_sigmas_type": "zero",
                                "lower_order_final": True}, "DPM-Solver++ (2M SDE)", stochastic=True),
    "unipc": SolverSpec("UniPCMultistepScheduler",
                        {"solver_order": 2, "solver_type": "bh2", "predict_x0": True, "final_sigmas_type": "zero",
                         "lower_order_final": True}, "UniPC (bh2, order 2)"),
    "ddim-diffusers": SolverSpec("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": True},
                                 "diffusers' DDIM"),
}
NATIVE_SAMPLERS = ("ddpm", "ddim")
SAMPLERS = NATIVE_SAMPLERS + tuple(k for k in LIBRARY_SOLVERS if k != "ddim-diffusers")  # what users choose from
MAX_STEPS = GRID  # a library solver takes at most one step per grid point


#: The default of `sample`, the pipeline and the toy world: DPM-Solver++ 2M, 16 base / 8 SR steps (24 network
#: evaluations per image). On the toy cascade at 48 entities per split x 4 against the paper's DDPM 256 / 128 (384
#: evaluations): every faithful rate inside its 95% intervals, no significant paired difference, the scene rate on
#: the interval's lower edge; FID / KID inside DDIM 25 / 10's (docs/sampling.md). The paper-protocol commands
#: (`fid`, `entitydraw` without --world) keep the paper's DDPM.
DEFAULT_SAMPLER = "dpmpp-2m"
DEFAULT_STEPS = 16
DEFAULT_SR_STEPS = 8


def default_sr_steps(steps: int) -> int:
    """SR steps when only the base stage's are given: half, as measured (16 / 8, 12 / 6, 8 / 4)."""
    return max(1, steps // 2)


def check_sampler(name: str, steps: int) -> None:
    """Refuse an unknown sampler or a step count the solver cannot take, before any model loads."""
    if name not in NATIVE_SAMPLERS and name not in LIBRARY_SOLVERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if name in LIBRARY_SOLVERS and steps > MAX_STEPS:
        raise ValueError(f"{name} takes at most {MAX_STEPS} steps (one per step of its {GRID}-step grid), "
                         f"got {steps}; use ddpm or ddim for more")


def grid_alpha_bar(log_snr: Schedule) -> Tensor:
    """alpha_bar at the grid times t_k = (k + 1) / GRID, k = 0 .. GRID - 1, in float32 like the native samplers
    (at t = 1 the cosine schedule's alpha_bar is ~2e-15: a float32 cumulative product of betas would give 0)."""
    t = (torch.arange(1, GRID + 1, dtype=torch.float64) / GRID).float()
    return torch.sigmoid(log_snr(t))


def _set_alpha_bar(scheduler, abar: Tensor) -> None:
    """Give a constructed scheduler this alpha_bar exactly, with what its constructor derives from it."""
    scheduler.alphas_cumprod = abar.clone()
    if hasattr(scheduler, "alpha_t"):  # the multistep schedulers' VP coefficients
        scheduler.alpha_t = abar.sqrt()
        scheduler.sigma_t = (1 - abar).sqrt()
        scheduler.lambda_t = scheduler.alpha_t.log() - scheduler.sigma_t.log()
    if hasattr(scheduler, "sigmas"):
        scheduler.sigmas = ((1 - abar) / abar) ** 0.5


def make_scheduler(name: str, log_snr: Schedule, steps: int):
    """A fresh diffusers scheduler of solver ``name`` on this schedule's grid, set to ``steps`` steps."""
    import diffusers

    check_sampler(name, steps)
    spec = LIBRARY_SOLVERS[name]
    abar = grid_alpha_bar(log_snr)
    betas = 1.0 - abar.double() / torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1].double()])
    scheduler = getattr(diffusers, spec.scheduler)(num_train_timesteps=GRID, trained_betas=betas.tolist(),
                                                    prediction_type="sample", timestep_spacing="trailing",
                                                    **spec.options)
    _set_alpha_bar(scheduler, abar)
    scheduler.set_timesteps(steps)
    return scheduler


class LibrarySolver:
    """One stage's run of a library solver: ``times`` are the model's evaluation times (t in (0, 1]), and
    ``step(x0, i, x)`` moves the B samples from times[i] to the next time (t = 0 after the last), given the
    (thresholded) x0 prediction at times[i]."""

    def __init__(self, name: str, log_snr: Schedule, steps: int, device: torch.device | str = "cpu"):
        self.name = name
        self.stochastic = LIBRARY_SOLVERS[name].stochastic
        self.scheduler = make_scheduler(name, log_snr, steps)
        self.timesteps = [int(k) for k in self.scheduler.timesteps]
        self.times = torch.tensor([(k + 1) / GRID for k in self.timesteps], dtype=torch.float32, device=device)

    def step(self, x0: Tensor, i: int, x: Tensor, noise: Tensor | None = None) -> Tensor:
        """``noise``: a stochastic solver's standard-normal noise of this step, one row per sample (drawn from the
        sample's own generator, so that an image does not depend on its batch)."""
        if self.stochastic and noise is None:
            raise ValueError(f"{self.name} is stochastic: step() needs this step's noise")
        extra = {"variance_noise": noise} if self.stochastic else {}
        out = self.scheduler.step(x0, self.timesteps[i], x, return_dict=False, **extra)[0]
        return out.to(x.dtype)


__all__ = ["DEFAULT_SAMPLER", "DEFAULT_STEPS", "DEFAULT_SR_STEPS", "default_sr_steps",
           "GRID", "LIBRARY_SOLVERS", "NATIVE_SAMPLERS", "SAMPLERS", "MAX_STEPS", "SolverSpec", "check_sampler",
           "grid_alpha_bar", "make_scheduler", "LibrarySolver"]
