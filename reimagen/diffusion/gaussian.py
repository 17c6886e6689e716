"""Diffusion math of Re-Imagen (Sec. 3.1), as pure functions with no module state.

Notation follows the paper. Time is continuous, ``t in [0, 1]``; a noise schedule is given by its
log signal-to-noise ratio ``lambda(t) = log(alpha_bar_t / (1 - alpha_bar_t))``, so that

    alpha_bar_t = sigmoid(lambda(t)),    sqrt(alpha_bar_t) = alpha_t,    sqrt(1 - alpha_bar_t) = sigma_t.

* Eq. 1  forward process, in closed form:  x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
* Eq. 2  loss:                              E[ w_t || x0_hat(x_t, c) - x_0 ||^2 ]
* Eq. 3  x0 from eps:                       x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)
* Eq. 4  DDPM ancestral step:               x_s ~ q(x_s | x_t, x0_hat), s < t
* DDIM (Song et al. 2021) for fewer steps, and Imagen's dynamic thresholding of x0_hat.

All tensors of per-sample scalars (``t``, ``log_snr``) have shape (B,) and are broadcast over images.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
Schedule = Callable[[Tensor], Tensor]
Prediction = Literal["eps", "x0", "v"]


# ----------------------------------------------------------------------------------------------
# Schedules in log-SNR form
# ----------------------------------------------------------------------------------------------
def log_snr_cosine(t: Tensor, s: float = 0.008, clamp_min: float = 1e-5) -> Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021): alpha_bar_t = cos^2((t + s) / (1 + s) * pi / 2)."""
    f = torch.cos((t + s) / (1 + s) * math.pi * 0.5) ** -2 - 1
    return -torch.log(f.clamp(min=clamp_min))


def log_snr_linear(t: Tensor, beta_min: float = 1e-4, beta_scale: float = 10.0) -> Tensor:
    """Continuous version of DDPM's linear beta schedule (Kingma et al. 2021, Imagen):
    alpha_bar_t = 1 / (1 + expm1(beta_min + beta_scale * t^2))."""
    return -torch.log(torch.expm1(beta_min + beta_scale * t**2))


SCHEDULES: dict[str, Schedule] = {"cosine": log_snr_cosine, "linear": log_snr_linear}


def get_schedule(name: str) -> Schedule:
    """A schedule by name: ``cosine``, ``linear``, or ``NAME:SHIFT``, the schedule with its log-SNR shifted by
    SHIFT (Hoogeboom et al. 2023, "simple diffusion", Sec. 3.1): ``cosine:-3`` trains and samples with every
    level 3 nats noisier, so uniform t spends more of training where a small object's colours are still hidden
    by the noise, which is where a look is decided and retrieval can help."""
    base, _, shift = name.partition(":")
    if base not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; choose one of {sorted(SCHEDULES)}, optionally "
                         "with a log-SNR shift as NAME:SHIFT (e.g. cosine:-3)")
    if not shift:
        return SCHEDULES[base]
    try:
        offset = float(shift)
    except ValueError:
        raise ValueError(f"noise schedule {name!r}: the shift after ':' must be a number") from None
    fn = SCHEDULES[base]
    return lambda t: fn(t) + offset


def alpha_sigma(log_snr: Tensor) -> tuple[Tensor, Tensor]:
    """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) from lambda(t), computed stably via sigmoid."""
    return torch.sigmoid(log_snr).sqrt(), torch.sigmoid(-log_snr).sqrt()


def _b(v: Tensor, like: Tensor) -> Tensor:
    """Broadcast a per-sample vector (B,) over an image batch (B, C, H, W)."""
    return v.reshape(v.shape[0], *([1] * (like.dim() - 1))).to(like.dtype)


# ----------------------------------------------------------------------------------------------
# Forward process and parameterisations
# ----------------------------------------------------------------------------------------------
def q_sample(x0: Tensor, log_snr: Tensor, noise: Tensor) -> Tensor:
    """Eq. 1 in closed form: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
    alpha, sigma = alpha_sigma(log_snr)
    return _b(alpha, x0) * x0 + _b(sigma, x0) * noise


def eps_to_x0(x_t: Tensor, eps: Tensor, log_snr: Tensor) -> Tensor:
    """Eq. 3: x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
    alpha, sigma = alpha_sigma(log_snr)
    return (x_t - _b(sigma, x_t) * eps) / _b(alpha, x_t)


def x0_to_eps(x_t: Tensor, x0: Tensor, log_snr: Tensor) -> Tensor:
    """Inverse of Eq. 3: eps = (x_t - sqrt(alpha_bar_t) x0) / sqrt(1 - alpha_bar_t)."""
    alpha, sigma = alpha_sigma(log_snr)
    return (x_t - _b(alpha, x_t) * x0) / _b(sigma, x_t)


