"""Properties of sampling and the cascade (reimagen/sampling.py, reimagen/cascade.py): per-sample seeding
independent of batch composition, one batched forward per step with exactly the guidance branches needed,
the neighbour cache computed once per sample and stage, and input validation."""

import inspect

import pytest
import torch

from conftest import make_model, randomize
from reimagen.pipelines.cascade import Cascade, Neighbours, Stage
from reimagen.models.config import get_preset
from reimagen.diffusion.guidance import InterleavedGuidance, JointGuidance, WeightedGuidance
from reimagen.pipelines.sampling import NonFiniteError, SamplerSettings, make_generators, sample_stage
from reimagen.utils.seeding import sample_seed
from reimagen.models.text import TinyTextEncoder
from reimagen.models.unet import ReImagenUNet

ATOL = 1e-5
PROMPTS = ["a red dog on grass", "a blue bird in a tree", "a green house at night"]


@pytest.fixture
def enc(text_encoder):
    return text_encoder


@pytest.fixture
def base():
    return randomize(make_model("tiny-16", seed=0), std=0.05, seed=1)


@pytest.fixture
def sr():
    return randomize(make_model("tiny-sr32", seed=0), std=0.05, seed=2)


def _neighbours(n=3, k=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.rand(n, k, 3, size, size, generator=g) * 2 - 1
    texts = [[f"reference {i} view {j}" for j in range(k)] for i in range(n)]
    return Neighbours(imgs, texts)


def _base_stage(model, guidance=None, steps=4, sampler="ddpm"):
    return Stage(model, guidance=guidance or InterleavedGuidance(w_p=3.0, w_n=2.0, eta=0.5),
                 settings=SamplerSettings(steps=steps, sampler=sampler))


def _rows(out, order, ref_order):
    return out[[order.index(p) for p in ref_order]]


# ----------------------------------------------------------------------------------------------
# Seeding: an image is a function of (prompt id, sample index, seed) alone
# ----------------------------------------------------------------------------------------------
def test_sample_seed_depends_on_every_key_component():
    ref = sample_seed(0, "p", 0, 0, "noise")
    others = [sample_seed(1, "p", 0, 0, "noise"), sample_seed(0, "q", 0, 0, "noise"), sample_seed(0, "p", 1, 0, "noise"),
              sample_seed(0, "p", 0, 1, "noise"), sample_seed(0, "p", 0, 0, "guidance")]
    assert ref == sample_seed(0, "p", 0, 0, "noise")
    assert len(set(others + [ref])) == 6
    assert all(0 <= s < 2**63 for s in others)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_interleaved_sample_independent_of_batch_composition(base, enc, sampler):
    nb = _neighbours()
    cascade = Cascade([_base_stage(base, steps=4, sampler=sampler)], enc)
    full = cascade.sample(PROMPTS, nb, seed=7).images
    assert full.shape == (3, 3, 16, 16) and full.min() >= 0 and full.max() <= 1
    alone = cascade.sample([PROMPTS[2]], nb.index([2]), seed=7).images
    torch.testing.assert_close(alone[0], full[2], atol=ATOL, rtol=0)
    order = [1, 2, 0]
    shuffled = cascade.sample([PROMPTS[i] for i in order], nb.index(order), seed=7).images
    torch.testing.assert_close(shuffled[[order.index(i) for i in range(3)]], full, atol=ATOL, rtol=0)
    chunked = cascade.sample(PROMPTS, nb, seed=7, batch_size=1).images
    torch.testing.assert_close(chunked, full, atol=ATOL, rtol=0)
    # the rows are not trivially equal to each other
    assert (full[0] - full[1]).abs().max() > 1e-2


def test_two_stage_cascade_sample_independent_of_batch_composition(base, sr, enc):
    nb = _neighbours(size=32, seed=3)
    cascade = Cascade([_base_stage(base, steps=3),
                       Stage(sr, guidance=InterleavedGuidance(w_p=2.0, w_n=2.0, eta=0.5),
                             settings=SamplerSettings(steps=2, aug_level=0.2))], enc)
    full = cascade.sample(PROMPTS, nb, seed=1, return_stages=True)
    assert full.images.shape == (3, 3, 32, 32)
    assert [s.shape for s in full.stages] == [(3, 3, 16, 16), (3, 3, 32, 32)]
    torch.testing.assert_close(full.stages[-1], full.images)
    alone = cascade.sample([PROMPTS[2]], nb.index([2]), seed=1).images
    torch.testing.assert_close(alone[0], full.images[2], atol=ATOL, rtol=0)
    order = [1, 2, 0]
    shuffled = cascade.sample([PROMPTS[i] for i in order], nb.index(order), seed=1).images
    torch.testing.assert_close(shuffled[[order.index(i) for i in range(3)]], full.images, atol=ATOL, rtol=0)
    chunked = cascade.sample(PROMPTS, nb, seed=1, batch_size=1).images
    torch.testing.assert_close(chunked, full.images, atol=ATOL, rtol=0)


def test_different_sample_indices_and_seeds_give_different_images(base, enc):
    nb = _neighbours(n=1)
    nb2 = Neighbours(nb.images.repeat(2, 1, 1, 1, 1), nb.texts * 2)
    cascade = Cascade([_base_stage(base, steps=3)], enc)
    two = cascade.sample([PROMPTS[0]] * 2, nb2, seed=0, sample_indices=[0, 1]).images
    assert (two[0] - two[1]).abs().max() > 1e-2
    again = cascade.sample([PROMPTS[0]], nb, seed=0, sample_indices=[1]).images
    torch.testing.assert_close(again[0], two[1], atol=ATOL, rtol=0)  # reproducible
    other_seed = cascade.sample([PROMPTS[0]], nb, seed=1, sample_indices=[1]).images
    assert (other_seed[0] - two[1]).abs().max() > 1e-2
    # explicit prompt ids: the same id gives the same image, whatever the prompt's position
    a = cascade.sample(["x", PROMPTS[0]], nb2, seed=0, prompt_ids=["other", "id0"]).images
    b = cascade.sample([PROMPTS[0]], nb, seed=0, prompt_ids=["id0"]).images
    torch.testing.assert_close(a[1], b[0], atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------
# One batched forward per step, with exactly the branches the guidance needs
# ----------------------------------------------------------------------------------------------
def _spy_forward(model, monkeypatch):
    calls = []
    orig = model.forward
    sig = inspect.signature(orig)

    def spy(*a, **kw):
        args = sig.bind(*a, **kw)
        args.apply_defaults()
        v = args.arguments
        calls.append({"b": v["x_t"].shape[0], "t": v["t"].clone(), "drop_text": v["drop_text"].clone(),
                      "drop_nbr": v["drop_neighbours"].clone(), "neighbours": v["neighbours"]})
        return orig(*a, **kw)

    monkeypatch.setattr(model, "forward", spy)
    return calls


@pytest.mark.parametrize("guidance,nb", [
    (InterleavedGuidance(w_p=3.0, w_n=3.0, eta=0.5), 2),
    (WeightedGuidance(w_p=3.0, w_n=3.0, lam=0.5), 3),
    (JointGuidance(w=1.0), 1),
    (JointGuidance(w=2.0), 2),
])
def test_one_batched_forward_per_step_with_num_branches_rows_per_sample(base, enc, monkeypatch, guidance, nb):
    calls = _spy_forward(base, monkeypatch)
    steps, b = 5, 3
    Cascade([_base_stage(base, guidance=guidance, steps=steps)], enc).sample(PROMPTS, _neighbours(k=2), seed=0)
    assert len(calls) == steps
    assert all(c["b"] == nb * b for c in calls)
    for c in calls:
        assert torch.all(c["drop_text"][:b] == False) and torch.all(c["drop_nbr"][:b] == False)  # noqa: E712
    if isinstance(guidance, InterleavedGuidance):
        for c in calls:  # second slot: exactly one condition dropped per row
            assert torch.all(c["drop_text"][b:] ^ c["drop_nbr"][b:])
        picks = torch.stack([c["drop_text"][b:] for c in calls])
        assert picks.any() and not picks.all()  # both eps_p and eps_n were used at eta = 0.5
    # times run from 1 down, strictly decreasing, never reaching 0 inside the loop
    ts = [float(c["t"][0]) for c in calls]
    assert ts[0] == 1.0 and all(a > b_ for a, b_ in zip(ts, ts[1:])) and ts[-1] > 0


def test_text_only_joint_guidance_runs_without_neighbours_with_all_neighbours_dropped(base, enc, monkeypatch):
    calls = _spy_forward(base, monkeypatch)
    out = Cascade([_base_stage(base, guidance=JointGuidance(w=2.0, use_neighbours=False), steps=3)], enc).sample(PROMPTS)
    assert out.images.shape == (3, 3, 16, 16)
    assert len(calls) == 3
    for c in calls:
        assert c["neighbours"] is None and torch.all(c["drop_nbr"])
        assert c["drop_text"].tolist() == [False] * 3 + [True] * 3


@pytest.mark.parametrize("n_stages", [1, 2])
def test_neighbours_encoded_once_per_sample_and_stage_not_per_step(base, sr, enc, monkeypatch, n_stages):
    models = [base, sr][:n_stages]
    counts = {id(m): {"encode": [], "dstack_t0": 0, "dstack": 0} for m in models}
    for m in models:
        rec = counts[id(m)]
        orig_enc, orig_ds = m.encode_neighbours, m.dstack.forward

        def enc_spy(images, *a, _o=orig_enc, _r=rec, **kw):
            _r["encode"].append(images.shape[:2])
            return _o(images, *a, **kw)

        def ds_spy(x, t, *a, _o=orig_ds, _r=rec, **kw):
            _r["dstack"] += 1
            _r["dstack_t0"] += int(bool(torch.all(t == 0)))
            return _o(x, t, *a, **kw)

        monkeypatch.setattr(m, "encode_neighbours", enc_spy)
        monkeypatch.setattr(m.dstack, "forward", ds_spy)
    stages = [_base_stage(base, steps=4)]
    if n_stages == 2:
        stages.append(Stage(sr, guidance=InterleavedGuidance(), settings=SamplerSettings(steps=3)))
    Cascade(stages, enc).sample(PROMPTS, _neighbours(k=2, size=32), seed=0)
    for m, st in zip(models, stages):
        rec = counts[id(m)]
        assert rec["encode"] == [(3, 2)]  # one call for the whole batch: B rows, K = 2
        assert rec["dstack_t0"] == 1  # the neighbour encoding, at t = 0
        assert rec["dstack"] == st.settings.steps + 1  # plus one batched call per step


# ----------------------------------------------------------------------------------------------
# Failures
# ----------------------------------------------------------------------------------------------
def test_nan_model_output_raises_non_finite_error_naming_the_step(base, enc, monkeypatch):
    orig = base.forward
    n = {"calls": 0}

    def nan_at_3(*a, **kw):
        n["calls"] += 1
        out = orig(*a, **kw)
        return torch.full_like(out, float("nan")) if n["calls"] == 3 else out

    monkeypatch.setattr(base, "forward", nan_at_3)
    with pytest.raises(NonFiniteError, match=r"step 3/6"):
        Cascade([_base_stage(base, steps=6)], enc).sample(PROMPTS, _neighbours(), seed=0)
    assert n["calls"] == 3  # stopped right there


def test_guidance_needing_neighbours_without_neighbours_raises(base, enc):
    with pytest.raises(ValueError, match="needs neighbours"):
        Cascade([_base_stage(base)], enc).sample(PROMPTS, None)
    with pytest.raises(ValueError, match="needs neighbours"):
        Cascade([_base_stage(base, guidance=WeightedGuidance())], enc).sample(PROMPTS, None)
    # a stage built without neighbour attention cannot serve neighbour guidance either
    plain = make_model("tiny-16", neighbour_attention=False)
    e = enc.encode(PROMPTS)
    tc = plain.project_text(e.embeddings, e.mask)
    gens = make_generators(0, PROMPTS, [0] * 3, 0, "noise")
    with pytest.raises(ValueError, match="needs neighbours"):
        sample_stage(plain, tc, None, InterleavedGuidance(), SamplerSettings(steps=2), gens, gens)


def test_interleave_eta_outside_unit_interval_rejected():
    for eta in (-0.01, 1.01):
        with pytest.raises(ValueError, match="eta"):
            InterleavedGuidance(eta=eta)


def test_ddim_eta_outside_unit_interval_rejected():
    with pytest.raises(ValueError, match="eta"):
        SamplerSettings(sampler="ddim", ddim_eta=1.5)
    with pytest.raises(ValueError, match="eta"):
        SamplerSettings(sampler="ddim", ddim_eta=-0.5)


def test_sampler_settings_validation():
    with pytest.raises(ValueError, match="steps"):
        SamplerSettings(steps=0)
    with pytest.raises(ValueError, match="sampler"):
        SamplerSettings(sampler="euler")
    with pytest.raises(ValueError, match="aug_level"):
        SamplerSettings(aug_level=1.5)


def test_sample_stage_needs_one_generator_per_sample_and_sr_needs_lowres(base, sr, enc):
    e = enc.encode(PROMPTS)
    tc = base.project_text(e.embeddings, e.mask)
    gens = make_generators(0, PROMPTS, [0] * 3, 0, "noise")
    with pytest.raises(ValueError, match="generator"):
        sample_stage(base, tc, None, JointGuidance(use_neighbours=False), SamplerSettings(steps=2), gens[:2], gens)
    tc_sr = sr.project_text(e.embeddings, e.mask)
    with pytest.raises(ValueError, match="low-resolution"):
        sample_stage(sr, tc_sr, None, JointGuidance(use_neighbours=False), SamplerSettings(steps=2), gens, gens)
    with pytest.raises(ValueError, match="batch length mismatch"):
        sample_stage(sr, tc_sr, None, JointGuidance(use_neighbours=False), SamplerSettings(steps=2), gens, gens,
                     lowres=torch.zeros(2, 3, 16, 16))


# ----------------------------------------------------------------------------------------------
# Cascade and Neighbours validation
# ----------------------------------------------------------------------------------------------
def test_cascade_rejects_mismatched_stage_resolutions(base, enc):
    sr8 = ReImagenUNet(get_preset("tiny-sr32", lowres_size=8))
    with pytest.raises(ValueError, match="8px"):
        Cascade([Stage(base), Stage(sr8)], enc)
    sr = ReImagenUNet(get_preset("tiny-sr32"))
    with pytest.raises(ValueError, match="first stage"):
        Cascade([Stage(sr)], enc)
    with pytest.raises(ValueError, match="at least one"):
        Cascade([], enc)
    Cascade([Stage(base), Stage(sr)], enc)  # 16 -> 32 chains


def test_cascade_rejects_text_encoder_dim_mismatch(base):
    with pytest.raises(ValueError, match="16-d"):
        Cascade([Stage(base)], TinyTextEncoder(dim=16))


def test_cascade_sample_rejects_mismatched_lengths(base, enc):
    cascade = Cascade([_base_stage(base, steps=2)], enc)
    with pytest.raises(ValueError, match="batch length mismatch"):
        cascade.sample(PROMPTS, _neighbours(n=2))
    with pytest.raises(ValueError, match="batch length mismatch"):
        cascade.sample(PROMPTS, _neighbours(), sample_indices=[0, 1])


def test_neighbours_rejects_zero_k_and_mismatched_texts():
    with pytest.raises(ValueError, match="K = 0"):
        Neighbours(torch.zeros(2, 0, 3, 16, 16), [[], []])
    with pytest.raises(ValueError, match="texts"):
        Neighbours(torch.zeros(2, 2, 3, 16, 16), [["a", "b"]])  # 1 list for 2 rows
    with pytest.raises(ValueError, match="texts"):
        Neighbours(torch.zeros(2, 2, 3, 16, 16), [["a", "b"], ["c"]])  # K mismatch in a row
    with pytest.raises(ValueError):
        Neighbours(torch.zeros(2, 3, 16, 16), [["a"], ["b"]])  # not 5-d


def test_neighbours_at_size_resizes_and_from_pairs_builds_rows():
    nb = _neighbours(n=2, k=2, size=32)
    small = nb.at_size(16)
    assert small.shape == (2, 2, 3, 16, 16)
    assert torch.equal(nb.at_size(32), nb.images)
    const = Neighbours(torch.full((1, 1, 3, 32, 32), 0.25), [["c"]])
    torch.testing.assert_close(const.at_size(16), torch.full((1, 1, 3, 16, 16), 0.25))
    import numpy as np
    arr = np.full((20, 30, 3), 255, dtype=np.uint8)
    built = Neighbours.from_pairs([[(arr, "white"), (torch.zeros(3, 8, 8), "grey")]], size=16)
    assert built.images.shape == (1, 2, 3, 16, 16) and built.texts == [["white", "grey"]]
    torch.testing.assert_close(built.images[0, 0], torch.ones(3, 16, 16))
    torch.testing.assert_close(built.images[0, 1], torch.zeros(3, 16, 16))


# ----------------------------------------------------------------------------------------------
# The last step
# ----------------------------------------------------------------------------------------------
def test_one_step_sample_is_the_thresholded_x0_prediction_from_pure_noise(base, enc):
    """With one step the sample is dynamic_threshold(Eq. 3 x0_hat) at t = 1 from the sample's own initial noise."""
    from reimagen.diffusion.gaussian import dynamic_threshold, eps_to_x0, get_schedule
    e = enc.encode(PROMPTS)
    with torch.no_grad():
        tc = base.project_text(e.embeddings, e.mask)
    pids, idx = ["p0", "p1", "p2"], [0, 0, 0]
    settings = SamplerSettings(steps=1, threshold=0.9)
    out = sample_stage(base, tc, None, JointGuidance(w=1.0, use_neighbours=False), settings,
                       make_generators(3, pids, idx, 0, "noise"), make_generators(3, pids, idx, 0, "guidance"))
    gens = make_generators(3, pids, idx, 0, "noise")
    x_T = torch.stack([torch.randn(3, 16, 16, generator=g) for g in gens])
    t = torch.ones(3)
    with torch.no_grad():
        eps = base(x_T, t, tc, None, drop_neighbours=torch.ones(3, dtype=torch.bool))
    expected = dynamic_threshold(eps_to_x0(x_T, eps, get_schedule(base.cfg.schedule)(t)), 0.9)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)


def test_sdedit_one_step_is_the_x0_prediction_from_the_init_noised_by_eq1(base, enc):
    """start_t < 1: x_t = Eq. 1 of the init image at start_t with the sample's own initial noise; one step lands
    on the (thresholded) x0 prediction at start_t. Init images and start_t come together, of the stage's shape."""
    from reimagen.diffusion.gaussian import dynamic_threshold, eps_to_x0, get_schedule, q_sample
    e = enc.encode(PROMPTS)
    with torch.no_grad():
        tc = base.project_text(e.embeddings, e.mask)
    pids, idx = ["p0", "p1", "p2"], [0, 0, 0]
    init = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 1.6 - 0.8
    g = JointGuidance(w=1.0, use_neighbours=False)

    def run(settings, init):
        return sample_stage(base, tc, None, g, settings, make_generators(3, pids, idx, 0, "noise"),
                            make_generators(3, pids, idx, 0, "guidance"), init=init)

    out = run(SamplerSettings(steps=1, sampler="ddpm", threshold=0.9, start_t=0.3), init)
    z = torch.stack([torch.randn(3, 16, 16, generator=gen) for gen in make_generators(3, pids, idx, 0, "noise")])
    t = torch.full((3,), 0.3)
    lt = get_schedule(base.cfg.schedule)(t)
    x_t = q_sample(init, lt, z)
    with torch.no_grad():
        eps = base(x_t, t, tc, None, drop_neighbours=torch.ones(3, dtype=torch.bool))
    torch.testing.assert_close(out, dynamic_threshold(eps_to_x0(x_t, eps, lt), 0.9), atol=ATOL, rtol=0)
    # from a time near 0 the image is barely touched; from t = 1 (no init) it is not the init at all
    near = run(SamplerSettings(steps=2, sampler="ddim", start_t=0.02), init)
    assert (near - init).abs().mean() < 0.05
    assert (run(SamplerSettings(steps=2, sampler="ddim"), None) - init).abs().mean() > 0.3
    with pytest.raises(ValueError, match="init images exactly when start_t < 1"):
        run(SamplerSettings(steps=2, sampler="ddim", start_t=0.5), None)
    with pytest.raises(ValueError, match="init images exactly when start_t < 1"):
        run(SamplerSettings(steps=2), init)
    with pytest.raises(ValueError, match="init images must be"):
        run(SamplerSettings(steps=2, sampler="ddim", start_t=0.5), init[:, :, :8, :8])
    with pytest.raises(ValueError, match="start_t"):
        SamplerSettings(sampler="ddim", start_t=0.0)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samples_lie_in_unit_box_after_thresholding(base, enc, sampler):
    e = enc.encode(PROMPTS)
    with torch.no_grad():
        tc = base.project_text(e.embeddings, e.mask)
    gens = lambda s: make_generators(0, PROMPTS, [0, 1, 2], 0, s)  # noqa: E731
    out = sample_stage(base, tc, None, JointGuidance(w=4.0, use_neighbours=False),
                       SamplerSettings(steps=4, sampler=sampler), gens("noise"), gens("guidance"))
    assert out.shape == (3, 3, 16, 16)
    assert float(out.abs().max()) <= 1.0 + 1e-6
