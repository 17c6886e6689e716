"""Properties of the diffusion math (reimagen/diffusion.py, paper Sec. 3.1 Eq. 1-4, DDIM, dynamic thresholding)."""

import numpy as np
import pytest
import torch

from reimagen import diffusion as D

SCHEDULES = ["cosine", "linear"]


def _times(n=201, lo=0.0, hi=1.0):
    return torch.linspace(lo, hi, n, dtype=torch.float64)


def _batch(b=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(b, 3, 8, 8, generator=g, dtype=dtype) * 2 - 1
    eps = torch.randn(b, 3, 8, 8, generator=g, dtype=dtype)
    t = torch.rand(b, generator=g, dtype=dtype) * 0.96 + 0.02
    return x0, eps, t


# ----------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_alpha_squared_plus_sigma_squared_is_one(name):
    lam = D.get_schedule(name)(_times())
    alpha, sigma = D.alpha_sigma(lam)
    assert torch.all(torch.isfinite(lam))
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(alpha), atol=1e-12, rtol=0)
    assert torch.all((alpha >= 0) & (alpha <= 1) & (sigma >= 0) & (sigma <= 1))


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_log_snr_strictly_decreasing_in_t(name):
    lam = D.get_schedule(name)(_times(1001))
    assert torch.all(lam[1:] < lam[:-1])
    # high SNR at t = 0 (nearly clean), low SNR at t = 1 (nearly pure noise)
    assert lam[0] > 4 and lam[-1] < -8


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_alpha_bar_matches_documented_closed_form(name):
    t = _times(101, 0.05, 0.95)
    abar = torch.sigmoid(D.get_schedule(name)(t))
    if name == "cosine":
        s = 0.008
        expected = torch.cos((t + s) / (1 + s) * np.pi / 2) ** 2
    else:
        expected = 1 / (1 + torch.expm1(1e-4 + 10 * t**2))
    torch.testing.assert_close(abar, expected, rtol=1e-9, atol=1e-12)


def test_unknown_schedule_raises_value_error():
    with pytest.raises(ValueError, match="schedule"):
        D.get_schedule("quadratic")
    for bad in ("quadratic:-3", "cosine:noisier"):
        with pytest.raises(ValueError, match="schedule"):
            D.get_schedule(bad)


@pytest.mark.parametrize("name", SCHEDULES)
def test_shifted_schedule_is_the_schedule_plus_its_log_snr_shift(name):
    """NAME:SHIFT (simple diffusion's shifted schedule): log-SNR + SHIFT at every t, still decreasing, so every
    level is exp(-3) times the SNR and alpha^2 + sigma^2 = 1 still holds."""
    t = _times(1001)
    lam, shifted = D.get_schedule(name)(t), D.get_schedule(f"{name}:-3")(t)
    torch.testing.assert_close(shifted, lam - 3, atol=1e-12, rtol=0)
    assert torch.all(shifted[1:] < shifted[:-1])
    alpha, sigma = D.alpha_sigma(shifted)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(alpha), atol=1e-12, rtol=0)
    assert D.get_schedule(f"{name}:0")(t).equal(lam)


def test_config_rejects_an_unknown_schedule_when_built():
    from reimagen.models.config import get_preset

    with pytest.raises(ValueError, match="schedule"):
        get_preset("tiny-16", schedule="cosine:x")
    assert get_preset("tiny-16", schedule="cosine:-3").schedule == "cosine:-3"