def v_from(x0: Tensor, eps: Tensor, log_snr: Tensor) -> Tensor:
    """v-parameterisation (Salimans & Ho 2022): v = alpha_t eps - sigma_t x0."""
    alpha, sigma = alpha_sigma(log_snr)
    return _b(alpha, x0) * eps - _b(sigma, x0) * x0


def v_to_x0(x_t: Tensor, v: Tensor, log_snr: Tensor) -> Tensor:
    alpha, sigma = alpha_sigma(log_snr)
    return _b(alpha, x_t) * x_t - _b(sigma, x_t) * v


def v_to_eps(x_t: Tensor, v: Tensor, log_snr: Tensor) -> Tensor:
    alpha, sigma = alpha_sigma(log_snr)
    return _b(sigma, x_t) * x_t + _b(alpha, x_t) * v


def to_eps(pred: Tensor, x_t: Tensor, log_snr: Tensor, prediction: Prediction) -> Tensor:
    """Convert a network output of the given parameterisation to eps."""
    if prediction == "eps":
        return pred
    if prediction == "x0":
        return x0_to_eps(x_t, pred, log_snr)
    if prediction == "v":
        return v_to_eps(x_t, pred, log_snr)
    raise ValueError(f"unknown prediction type {prediction!r}")


def to_x0(pred: Tensor, x_t: Tensor, log_snr: Tensor, prediction: Prediction) -> Tensor:
    """Convert a network output of the given parameterisation to x0_hat (Eq. 3 for eps)."""
    if prediction == "eps":
        return eps_to_x0(x_t, pred, log_snr)
    if prediction == "x0":
        return pred
    if prediction == "v":
        return v_to_x0(x_t, pred, log_snr)
    raise ValueError(f"unknown prediction type {prediction!r}")


# ----------------------------------------------------------------------------------------------
# Training loss (Eq. 2)
# ----------------------------------------------------------------------------------------------
def diffusion_loss(
    pred: Tensor,
    x0: Tensor,
    noise: Tensor,
    log_snr: Tensor,
    prediction: Prediction = "eps",
    weight: Tensor | None = None,
) -> Tensor:
    """Eq. 2, E[w_t ||x0_hat - x0||^2], in the network's own parameterisation.

    With eps prediction, ||x0_hat - x0||^2 = (sigma_t / alpha_t)^2 ||eps_hat - eps||^2, so the usual
    eps-MSE is Eq. 2 with w_t = alpha_bar_t / (1 - alpha_bar_t) = exp(lambda(t)) (Ho et al. 2020's
    "simple" loss, the one Imagen trains with). ``weight`` (shape (B,)) multiplies per-sample losses.
    Returns the mean over the batch.
    """
    if prediction == "eps":
        target = noise
    elif prediction == "x0":
        target = x0
    elif prediction == "v":
        target = v_from(x0, noise, log_snr)
    else:
        raise ValueError(f"unknown prediction type {prediction!r}")
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
    if weight is not None:
        per_sample = per_sample * weight
    return per_sample.mean()


def min_snr_weight(log_snr: Tensor, gamma: float, prediction: Prediction, plus_one: bool = False) -> Tensor:
    """Min-SNR-gamma loss weights (Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy",
    ICCV 2023), per sample, as multipliers of the MSE in the network's own parameterisation.

    In Eq. 2's x0 terms the weight is w_t = min(SNR_t, gamma), SNR_t = exp(lambda(t)): the low-noise steps, where
    the simple loss puts almost all its weight on fine texture, are capped at gamma. Since
    ||x0_hat - x0||^2 = ||eps_hat - eps||^2 / SNR = ||v_hat - v||^2 / (SNR + 1), the multiplier is
    min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1) for v and min(SNR, gamma) for x0.
    (diffusers' ``compute_snr`` needs a discrete scheduler; the schedules here are continuous in t.)

    With v-prediction that multiplier tends to SNR -> 0 at high noise, where the layout (which side, which
    background) is decided: those steps are hardly trained. ``plus_one`` weighs the x0 terms by
    min(SNR_t, gamma) + 1 instead, so the v multiplier (min(SNR, gamma) + 1) / (SNR + 1) is 1 at high noise (the
    plain v loss) and (gamma + 1) / (SNR + 1) at low noise; it is refused for eps, whose multiplier would grow
    without bound as SNR -> 0.
    """
    snr = torch.exp(log_snr.float())
    capped = torch.clamp(snr, max=gamma)
    if plus_one:
        if prediction == "eps":
            raise ValueError("the +1 Min-SNR weighting needs v or x0 prediction (for eps it grows without bound)")
        capped = capped + 1.0
    if prediction == "eps":
        return capped / snr
    if prediction == "v":
        return capped / (snr + 1)
    if prediction == "x0":
        return capped
    raise ValueError(f"unknown prediction type {prediction!r}")


