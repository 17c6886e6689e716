"""Properties of the Re-Imagen U-Net (reimagen/unet.py, Sec. 3.2, Fig. 3): shapes, validation, conditioning
dropout, the shared DStack for neighbours, the neighbour cache and batch-row independence."""

import inspect

import pytest
import torch

from conftest import make_model, randomize
from reimagen.models.unet import DStack

ATOL = 1e-5


def _text(model, enc, texts):
    e = enc.encode(texts)
    return model.project_text(e.embeddings, e.mask)


def _inputs(model, enc, b=3, k=2, seed=0, texts=None, nbr_texts=None):
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    s = cfg.image_size
    x = torch.randn(b, 3, s, s, generator=g)
    t = torch.rand(b, generator=g) * 0.9 + 0.05
    texts = texts or [f"prompt number {i} with a dog" for i in range(b)]
    nbr_texts = nbr_texts or [f"neighbour {i} {j} of a red house" for i in range(b) for j in range(k)]
    nimg = torch.rand(b, k, 3, s, s, generator=g) * 2 - 1
    return x, t, _text(model, enc, texts), nimg, _text(model, enc, nbr_texts)


@pytest.fixture
def rmodel():
    """tiny-16 with all parameters randomised, so every input path has a visible effect."""
    return randomize(make_model("tiny-16", seed=0), std=0.05, seed=1)


@pytest.fixture
def rsr(tiny_sr_model):
    return randomize(tiny_sr_model, std=0.05, seed=2)


@pytest.fixture
def enc(text_encoder):
    return text_encoder


def _sr_extra(model, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, 3, model.cfg.lowres_size, model.cfg.lowres_size, generator=g) * 2 - 1
    aug_t = torch.full((b,), 0.3)
    noise = torch.randn(b, 3, model.cfg.image_size, model.cfg.image_size, generator=g)
    return model.lowres_input(low, aug_t, noise), aug_t


# ----------------------------------------------------------------------------------------------
# Shapes and validation
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def test_output_shape_equals_input_shape_base_and_sr(rmodel, rsr, enc):
    x, t, tc, nimg, ntc = _inputs(rmodel, enc, b=2)
    out = rmodel(x, t, tc, rmodel.encode_neighbours(nimg, ntc))
    assert out.shape == x.shape and torch.isfinite(out).all()
    x, t, tc, nimg, ntc = _inputs(rsr, enc, b=2)
    low, aug_t = _sr_extra(rsr, 2)
    out = rsr(x, t, tc, rsr.encode_neighbours(nimg, ntc), lowres=low, aug_t=aug_t)
    assert out.shape == x.shape == (2, 3, 32, 32) and torch.isfinite(out).all()


@torch.no_grad()
def test_fresh_model_outputs_zero_because_output_conv_is_zero_initialised(tiny_model, enc):
    x, t, tc, nimg, ntc = _inputs(tiny_model, enc, b=2)
    out = tiny_model(x, t, tc, tiny_model.encode_neighbours(nimg, ntc))
    assert torch.count_nonzero(out) == 0


@torch.no_grad()
def test_wrong_image_size_rejected_mentioning_expected_size(rmodel, enc):
    x, t, tc, nimg, ntc = _inputs(rmodel, enc, b=2)
    mem = rmodel.encode_neighbours(nimg, ntc)
    with pytest.raises(ValueError, match=r"16, 16"):
        rmodel(torch.randn(2, 3, 32, 32), t, tc, mem)
    with pytest.raises(ValueError, match=r"16, 16"):
        rmodel.encode_neighbours(torch.randn(2, 2, 3, 8, 8), ntc)
    with pytest.raises(ValueError):
        rmodel(torch.randn(2, 1, 16, 16), t, tc, mem)  # wrong channel count


