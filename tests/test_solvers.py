"""The library solvers (reimagen/diffusion/solvers.py) behind the guided denoiser: the adapter equals the native
DDIM on a known case, the solvers integrate the probability-flow ODE of a case with an exact denoiser, and the
properties sampling promises (per-sample seeding, every prediction type and stage kind) hold with them."""

import pytest
import torch

from conftest import make_model, randomize
from reimagen.diffusion.gaussian import ddim_step, eps_to_x0, get_schedule, sampling_times
from reimagen.diffusion.guidance import InterleavedGuidance
from reimagen.diffusion.solvers import GRID, SAMPLERS, LibrarySolver, check_sampler
from reimagen.models.text import TinyTextEncoder
from reimagen.pipelines.sampling import SamplerSettings, make_generators, sample_stage

PROMPTS = ["a red dog on grass", "a blue bird in a tree", "a green house at night"]


def _run(model, sampler, steps, prompts=PROMPTS, pids=None, threshold=0.995):
    enc = TinyTextEncoder(dim=model.cfg.text_dim, seed=0).eval()
    with torch.no_grad():
        e = enc.encode(prompts)
        tc = model.project_text(e.embeddings, e.mask)
        g = torch.Generator().manual_seed(0)
        size, rows = model.cfg.image_size, [PROMPTS.index(p) for p in prompts]  # a prompt's inputs are its own
        nbr_imgs = (torch.rand(len(PROMPTS), 2, 3, size, size, generator=g) * 2 - 1)[rows]
        ne = enc.encode([f"reference {i} view {j}" for i in rows for j in range(2)])
        mem = model.encode_neighbours(nbr_imgs, model.project_text(ne.embeddings, ne.mask))
        lowres = None
        if model.cfg.is_super_resolution:
            lo = model.cfg.lowres_size
            lowres = (torch.rand(len(PROMPTS), 3, lo, lo, generator=g) * 2 - 1)[rows]
        pids = pids or [f"p{i}" for i in range(len(prompts))]
        idx = [0] * len(prompts)
        guidance = InterleavedGuidance(w_p=3.0, w_n=2.0, eta=0.5)
        return sample_stage(model, tc, mem, guidance, SamplerSettings(steps=steps, sampler=sampler, threshold=threshold),
                            make_generators(0, pids, idx, 0, "noise"), make_generators(0, pids, idx, 0, "guidance"),
                            lowres=lowres)


@pytest.mark.parametrize("preset,overrides", [("tiny-16", {}), ("tiny-16", {"prediction": "v"}),
                                              ("tiny-sr32", {})])
def test_diffusers_ddim_through_the_adapter_equals_the_native_ddim(preset, overrides):
    """The adapter on a known case: diffusers' DDIMScheduler, given the stage's schedule on the grid, takes the
    native DDIM's steps (10 divides the grid) with interleaved guidance, thresholding, v-prediction and SR."""
    model = randomize(make_model(preset, seed=0, **overrides), std=0.05, seed=1)
    native = _run(model, "ddim", 10)
    library = _run(model, "ddim-diffusers", 10)
    assert torch.isfinite(native).all()
    assert (native - library).abs().max() < 1e-4  # float32 roundoff: the scheduler's alpha_bar is a cumprod


def test_solver_times_are_the_native_times_when_the_steps_divide_the_grid():
    solver = LibrarySolver("dpmpp-2m", get_schedule("cosine"), 25)
    assert torch.allclose(solver.times, sampling_times(25)[:-1], atol=1e-6)
    assert len(solver.times) == 25  # one network evaluation per step