# ----------------------------------------------------------------------------------------------
# Sampling steps
# ----------------------------------------------------------------------------------------------
def dynamic_threshold(x0: Tensor, percentile: float = 0.995) -> Tensor:
    """Imagen's dynamic thresholding: s = percentile(|x0|, p) per sample, s = max(s, 1),
    x0 = clip(x0, -s, s) / s. ``percentile >= 1`` falls back to static clipping to [-1, 1]."""
    if percentile >= 1.0:
        return x0.clamp(-1.0, 1.0)
    s = _b(_percentile_rows(x0.detach().abs().flatten(1).float(), percentile).clamp(min=1.0), x0)
    return x0.clamp(-s, s) / s


def _percentile_rows(a: Tensor, q: float) -> Tensor:
    """Per-row q-quantile with linear interpolation (numpy's default). Written with kthvalue because
    torch.quantile refuses inputs over 16M elements, which a batch of 1024x1024 images exceeds."""
    n = a.shape[1]
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    v_lo = a.kthvalue(lo + 1, dim=1).values
    v_hi = a.kthvalue(hi + 1, dim=1).values if hi != lo else v_lo
    return v_lo + (pos - lo) * (v_hi - v_lo)


def ddpm_step(x_t: Tensor, x0_hat: Tensor, log_snr_t: Tensor, log_snr_s: Tensor, noise: Tensor) -> Tensor:
    """Eq. 4, the DDPM ancestral step from time t to s < t, x_s ~ q(x_s | x_t, x0_hat):

        mean = sqrt(alpha_bar_s) beta_{t|s} / (1 - alpha_bar_t) * x0_hat
             + sqrt(alpha_{t|s}) (1 - alpha_bar_s) / (1 - alpha_bar_t) * x_t
        var  = (1 - alpha_bar_s) / (1 - alpha_bar_t) * beta_{t|s}

    with alpha_{t|s} = alpha_bar_t / alpha_bar_s and beta_{t|s} = 1 - alpha_{t|s} (the paper's alpha_t,
    beta_t for one discrete step). When s is the final time, pass ``noise`` = 0 for the mean.
    """
    abar_t, abar_s = torch.sigmoid(log_snr_t), torch.sigmoid(log_snr_s)
    alpha_ts = abar_t / abar_s
    beta_ts = 1 - alpha_ts
    c_x0 = abar_s.sqrt() * beta_ts / (1 - abar_t)
    c_xt = alpha_ts.sqrt() * (1 - abar_s) / (1 - abar_t)
    var = (1 - abar_s) / (1 - abar_t) * beta_ts
    return _b(c_x0, x_t) * x0_hat + _b(c_xt, x_t) * x_t + _b(var.clamp(min=0).sqrt(), x_t) * noise


def ddim_step(
    x_t: Tensor,
    x0_hat: Tensor,
    eps_hat: Tensor,
    log_snr_t: Tensor,
    log_snr_s: Tensor,
    noise: Tensor | None = None,
    eta: float = 0.0,
) -> Tensor:
    """DDIM step (Song et al. 2021, Eq. 12) from t to s < t: deterministic for eta = 0, DDPM-like for 1."""
    alpha_s, sigma_s = alpha_sigma(log_snr_s)
    abar_t, abar_s = torch.sigmoid(log_snr_t), torch.sigmoid(log_snr_s)
    c = eta * ((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)).clamp(min=0).sqrt()
    dir_coef = (sigma_s**2 - c**2).clamp(min=0).sqrt()
    out = _b(alpha_s, x_t) * x0_hat + _b(dir_coef, x_t) * eps_hat
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise")
        out = out + _b(c, x_t) * noise
    return out


def sampling_times(num_steps: int, device: torch.device | str = "cpu", start: float = 1.0) -> Tensor:
    """The num_steps + 1 times start = t_N > ... > t_0 = 0 of a sampling run (uniform in t; start < 1 for SDEdit)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0.0 < start <= 1.0:
        raise ValueError(f"start must be in (0, 1], got {start}")
    return torch.linspace(start, 0.0, num_steps + 1, device=device)



__all__ = ["Schedule", "Prediction", "SCHEDULES", "log_snr_cosine", "log_snr_linear", "get_schedule", "alpha_sigma",
           "q_sample", "eps_to_x0", "x0_to_eps", "v_from", "v_to_x0", "v_to_eps", "to_eps", "to_x0", "diffusion_loss",
           "min_snr_weight", "dynamic_threshold", "ddpm_step", "ddim_step", "sampling_times"]