@torch.no_grad()
def test_mismatched_batch_lengths_rejected(rmodel, enc):
    x, t, tc, nimg, ntc = _inputs(rmodel, enc, b=3)
    mem = rmodel.encode_neighbours(nimg, ntc)
    with pytest.raises(ValueError, match="batch length mismatch"):
        rmodel(x, t[:2], tc, mem)
    with pytest.raises(ValueError, match="batch length mismatch"):
        rmodel(x, t, tc.index(torch.tensor([0, 1])), mem)
    with pytest.raises(ValueError, match="batch length mismatch"):
        rmodel(x, t, tc, mem.index(torch.tensor([0, 1])))
    with pytest.raises(ValueError, match="batch length mismatch"):
        rmodel(x, t, tc, mem, drop_text=torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch length mismatch"):
        rmodel(x, t, tc, mem, drop_neighbours=torch.zeros(4, dtype=torch.bool))
    # K texts per image: 3 x 2 images need 6 neighbour texts
    with pytest.raises(ValueError, match="neighbour texts"):
        rmodel.encode_neighbours(nimg, ntc.index(torch.arange(5)))


@torch.no_grad()
def test_zero_neighbours_rejected(rmodel, enc):
    _, _, _, _, ntc = _inputs(rmodel, enc, b=2)
    with pytest.raises(ValueError, match="K = 0"):
        rmodel.encode_neighbours(torch.zeros(2, 0, 3, 16, 16), ntc.index(torch.arange(0)))


@torch.no_grad()
def test_neighbour_model_without_neighbours_needs_all_rows_dropped(rmodel, enc):
    x, t, tc, _, _ = _inputs(rmodel, enc, b=3)
    with pytest.raises(ValueError, match="neighbours"):
        rmodel(x, t, tc, None)
    with pytest.raises(ValueError, match="neighbours"):
        rmodel(x, t, tc, None, drop_neighbours=torch.tensor([True, False, True]))
    out = rmodel(x, t, tc, None, drop_neighbours=torch.ones(3, dtype=torch.bool))
    assert out.shape == x.shape


@torch.no_grad()
def test_text_projection_rejects_wrong_text_dim(rmodel):
    with pytest.raises(ValueError, match="32"):
        rmodel.project_text(torch.randn(2, 4, 48), torch.ones(2, 4, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------
# Conditioning dropout
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def test_dropped_neighbours_make_output_independent_of_neighbour_content(rmodel, enc):
    x, t, tc, nimg, ntc = _inputs(rmodel, enc, b=3, seed=0)
    _, _, _, nimg2, ntc2 = _inputs(rmodel, enc, b=3, seed=5, nbr_texts=[f"other text {i}" for i in range(6)])
    mem1, mem2 = rmodel.encode_neighbours(nimg, ntc), rmodel.encode_neighbours(nimg2, ntc2)
    drop = torch.ones(3, dtype=torch.bool)
    a = rmodel(x, t, tc, mem1, drop_neighbours=drop)
    b = rmodel(x, t, tc, mem2, drop_neighbours=drop)
    none = rmodel(x, t, tc, None, drop_neighbours=drop)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    torch.testing.assert_close(a, none, atol=ATOL, rtol=0)  # dropped == sampled without retrieval
    # ...but kept neighbours matter
    c = rmodel(x, t, tc, mem1)
    d = rmodel(x, t, tc, mem2)
    assert (c - d).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    assert (c - a).abs().amax(dim=(1, 2, 3)).min() > 1e-3


@torch.no_grad()
def test_dropped_text_makes_output_independent_of_the_text(rmodel, enc):
    x, t, tc, nimg, ntc = _inputs(rmodel, enc, b=3)
    mem = rmodel.encode_neighbours(nimg, ntc)
    tc2 = _text(rmodel, enc, ["completely different words here and more of them", "x", "cat"])
    drop = torch.ones(3, dtype=torch.bool)
    a = rmodel(x, t, tc, mem, drop_text=drop)
    b = rmodel(x, t, tc2, mem, drop_text=drop)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    c = rmodel(x, t, tc, mem)
    d = rmodel(x, t, tc2, mem)
    assert (c - d).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    assert (c - a).abs().amax(dim=(1, 2, 3)).min() > 1e-3


@torch.no_grad()
def test_drop_masks_act_per_row(rmodel, enc):
    """Dropping a condition for one row equals running that row alone with the condition dropped."""
    x, t, tc, nimg, ntc = _inputs(rmodel, enc, b=4)
    mem = rmodel.encode_neighbours(nimg, ntc)
    dt = torch.tensor([True, False, True, False])
    dn = torch.tensor([False, False, True, True])
    mixed = rmodel(x, t, tc, mem, drop_text=dt, drop_neighbours=dn)
    for i in range(4):
        ones = torch.ones(4, dtype=torch.bool)
        zeros = ~ones
        ref = rmodel(x, t, tc, mem, drop_text=ones if dt[i] else zeros, drop_neighbours=ones if dn[i] else zeros)
        torch.testing.assert_close(mixed[i], ref[i], atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------
# Neighbours: the same DStack at t = 0, the cache, order invariance
# ----------------------------------------------------------------------------------------------
def test_neighbours_are_encoded_by_the_same_dstack_at_t_zero(rmodel, enc, monkeypatch):
    assert sum(isinstance(m, DStack) for m in rmodel.modules()) == 1  # one DStack: no separate neighbour encoder
    x, t, tc, nimg, ntc = _inputs(rmodel, enc, b=3, k=2)
    calls = []
    orig = rmodel.dstack.forward

    def spy(x_in, t_in, text, *args, **kwargs):
        calls.append((x_in.shape[0], t_in.clone(), x_in.clone()))
        return orig(x_in, t_in, text, *args, **kwargs)

    monkeypatch.setattr(rmodel.dstack, "forward", spy)
    with torch.no_grad():
        mem = rmodel.encode_neighbours(nimg, ntc)
        assert len(calls) == 1
        b, tt, xin = calls[0]
        assert b == 6 and torch.equal(tt, torch.zeros(6))
        assert torch.equal(xin, nimg.reshape(6, 3, 16, 16))
        rmodel(x, t, tc, mem)
    assert len(calls) == 2 and torch.equal(calls[1][1], t)  # the forward's own DStack call at t
    # the memory is exactly the neighbour attention's projection of that DStack output
    with torch.no_grad():
        feats, _, _ = orig(nimg.reshape(6, 3, 16, 16), torch.zeros(6), ntc, keep_skips=False)
        ref = rmodel.neighbour_attn.memory(feats, 2)
    assert torch.equal(mem.k, ref.k) and torch.equal(mem.v, ref.v)
    assert mem.k.shape[2] == 2 * rmodel.cfg.feature_size**2  # K * F * F tokens


@torch.no_grad()
def test_sr_neighbours_use_the_same_dstack_with_their_own_lowres_and_no_noise(rsr, enc, monkeypatch):
    x, t, tc, nimg, ntc = _inputs(rsr, enc, b=2, k=2)
    calls = []
    orig = rsr.dstack.forward

    sig = inspect.signature(orig)

    def spy(*a, **kw):
        v = sig.bind(*a, **kw)
        v.apply_defaults()
        v = v.arguments
        calls.append((v["t"].clone(), None if v["aug_t"] is None else v["aug_t"].clone(), v["x"].clone()))
        return orig(*a, **kw)

    monkeypatch.setattr(rsr.dstack, "forward", spy)
    rsr.encode_neighbours(nimg, ntc)
    assert len(calls) == 1
    tt, aug, xin = calls[0]
    assert torch.equal(tt, torch.zeros(4)) and torch.equal(aug, torch.zeros(4))
    assert xin.shape == (4, 6, 32, 32)
    assert torch.equal(xin[:, :3], nimg.reshape(4, 3, 32, 32))


@torch.no_grad()
def test_neighbour_cache_reused_across_forwards_equals_recomputing(rmodel, enc):
    x, t, tc, nimg, ntc = _inputs(rmodel, enc, b=3)
    cache = rmodel.encode_neighbours(nimg, ntc)
    g = torch.Generator().manual_seed(9)
    for step in range(3):
        xs = torch.randn(3, 3, 16, 16, generator=g)
        ts = torch.full((3,), 0.9 - 0.3 * step)
        reused = rmodel(xs, ts, tc, cache)
        fresh = rmodel(xs, ts, tc, rmodel.encode_neighbours(nimg, ntc))
        assert torch.equal(reused, fresh)
    # and the cache can be indexed/repeated for guidance branches (rows stacked branch-major)
    rep = torch.arange(3).repeat(2)
    out = rmodel(xs.repeat(2, 1, 1, 1), ts.repeat(2), tc.index(rep), cache.index(rep))
    torch.testing.assert_close(out[:3], out[3:], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[:3], reused, atol=ATOL, rtol=0)


@torch.no_grad()
def test_output_invariant_to_neighbour_order(rmodel, enc):
    """Attention over the K neighbours' keys/values treats them as a set."""
    x, t, tc, nimg, ntc = _inputs(rmodel, enc, b=2, k=2)
    perm = torch.tensor([1, 0, 3, 2])  # swap the two neighbours of each row (texts follow)
    a = rmodel(x, t, tc, rmodel.encode_neighbours(nimg, ntc))
    b = rmodel(x, t, tc, rmodel.encode_neighbours(nimg.flip(1), ntc.index(perm)))
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@torch.no_grad()
def test_output_row_independent_of_other_rows_in_the_batch(rmodel, enc):
    x, t, tc, nimg, ntc = _inputs(rmodel, enc, b=4, seed=0)
    x2, t2, _, nimg2, _ = _inputs(rmodel, enc, b=4, seed=7)
    tc2 = _text(rmodel, enc, ["z", "another quite long prompt about birds flying high", "q", "prompt number 3 with a dog"])
    # keep row 2 identical, change every other row (inputs, times, texts, neighbours)
    keep = 2
    x2[keep], t2[keep], nimg2[keep] = x[keep], t[keep], nimg[keep]
    ntc_rows = [f"neighbour {i} {j} of a red house" if i == keep else f"other {i} {j}" for i in range(4) for j in range(2)]
    ntc2 = _text(rmodel, enc, ntc_rows)
    texts2 = ["z", "another quite long prompt about birds flying high", "prompt number 2 with a dog", "q"]
    tc2 = _text(rmodel, enc, texts2)
    a = rmodel(x, t, tc, rmodel.encode_neighbours(nimg, ntc))
    b = rmodel(x2, t2, tc2, rmodel.encode_neighbours(nimg2, ntc2))
    torch.testing.assert_close(a[keep], b[keep], atol=ATOL, rtol=0)
    others = [i for i in range(4) if i != keep]
    assert (a[others] - b[others]).abs().amax() > 1e-3
    # and a batch of one gives the same row
    one = rmodel(x[keep:keep + 1], t[keep:keep + 1], tc.index(torch.tensor([keep])),
                 rmodel.encode_neighbours(nimg[keep:keep + 1], ntc.index(torch.tensor([2 * keep, 2 * keep + 1]))))
    torch.testing.assert_close(one[0], a[keep], atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------
# Super-resolution stage
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def test_sr_stage_requires_lowres_and_aug_t(rsr, enc):
    x, t, tc, nimg, ntc = _inputs(rsr, enc, b=2)
    mem = rsr.encode_neighbours(nimg, ntc)
    low, aug_t = _sr_extra(rsr, 2)
    with pytest.raises(ValueError, match="lowres"):
        rsr(x, t, tc, mem)
    with pytest.raises(ValueError, match="aug_t|noise-augmentation"):
        rsr(x, t, tc, mem, lowres=low)
    with pytest.raises(ValueError, match="lowres"):
        rsr(x, t, tc, mem, aug_t=aug_t)


@torch.no_grad()
def test_sr_stage_rejects_wrong_lowres_size(rsr, enc):
    x, t, tc, nimg, ntc = _inputs(rsr, enc, b=2)
    mem = rsr.encode_neighbours(nimg, ntc)
    aug_t = torch.zeros(2)
    with pytest.raises(ValueError, match="16x16"):
        rsr.lowres_input(torch.rand(2, 3, 8, 8), aug_t, None)
    with pytest.raises(ValueError, match="lowres"):
        rsr(x, t, tc, mem, lowres=torch.rand(2, 3, 16, 16), aug_t=aug_t)  # not upsampled


@torch.no_grad()
def test_sr_output_depends_on_the_lowres_image(rsr, enc):
    x, t, tc, nimg, ntc = _inputs(rsr, enc, b=2)
    mem = rsr.encode_neighbours(nimg, ntc)
    low1, aug_t = _sr_extra(rsr, 2, seed=0)
    low2, _ = _sr_extra(rsr, 2, seed=1)
    a = rsr(x, t, tc, mem, lowres=low1, aug_t=aug_t)
    b = rsr(x, t, tc, mem, lowres=low2, aug_t=aug_t)
    assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 1e-3


@torch.no_grad()
def test_lowres_input_is_upsampled_and_noised_to_aug_level(rsr):
    g = torch.Generator().manual_seed(3)
    low = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    noise = torch.randn(2, 3, 32, 32, generator=g)
    clean = rsr.lowres_input(low, torch.zeros(2), noise)
    assert clean.shape == (2, 3, 32, 32)
    # aug_t = 0 everywhere leaves the upsampled image clean (bilinear upsampling of c_x)
    up = torch.nn.functional.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(clean, up)
    noisy = rsr.lowres_input(low, torch.full((2,), 0.5), noise)
    from reimagen.diffusion.gaussian import q_sample
    torch.testing.assert_close(noisy, q_sample(clean, rsr._log_snr(torch.full((2,), 0.5)), noise))


@torch.no_grad()
def test_lowres_input_row_independent_of_other_rows_aug_level(rsr):
    g = torch.Generator().manual_seed(4)
    low = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    noise = torch.randn(2, 3, 32, 32, generator=g)
    both = rsr.lowres_input(low, torch.tensor([0.0, 0.5]), noise)
    alone = rsr.lowres_input(low[:1], torch.tensor([0.0]), noise[:1])
    torch.testing.assert_close(both[0], alone[0], atol=1e-5, rtol=0)


@torch.no_grad()
def test_sr_stage_rejects_aug_t_of_wrong_batch_length(rsr, enc):
    x, t, tc, _, _ = _inputs(rsr, enc, b=2)
    low, _ = _sr_extra(rsr, 2)
    drop = torch.ones(2, dtype=torch.bool)
    for bad in (torch.zeros(1), torch.zeros(3)):
        with pytest.raises(ValueError, match="batch length mismatch"):
            rsr(x, t, tc, None, drop_neighbours=drop, lowres=low, aug_t=bad)


#: Tolerance between two float32 computations of one value by different kernel sequences (batch shapes): a few
#: hundred ulps of outputs of order 1, far below what a wrong row (errors of order 0.1) would give.
F32 = {"rtol": 1e-5, "atol": 1e-5}


@pytest.mark.parametrize("preset", ["tiny-16", "tiny-sr32"])
@torch.no_grad()
def test_shared_dstack_for_branches_of_one_sample_gives_identical_outputs(preset, enc):
    """forward(source=...) runs one DStack per (sample, text dropped?) and must equal the unshared forward."""
    from reimagen.diffusion.guidance import branch_drop_masks

    m = randomize(make_model(preset, seed=3))
    b, s = 3, m.cfg.image_size
    g = torch.Generator().manual_seed(0)
    te, ne = enc.encode(["x", "y", "z"]), enc.encode(["a"] * 6)
    tc, nc = m.project_text(te.embeddings, te.mask), m.project_text(ne.embeddings, ne.mask)
    mem = m.encode_neighbours(torch.rand(b, 2, 3, s, s, generator=g), nc)
    x, t = torch.randn(b, 3, s, s, generator=g), torch.rand(b, generator=g)
    rep = torch.arange(b).repeat(2)
    drop_text, drop_nbr = branch_drop_masks(torch.tensor([0, 0, 0, 2, 1, 3]))  # FULL x3, then TEXT_ONLY, NBR_ONLY, UNCOND
    kw = {}
    if m.cfg.is_super_resolution:
        aug = torch.full((b,), 0.1)
        kw = {"lowres": m.lowres_input(torch.rand(b, 3, 16, 16, generator=g), aug, torch.randn(b, 3, s, s, generator=g))[rep],
              "aug_t": aug[rep]}
    calls = []
    hook = m.dstack.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    plain = m(x[rep], t[rep], tc.index(rep), mem.index(rep), drop_text, drop_nbr, **kw)
    shared = m(x[rep], t[rep], tc.index(rep), mem.index(rep), drop_text, drop_nbr, source=rep, **kw)
    hook.remove()
    # 6 and 5 rows through the DStack are different kernel calls, whose float32 sums some CPUs order differently
    # (seen: not bitwise equal on an AMD EPYC): equal within float32 rounding, ~1e-7 relative per op
    torch.testing.assert_close(shared, plain, **F32)
    assert calls == [6, 5]  # the TEXT_ONLY row of sample 0 reuses sample 0's FULL DStack pass


# ----------------------------------------------------------------------------------------------
# up_res_blocks: the Efficient-U-Net-style UStack (fewer up blocks; a level's deepest skips)
# ----------------------------------------------------------------------------------------------
def _state_dict_fingerprint(model) -> tuple[int, str]:
    import hashlib

    lines = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items())
    return len(model.state_dict()), hashlib.sha256(lines.encode()).hexdigest()[:16]


# (state_dict entries, sha256 of "key:shape" lines) of these presets, recorded with the UStack as it was
# before up_res_blocks existed: checkpoints of these presets must keep loading.
OLD_ARCHITECTURES = {"tiny-16": (167, "530fbb5c3d5bedc4"), "tiny-sr32": (135, "68e94c21c1acf62d"),
                     "small-32": (295, "cf946d7989111493"), "small-sr64": (219, "ff0364e4f7c38c00"),
                     "paper-64": (639, "136a69163be781a1"), "paper-sr1024": (473, "46ed62b5db0ce8ca")}


@pytest.mark.parametrize("preset", sorted(OLD_ARCHITECTURES))
def test_up_res_blocks_none_builds_exactly_the_old_architecture(preset):
    from reimagen.models.config import get_preset
    from reimagen.models.unet import ReImagenUNet

    cfg = get_preset(preset)
    assert cfg.up_res_blocks is None
    with torch.device("meta"):
        model = ReImagenUNet(cfg)
        explicit = ReImagenUNet(get_preset(preset, up_res_blocks=tuple(n + 1 for n in cfg.num_res_blocks)))
    assert _state_dict_fingerprint(model) == OLD_ARCHITECTURES[preset], (
        f"{preset}: the U-Net's parameters changed; existing checkpoints of this preset would no longer load")
    assert _state_dict_fingerprint(explicit) == OLD_ARCHITECTURES[preset]  # num_res_blocks + 1 spelled out
    assert model.ustack.skip_index == list(range(len(model.dstack.skip_channels)))[::-1]  # every skip, popped


@torch.no_grad()
def test_explicit_default_up_res_blocks_gives_identical_outputs(enc):
    a = randomize(make_model("tiny-16", seed=5), seed=6)
    b = randomize(make_model("tiny-16", seed=5, up_res_blocks=(2, 2)), seed=6)
    x, t, tc, nimg, nc = _inputs(a, enc)
    assert torch.equal(a(x, t, tc, a.encode_neighbours(nimg, nc)), b(x, t, tc, b.encode_neighbours(nimg, nc)))


def test_fewer_up_blocks_take_each_levels_deepest_skips():
    m = make_model("tiny-16", num_res_blocks=(1, 3), up_res_blocks=(1, 2))
    # DStack skips: [conv_in, L0 block, downsample, L1 block 1, 2, 3]; level 1 takes 5 then 4, level 0 takes 1
    assert m.ustack.skip_index == [5, 4, 1]
    from reimagen.models.unet import ResBlock

    assert sum(isinstance(b, ResBlock) for b in m.ustack.blocks) == 3
    assert sum(isinstance(b, ResBlock) for b in m.dstack.blocks) == 4


@pytest.mark.parametrize("up", [(1, 1), (1, 2), (2, 1)])
@torch.no_grad()
def test_efficient_ustack_runs_and_shares_the_dstack_like_the_default(up, enc):
    from reimagen.diffusion.guidance import branch_drop_masks

    m = randomize(make_model("tiny-16", seed=3, num_res_blocks=(1, 3), up_res_blocks=up))
    x, t, tc, nimg, nc = _inputs(m, enc, b=3, k=2)
    mem = m.encode_neighbours(nimg, nc)
    out = m(x, t, tc, mem)
    assert out.shape == x.shape and bool(torch.isfinite(out).all())
    rep = torch.arange(3).repeat(2)
    drop_text, drop_nbr = branch_drop_masks(torch.tensor([0, 0, 0, 2, 1, 3]))
    plain = m(x[rep], t[rep], tc.index(rep), mem.index(rep), drop_text, drop_nbr)
    shared = m(x[rep], t[rep], tc.index(rep), mem.index(rep), drop_text, drop_nbr, source=rep)
    torch.testing.assert_close(shared, plain, **F32)  # 6 vs 5 DStack rows: float32 rounding only (see above)
    # a row still depends on its neighbours and its text
    yes = torch.ones(3, dtype=torch.bool)
    assert (out - m(x, t, tc, mem, drop_neighbours=yes)).abs().max() > 1e-4
    assert (out - m(x, t, tc, mem, drop_text=yes)).abs().max() > 1e-4


def test_efficient_ustack_model_overfits_four_images():
    """The option must still train: a tiny Efficient-U-Net-style stage overfits four images like tiny-16."""
    import math

    from conftest import make_triples
    from reimagen.models.text import TinyTextEncoder
    from reimagen.training.train import TrainConfig, Trainer

    data = make_triples(4, 16, 2, seed=3)
    cfg = TrainConfig(steps=200, batch_size=8, lr=3e-3, log_every=25, ckpt_every=10**9, ema_decay=0.99, seed=0)
    model = make_model("tiny-16", seed=0, num_res_blocks=(1, 3), up_res_blocks=(1, 1))
    hist = Trainer(model, TinyTextEncoder(dim=32, seed=0), data, cfg).fit(progress=False)
    first, last = hist[0]["loss"], (hist[-1]["loss"] + hist[-2]["loss"]) / 2  # mean of the last 50 steps
    assert all(math.isfinite(h["loss"]) for h in hist)
    # measured (seeds 0-2, 1 or 2 threads): ~0.6 -> 0.055-0.09 (factor 7-11, as tiny-16); require at least 4x
    assert last * 4 <= first, f"loss only went from {first:.4f} to {last:.4f}"


# ----------------------------------------------------------------------------------------------
# neighbour_film: the pooled neighbour attention also FiLMs the UStack (the toy base stage)
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def test_neighbour_film_off_by_default_and_zero_initialised(enc):
    """Default configs have no FiLM projection (old checkpoints keep loading); a fresh FiLM stage computes
    exactly what the same weights without it compute, since the projection starts at zero."""
    plain = make_model("tiny-16", seed=3)
    assert plain.neighbour_attn.film is None and not any(k.startswith("neighbour_attn.film") for k in plain.state_dict())
    film = make_model("tiny-16", seed=3, neighbour_film=True)
    film.load_state_dict(plain.state_dict(), strict=False)
    randomize(plain, seed=4)
    film.load_state_dict(plain.state_dict(), strict=False)  # the FiLM projection stays zero
    x, t, tc, nimg, nc = _inputs(plain, enc)
    torch.testing.assert_close(film(x, t, tc, film.encode_neighbours(nimg, nc)),
                               plain(x, t, tc, plain.encode_neighbours(nimg, nc)), atol=ATOL, rtol=0)


@torch.no_grad()
def test_neighbour_film_carries_neighbour_content_past_a_silent_attention_output(enc):
    """With the attention's residual output switched off, a FiLM stage still depends on its neighbours'
    content (and only through kept neighbours), and its shared-DStack branches equal separate forwards."""
    m = randomize(make_model("tiny-16", seed=0, neighbour_film=True), seed=1)
    m.neighbour_attn.to_out.weight.zero_()
    m.neighbour_attn.to_out.bias.zero_()
    x, t, tc, nimg, nc = _inputs(m, enc, b=3, seed=0)
    _, _, _, nimg2, nc2 = _inputs(m, enc, b=3, seed=5, nbr_texts=[f"other text {i}" for i in range(6)])
    mem1, mem2 = m.encode_neighbours(nimg, nc), m.encode_neighbours(nimg2, nc2)
    assert (m(x, t, tc, mem1) - m(x, t, tc, mem2)).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    drop = torch.ones(3, dtype=torch.bool)
    torch.testing.assert_close(m(x, t, tc, mem1, drop_neighbours=drop), m(x, t, tc, mem2, drop_neighbours=drop),
                               atol=ATOL, rtol=0)
    # rows 0 and 1 are two guidance branches of one sample (source 0): the DStack runs once for both
    xs, ts = x[[0, 0]], t[[0, 0]]
    tcs, mems = tc.index(torch.tensor([0, 0])), mem1.index(torch.tensor([0, 0]))
    dn = torch.tensor([False, True])
    shared = m(xs, ts, tcs, mems, drop_neighbours=dn, source=torch.tensor([0, 0]))
    torch.testing.assert_close(shared, m(xs, ts, tcs, mems, drop_neighbours=dn), atol=ATOL, rtol=0)


def test_text_layout_shifts_locations_by_one_word():
    """text_layout: learned queries pool the text tokens, a zero-initialised linear map turns them into a shift per
    location and channel; so one token can move one side of a uniform feature map, whatever the other tokens."""
    from reimagen.models.unet import TextAttention, TextCond

    torch.manual_seed(0)
    att = TextAttention(32, 16, 16, 8, layout=(2, 4, 0))
    x = torch.ones(2, 32, 4, 4) * torch.randn(2, 32, 1, 1)
    tokens, mask = torch.randn(2, 5, 16), torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    plain = TextAttention(32, 16, 16, 8)
    plain.load_state_dict({k: v for k, v in att.state_dict().items() if not k.startswith("layout")})
    torch.testing.assert_close(att(x, TextCond(tokens, mask, torch.zeros(2, 32))),
                               plain(x, TextCond(tokens, mask, torch.zeros(2, 32))))  # zero-initialised
    torch.nn.init.normal_(att.layout.weight, std=0.2)
    out = att(x, TextCond(tokens, mask, torch.zeros(2, 32)))
    assert (out - out.mean((2, 3), keepdim=True)).abs().max() > 1e-2  # a location-dependent shift ...
    other = tokens.clone()
    other[:, 1] = torch.randn(2, 16)  # ... that one word changes
    assert (out - att(x, TextCond(other, mask, torch.zeros(2, 32)))).abs().max() > 1e-2
    masked = tokens.clone()
    masked[1, 3:] = 100.0  # padding tokens are not pooled
    torch.testing.assert_close(out[1], att(x, TextCond(masked, mask, torch.zeros(2, 32)))[1])


def test_position_embedding_lets_text_attention_tell_locations_apart():
    """A spatially uniform input gives the same output at every location without position embeddings, and
    location-dependent outputs with them (what lets a word such as "left" act on one side only)."""
    from reimagen.models.unet import TextAttention, TextCond

    torch.manual_seed(0)
    text = TextCond(torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool), torch.zeros(2, 32))
    x = torch.ones(2, 32, 4, 4) * torch.randn(2, 32, 1, 1)
    for size, varies in ((None, False), (4, True)):
        att = TextAttention(32, 16, 16, 8, size)
        torch.nn.init.normal_(att.to_out.weight, std=0.2)  # (zero-initialised: the block is an identity at first)
        out = att(x, text)
        spread = (out - out.mean((2, 3), keepdim=True)).abs().max().item()
        assert (spread > 1e-4) == varies, (size, spread)