def _gaussian_case(n=64, seed=0):
    """Data x0 ~ N(mu, s^2) per pixel: the exact eps of Eq. 1 is known, so is the probability-flow ODE."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.rand(1, 3, 4, 4, generator=g) - 0.5
    s = 0.3

    def eps_exact(x, log_snr):
        a, sig = torch.sigmoid(log_snr).sqrt().view(-1, 1, 1, 1), torch.sigmoid(-log_snr).sqrt().view(-1, 1, 1, 1)
        x0 = mu + a * s**2 / (a**2 * s**2 + sig**2) * (x - a * mu)  # E[x0 | x_t]
        return (x - a * x0) / sig

    return torch.randn(n, 3, 4, 4, generator=g), eps_exact


def _native_ddim(x, eps_exact, log_snr, steps):
    times = sampling_times(steps)
    for i in range(steps):
        lt, ls = log_snr(times[i].expand(len(x))), log_snr(times[i + 1].expand(len(x)))
        eps = eps_exact(x, lt)
        x0 = eps_to_x0(x, eps, lt)
        x = x0 if i == steps - 1 else ddim_step(x, x0, eps, lt, ls)
    return x


def _library(x, eps_exact, log_snr, name, steps):
    solver = LibrarySolver(name, log_snr, steps)
    for i in range(steps):
        lt = log_snr(solver.times[i].expand(len(x)))
        x = solver.step(eps_to_x0(x, eps_exact(x, lt), lt), i, x)
    return x


@pytest.mark.parametrize("name", ["dpmpp-2m", "unipc"])
def test_second_order_solvers_reach_the_ode_solution_in_few_steps(name):
    """On the exact denoiser, a 2nd-order solver lands closer to the ODE's solution (native DDIM at 1000 steps)
    than DDIM with as many steps, and its error shrinks faster with more steps (seen: 20 steps 0.007 against
    DDIM's 0.026, 50 steps 0.002 / 0.0009 against 0.010, data std 0.3)."""
    log_snr = get_schedule("cosine")
    x1, eps_exact = _gaussian_case()
    ref = _native_ddim(x1.clone(), eps_exact, log_snr, 1000)
    err = {n: float((_library(x1.clone(), eps_exact, log_snr, name, n) - ref).abs().mean()) for n in (10, 20)}
    ddim_err = float((_native_ddim(x1.clone(), eps_exact, log_snr, 20) - ref).abs().mean())
    assert err[20] < 0.4 * ddim_err, (err, ddim_err)
    assert err[20] < 0.3 * err[10]  # about 2nd order: halving the step cuts the error 4x (DDIM: 2x)


def test_the_sde_solver_samples_the_data_distribution_and_its_noise_is_the_samples_own():
    """DPM-Solver++ (2M SDE) on the exact denoiser of x0 ~ N(mu, 0.3^2): 30 steps from pure noise give samples
    with the data's mean and standard deviation (the ODE solvers too, but only the SDE needs fresh noise: same
    noise, same samples; other noise, other samples; no noise is refused)."""
    log_snr = get_schedule("cosine")
    x1, eps_exact = _gaussian_case(n=4000, seed=2)

    def run(noise_seed):
        g, x = torch.Generator().manual_seed(noise_seed), x1.clone()
        solver = LibrarySolver("dpmpp-2m-sde", log_snr, 30)
        for i in range(30):
            lt = log_snr(solver.times[i].expand(len(x)))
            x = solver.step(eps_to_x0(x, eps_exact(x, lt), lt), i, x, torch.randn(x.shape, generator=g))
        return x

    a, b = run(0), run(1)
    mu = _native_ddim(x1.clone(), eps_exact, log_snr, 200).mean(0)  # the ODE keeps the mean: E[x0] = mu
    assert (a.mean(0) - mu).abs().max() < 0.03  # 4,000 samples: standard error 0.3 / 63 = 0.005
    assert abs(float(a.std(0).mean()) - 0.3) < 0.015
    assert torch.equal(run(0), a) and (a - b).abs().mean() > 0.05
    with pytest.raises(ValueError, match="stochastic"):
        LibrarySolver("dpmpp-2m-sde", log_snr, 5).step(x1, 0, x1)


@pytest.mark.parametrize("sampler", ["dpmpp-2m", "unipc", "dpmpp-2m-sde"])
def test_a_sample_does_not_depend_on_the_rest_of_its_batch(sampler):
    model = randomize(make_model("tiny-16", seed=0), std=0.05, seed=1)
    full = _run(model, sampler, 6)
    alone = _run(model, sampler, 6, prompts=PROMPTS[1:2], pids=["p1"])
    assert torch.isfinite(full).all()
    assert (full[1:2] - alone).abs().max() < 1e-5  # the same row math; only the batch's GEMM blocking differs


def test_the_solvers_are_deterministic_and_differ_from_each_other():
    model = randomize(make_model("tiny-16", seed=0), std=0.05, seed=1)
    a, b = _run(model, "unipc", 5), _run(model, "unipc", 5)
    assert torch.equal(a, b)
    assert (a - _run(model, "dpmpp-2m", 5)).abs().max() > 1e-4


def test_bad_sampler_settings_are_named():
    with pytest.raises(ValueError, match="unknown sampler 'euler'.*dpmpp-2m"):
        SamplerSettings(steps=10, sampler="euler")
    with pytest.raises(ValueError, match=f"at most {GRID} steps"):
        SamplerSettings(steps=GRID + 1, sampler="unipc")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        check_sampler("dpmpp-2m", 0)
    with pytest.raises(ValueError, match="SDEdit.*not dpmpp-2m"):
        SamplerSettings(steps=10, sampler="dpmpp-2m", start_t=0.5)
    assert SamplerSettings(steps=2000, sampler="ddpm").steps == 2000  # the native samplers have no grid
    assert "ddim-diffusers" not in SAMPLERS  # the adapter's check is no sampler to choose


def test_sample_cli_records_the_solver_and_refuses_an_unknown_one(tmp_path):
    from typer.testing import CliRunner

    from reimagen.cli import app
    from reimagen.models.checkpoint import save_checkpoint

    model = make_model("tiny-16", seed=0)
    save_checkpoint(tmp_path / "base", model, TinyTextEncoder(dim=model.cfg.text_dim, seed=0))
    args = ["sample", "--checkpoint", str(tmp_path / "base"), "--prompt", "a red dog", "--no-retrieval",
            "--guidance", "joint", "--steps", "3", "--out", str(tmp_path / "run")]
    bad = CliRunner().invoke(app, args + ["--sampler", "euler"])
    assert bad.exit_code != 0 and not (tmp_path / "run").exists()
    ok = CliRunner().invoke(app, args + ["--sampler", "dpmpp-2m"])
    assert ok.exit_code == 0, ok.output
    run = (tmp_path / "run" / "run.json").read_text()
    assert "dpmpp-2m" in run
    assert (tmp_path / "run" / "p0000__0.png").is_file()



def test_bf16_on_a_cpu_without_native_bf16_is_allowed_with_a_warning(monkeypatch):
    import warnings

    from reimagen.utils import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(precision, "_WARNED", [])
    with pytest.warns(UserWarning, match="emulated"):
        assert precision.check_precision("bf16", "cpu") == "bf16"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(precision, "_WARNED", [])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision.check_precision("bf16", "cpu") == "bf16"


def test_the_prepared_gpu_check_runs_on_a_cpu_at_a_tiny_size():
    """benchmarks/gpu_check.sh is for a lent GPU; its --device cpu --tiny path keeps it from rotting."""
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    res = subprocess.run(["bash", str(repo / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--tiny",
                          "--no-compile", "--repeats", "1", "--steps", "2", "--batch", "2", "--train-batch", "2"],
                         capture_output=True, text=True, timeout=300, cwd=repo)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    names = [r.split("|")[1].strip() for r in rows]
    assert {"guided step, fp32", "guided step, bf16", "cascade sample, fp32", "cascade sample, bf16",
            "train step, bf16"} <= set(names), res.stdout


def test_the_sampling_speed_benchmark_runs_its_variants_against_fp32_eager():
    """benchmarks/sampling_speed.py at one step and one prompt: every variant but compilation (minutes on a CPU)
    runs on the shipped cascade, fp32 eager is the 1.00x baseline, and fp32 channels-last draws fp32's images."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import sampling_speed

    rows = sampling_speed.main(["--batch", "1", "--steps", "1", "--sr-steps", "1", "--repeats", "1",
                                "--variants", "fp32,fp32-channels-last,bf16"])
    assert [r["variant"] for r in rows] == ["fp32", "fp32-channels-last", "bf16"]
    assert all(r["images_per_s"] > 0 for r in rows)
    assert float((rows[1]["images"] - rows[0]["images"]).abs().max()) < 2e-3  # the same maths, another layout