# ----------------------------------------------------------------------------------------------
# Forward process and parameterisations
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SCHEDULES)
def test_q_sample_matches_eq1(name):
    x0, eps, t = _batch()
    lam = D.get_schedule(name)(t)
    abar = torch.sigmoid(lam)[:, None, None, None]
    expected = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    torch.testing.assert_close(D.q_sample(x0, lam, eps), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", SCHEDULES)
def test_eps_to_x0_recovers_x0_from_q_sample_and_x0_to_eps_recovers_eps(name):
    x0, eps, t = _batch()
    lam = D.get_schedule(name)(t)
    x_t = D.q_sample(x0, lam, eps)
    torch.testing.assert_close(D.eps_to_x0(x_t, eps, lam), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(D.x0_to_eps(x_t, x0, lam), eps, rtol=1e-9, atol=1e-9)


def test_eps_to_x0_and_x0_to_eps_are_mutual_inverses_for_arbitrary_inputs():
    x0, eps, t = _batch(seed=3)
    lam = D.log_snr_cosine(t)
    x_t = torch.randn_like(x0)  # not necessarily on the forward process
    torch.testing.assert_close(D.x0_to_eps(x_t, D.eps_to_x0(x_t, eps, lam), lam), eps, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(D.eps_to_x0(x_t, D.x0_to_eps(x_t, x0, lam), lam), x0, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", SCHEDULES)
def test_v_parameterisation_conversions_are_consistent(name):
    x0, eps, t = _batch(seed=1)
    lam = D.get_schedule(name)(t)
    x_t = D.q_sample(x0, lam, eps)
    v = D.v_from(x0, eps, lam)
    torch.testing.assert_close(D.v_to_x0(x_t, v, lam), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(D.v_to_eps(x_t, v, lam), eps, rtol=1e-9, atol=1e-9)
    # the generic dispatchers agree for all three parameterisations
    for pred, kind in ((eps, "eps"), (x0, "x0"), (v, "v")):
        torch.testing.assert_close(D.to_eps(pred, x_t, lam, kind), eps, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(D.to_x0(pred, x_t, lam, kind), x0, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError):
        D.to_eps(eps, x_t, lam, "score")
    with pytest.raises(ValueError):
        D.to_x0(eps, x_t, lam, "score")


# ----------------------------------------------------------------------------------------------
# Loss (Eq. 2)
# ----------------------------------------------------------------------------------------------
def test_diffusion_loss_eps_is_plain_mse_and_zero_for_perfect_prediction():
    x0, eps, t = _batch(seed=2, dtype=torch.float32)
    lam = D.log_snr_cosine(t)
    pred = eps + 0.3 * torch.randn_like(eps)
    assert float(D.diffusion_loss(eps, x0, eps, lam, "eps")) == 0.0
    loss = D.diffusion_loss(pred, x0, eps, lam, "eps")
    torch.testing.assert_close(loss, ((pred - eps) ** 2).mean(), rtol=1e-6, atol=0)
    # per-sample weights multiply the per-sample MSE
    w = torch.arange(1.0, 7.0)
    per = ((pred - eps) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(D.diffusion_loss(pred, x0, eps, lam, "eps", weight=w), (w * per).mean(), rtol=1e-6, atol=0)


def test_diffusion_loss_x0_and_v_targets_are_zero_for_perfect_prediction():
    x0, eps, t = _batch(seed=4, dtype=torch.float32)
    lam = D.log_snr_linear(t)
    assert float(D.diffusion_loss(x0, x0, eps, lam, "x0")) == 0.0
    assert float(D.diffusion_loss(D.v_from(x0, eps, lam), x0, eps, lam, "v")) < 1e-12
    assert float(D.diffusion_loss(eps, x0, eps, lam, "x0")) > 0.1
    with pytest.raises(ValueError):
        D.diffusion_loss(eps, x0, eps, lam, "score")


def test_x0_error_equals_snr_scaled_eps_error():
    """||x0_hat - x0||^2 = (sigma/alpha)^2 ||eps_hat - eps||^2, i.e. eps-MSE is Eq. 2 with w_t = SNR(t)."""
    x0, eps, t = _batch(seed=5)
    lam = D.log_snr_cosine(t)
    x_t = D.q_sample(x0, lam, eps)
    eps_hat = eps + 0.2 * torch.randn_like(eps)
    x0_hat = D.eps_to_x0(x_t, eps_hat, lam)
    alpha, sigma = D.alpha_sigma(lam)
    err_x0 = ((x0_hat - x0) ** 2).flatten(1).sum(1)
    err_eps = ((eps_hat - eps) ** 2).flatten(1).sum(1)
    torch.testing.assert_close(err_x0, (sigma / alpha) ** 2 * err_eps, rtol=1e-9, atol=1e-12)
    # so weighting the eps-MSE by 1/SNR gives the x0-MSE, in diffusion_loss's own terms
    snr = torch.exp(lam)
    torch.testing.assert_close(
        D.diffusion_loss(eps_hat, x0, eps, lam, "eps", weight=1 / snr),
        D.diffusion_loss(x0_hat, x0, eps, lam, "x0").double(), rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------------------------
# Sampling steps
# ----------------------------------------------------------------------------------------------
def _posterior(x0, x_t, abar_t, abar_s):
    """q(x_s | x_t, x0) by Gaussian conditioning of the joint of (x_s, x_t) given x0 (independent of Eq. 4's form)."""
    a_ts = abar_t / abar_s
    var_s, var_t = 1 - abar_s, 1 - abar_t
    cov = a_ts.sqrt() * var_s  # Cov(x_t, x_s | x0), since x_t = sqrt(a_ts) x_s + sqrt(1 - a_ts) e
    b = lambda v: v[:, None, None, None]  # noqa: E731
    mean = b(abar_s.sqrt()) * x0 + b(cov / var_t) * (x_t - b(abar_t.sqrt()) * x0)
    var = var_s - cov**2 / var_t
    return mean, var


@pytest.mark.parametrize("name", SCHEDULES)
def test_ddpm_step_mean_is_analytic_posterior_mean(name):
    x0, eps, t = _batch(seed=6)
    s = t * 0.7
    lt, ls = D.get_schedule(name)(t), D.get_schedule(name)(s)
    x_t = D.q_sample(x0, lt, eps)
    mean, _ = _posterior(x0, x_t, torch.sigmoid(lt), torch.sigmoid(ls))
    got = D.ddpm_step(x_t, x0, lt, ls, torch.zeros_like(x0))
    torch.testing.assert_close(got, mean, rtol=1e-9, atol=1e-9)


def test_ddpm_step_noise_scale_is_posterior_std_and_empirical_variance_matches():
    g = torch.Generator().manual_seed(7)
    t = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64)
    s = torch.tensor([0.2, 0.4, 0.85], dtype=torch.float64)
    lt, ls = D.log_snr_cosine(t), D.log_snr_cosine(s)
    x0 = torch.rand(3, 1, 1, 1, generator=g, dtype=torch.float64) * 2 - 1
    x_t = D.q_sample(x0, lt, torch.randn(3, 1, 1, 1, generator=g, dtype=torch.float64))
    _, var = _posterior(x0, x_t, torch.sigmoid(lt), torch.sigmoid(ls))
    # exact: the step is linear in the noise with coefficient sqrt(var)
    zero = D.ddpm_step(x_t, x0, lt, ls, torch.zeros_like(x0))
    one = D.ddpm_step(x_t, x0, lt, ls, torch.ones_like(x0))
    torch.testing.assert_close((one - zero).flatten(), var.sqrt(), rtol=1e-9, atol=1e-12)
    # empirical: many noise draws through ddpm_step itself
    n = 20000
    rep = torch.arange(3).repeat(n)
    noise = torch.randn(3 * n, 1, 1, 1, generator=g, dtype=torch.float64)
    samples = D.ddpm_step(x_t[rep], x0[rep], lt[rep], ls[rep], noise).reshape(n, 3)
    emp_var = samples.var(0)
    emp_mean = samples.mean(0)
    assert torch.all((emp_mean - zero.flatten()).abs() < 5 * (var / n).sqrt())
    # relative standard error of a sample variance is sqrt(2/n) ~ 1%; allow 5 sigma
    assert torch.all((emp_var / var - 1).abs() < 5 * (2 / n) ** 0.5)


@pytest.mark.parametrize("name", SCHEDULES)
def test_ddim_eta0_with_true_x0_and_eps_lands_exactly_on_q_sample_at_s(name):
    x0, eps, t = _batch(seed=8)
    s = t * 0.5
    lt, ls = D.get_schedule(name)(t), D.get_schedule(name)(s)
    x_t = D.q_sample(x0, lt, eps)
    got = D.ddim_step(x_t, x0, eps, lt, ls, eta=0.0)
    torch.testing.assert_close(got, D.q_sample(x0, ls, eps), rtol=1e-9, atol=1e-9)


def test_ddim_eta1_noise_scale_equals_ddpm_posterior_std_and_requires_noise():
    x0, eps, t = _batch(seed=9)
    s = t * 0.5
    lt, ls = D.log_snr_cosine(t), D.log_snr_cosine(s)
    x_t = D.q_sample(x0, lt, eps)
    _, var = _posterior(x0, x_t, torch.sigmoid(lt), torch.sigmoid(ls))
    zero = D.ddim_step(x_t, x0, eps, lt, ls, torch.zeros_like(x0), eta=1.0)
    one = D.ddim_step(x_t, x0, eps, lt, ls, torch.ones_like(x0), eta=1.0)
    torch.testing.assert_close((one - zero)[:, 0, 0, 0], var.sqrt(), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="noise"):
        D.ddim_step(x_t, x0, eps, lt, ls, None, eta=1.0)


def test_dynamic_threshold_output_in_unit_interval_and_identity_on_small_inputs():
    g = torch.Generator().manual_seed(10)
    small = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1  # |x| <= 1
    assert torch.equal(D.dynamic_threshold(small, 0.995), small)
    big = torch.randn(4, 3, 8, 8, generator=g) * 5
    out = D.dynamic_threshold(big, 0.995)
    assert out.abs().max() <= 1.0 + 1e-6
    assert D.dynamic_threshold(big, 1.0).abs().max() <= 1.0
    torch.testing.assert_close(D.dynamic_threshold(big, 1.0), big.clamp(-1, 1))


def test_dynamic_threshold_rescales_by_numpy_percentile_per_sample():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64)
    x[0] *= 6.0   # large: s > 1
    x[1] *= 0.2   # small: s clamped to 1, unchanged
    x[2] *= 3.0
    p = 0.9
    out = D.dynamic_threshold(x, p)
    for i in range(3):
        s = max(float(np.percentile(np.abs(x[i].numpy()), p * 100)), 1.0)
        expected = np.clip(x[i].numpy(), -s, s) / s
        # (the percentile is computed in float32 inside, hence the float32-level tolerance)
        np.testing.assert_allclose(out[i].numpy(), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(out[1], x[1])
    assert float(out[0].abs().max()) == pytest.approx(1.0)


def test_sampling_times_endpoints_and_strictly_decreasing():
    for n in (1, 4, 37):
        ts = D.sampling_times(n)
        assert ts.shape == (n + 1,)
        assert float(ts[0]) == 1.0 and float(ts[-1]) == 0.0
        assert torch.all(ts[1:] < ts[:-1])
    with pytest.raises(ValueError):
        D.sampling_times(0)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_min_snr_weight_is_min_snr_gamma_in_x0_terms(prediction):
    """Weighted own-parameterisation MSE == min(SNR, gamma) * ||x0_hat - x0||^2 for every parameterisation,
    with a perturbed prediction (so the errors are not zero)."""
    from reimagen.diffusion.gaussian import diffusion_loss, min_snr_weight, to_x0, v_from

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 3, 8, 8, generator=g), torch.randn(6, 3, 8, 8, generator=g)
    lt = torch.linspace(-6, 6, 6)  # SNR from 0.0025 to 403: both sides of gamma = 5
    x_t = D.q_sample(x0, lt, noise)
    target = {"eps": noise, "x0": x0, "v": v_from(x0, noise, lt)}[prediction]
    pred = target + 0.1 * torch.randn(target.shape, generator=g)
    w = min_snr_weight(lt, 5.0, prediction)
    x0_err = ((to_x0(pred, x_t, lt, prediction) - x0) ** 2).flatten(1).mean(1)
    expected = (torch.clamp(lt.exp(), max=5.0) * x0_err).mean()
    torch.testing.assert_close(diffusion_loss(pred, x0, noise, lt, prediction, w), expected, rtol=1e-4, atol=1e-6)
    uncapped = min_snr_weight(lt, 1e9, prediction)
    torch.testing.assert_close(w[:3], uncapped[:3])  # SNR < gamma: untouched
    torch.testing.assert_close(w[-1] / uncapped[-1], 5.0 / lt[-1].exp())  # SNR > gamma: capped


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_min_snr_plus_one_is_min_snr_gamma_plus_one_in_x0_terms(prediction):
    """The +1 variant: weighted MSE == (min(SNR, gamma) + 1) * ||x0_hat - x0||^2; for v its multiplier tends to
    1 (the plain v loss) at high noise, where plain Min-SNR's tends to 0."""
    from reimagen.diffusion.gaussian import diffusion_loss, min_snr_weight, to_x0, v_from

    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(6, 3, 8, 8, generator=g), torch.randn(6, 3, 8, 8, generator=g)
    lt = torch.linspace(-6, 6, 6)
    x_t = D.q_sample(x0, lt, noise)
    target = {"x0": x0, "v": v_from(x0, noise, lt)}[prediction]
    pred = target + 0.1 * torch.randn(target.shape, generator=g)
    w = min_snr_weight(lt, 5.0, prediction, plus_one=True)
    x0_err = ((to_x0(pred, x_t, lt, prediction) - x0) ** 2).flatten(1).mean(1)
    expected = ((torch.clamp(lt.exp(), max=5.0) + 1) * x0_err).mean()
    torch.testing.assert_close(diffusion_loss(pred, x0, noise, lt, prediction, w), expected, rtol=1e-4, atol=1e-6)
    if prediction == "v":
        assert float(w[0]) > 0.99 and float(min_snr_weight(lt, 5.0, "v")[0]) < 0.01  # SNR 0.0025
    with pytest.raises(ValueError, match="v or x0"):
        min_snr_weight(lt, 5.0, "eps", plus_one=True)


def test_min_snr_gamma_must_not_be_negative():
    from reimagen.training.train import TrainConfig

    with pytest.raises(ValueError, match="min_snr_gamma"):
        TrainConfig(min_snr_gamma=-1.0)
