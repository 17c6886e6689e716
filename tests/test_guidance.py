"""Properties of classifier-free guidance with two conditions (reimagen/guidance.py, Eq. 5, Eq. 6, Appendix E)."""

import math

import pytest
import torch

from reimagen.diffusion import guidance as G
from reimagen.diffusion.guidance import Branch


def _preds(b=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(4)]  # full, nbr, text, uncond


# ----------------------------------------------------------------------------------------------
# The equations, term by term
# ----------------------------------------------------------------------------------------------
def test_text_and_neighbour_enhanced_equal_eq6_by_hand():
    full, nbr_only, text_only, _ = _preds()
    w_p, w_n = 2.5, 7.0
    eps_p = w_p * full - (w_p - 1) * nbr_only
    eps_n = w_n * full - (w_n - 1) * text_only
    torch.testing.assert_close(G.text_enhanced(full, nbr_only, w_p), eps_p, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(G.neighbour_enhanced(full, text_only, w_n), eps_n, rtol=1e-12, atol=1e-12)
    # w = 1 gives back the full prediction; w = 0 gives the partial one
    torch.testing.assert_close(G.text_enhanced(full, nbr_only, 1.0), full)
    torch.testing.assert_close(G.neighbour_enhanced(full, text_only, 0.0), text_only)


def test_joint_equals_eq5():
    full, _, _, uncond = _preds(seed=1)
    for w in (0.0, 1.0, 1.25, 5.0):
        torch.testing.assert_close(G.joint(full, uncond, w), w * full - (w - 1) * uncond, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(G.joint(full, uncond, 1.0), full)


def test_weighted_is_lam_eps_p_plus_one_minus_lam_eps_n():
    full, nbr_only, text_only, _ = _preds(seed=2)
    w_p, w_n, lam = 3.0, 1.5, 0.3
    eps_p = w_p * full - (w_p - 1) * nbr_only
    eps_n = w_n * full - (w_n - 1) * text_only
    got = G.weighted(full, nbr_only, text_only, w_p, w_n, lam)
    torch.testing.assert_close(got, lam * eps_p + (1 - lam) * eps_n, rtol=1e-12, atol=1e-12)


def test_interleaved_picks_eps_p_or_eps_n_row_by_row():
    full, nbr_only, text_only, _ = _preds(b=6, seed=3)
    use_text = torch.tensor([True, False, True, True, False, False])
    other = torch.where(use_text[:, None, None, None], nbr_only, text_only)
    got = G.interleaved(full, other, use_text, 2.0, 4.0)
    for i in range(6):
        exp = (2.0 * full[i] - 1.0 * nbr_only[i]) if use_text[i] else (4.0 * full[i] - 3.0 * text_only[i])
        torch.testing.assert_close(got[i], exp, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Branches
# ----------------------------------------------------------------------------------------------
def test_branch_drop_masks_mapping():
    codes = torch.tensor([Branch.FULL, Branch.NBR_ONLY, Branch.TEXT_ONLY, Branch.UNCOND])
    dt, dn = G.branch_drop_masks(codes)
    assert dt.tolist() == [False, True, False, True]
    assert dn.tolist() == [False, False, True, True]
    for b in Branch:
        assert b.drops_text == dt[int(b)].item() and b.drops_neighbours == dn[int(b)].item()


def test_num_branches_and_plan_shapes():
    r = torch.rand(7, generator=torch.Generator().manual_seed(0))
    cases = [(G.JointGuidance(w=1.0), 1), (G.JointGuidance(w=2.0), 2), (G.InterleavedGuidance(), 2),
             (G.WeightedGuidance(), 3), (G.JointGuidance(w=1.0, use_neighbours=False), 1)]
    for strat, nb in cases:
        assert strat.num_branches == nb
        assert strat.plan(r).shape == (nb, 7)
    # joint: conditional first, unconditional second
    codes = G.JointGuidance(w=2.0).plan(r)
    assert set(codes[0].tolist()) == {int(Branch.FULL)} and set(codes[1].tolist()) == {int(Branch.UNCOND)}
    codes = G.JointGuidance(w=2.0, use_neighbours=False).plan(r)
    assert set(codes[0].tolist()) == {int(Branch.TEXT_ONLY)}
    assert not G.JointGuidance(use_neighbours=False).needs_neighbours and G.InterleavedGuidance().needs_neighbours
    codes = G.WeightedGuidance().plan(r)
    assert [set(c.tolist()) for c in codes] == [{0}, {1}, {2}]


# ----------------------------------------------------------------------------------------------
# Interleaving draws
# ----------------------------------------------------------------------------------------------
def test_interleaved_eta_one_always_text_enhanced_eta_zero_always_neighbour_enhanced():
    r = torch.cat([torch.linspace(0, 1, 1001)[:-1], torch.tensor([0.0, 0.999999])])  # R in [0, 1)
    codes1 = G.InterleavedGuidance(eta=1.0).plan(r)
    codes0 = G.InterleavedGuidance(eta=0.0).plan(r)
    assert torch.all(codes1[0] == Branch.FULL) and torch.all(codes0[0] == Branch.FULL)
    assert torch.all(codes1[1] == Branch.NBR_ONLY)
    assert torch.all(codes0[1] == Branch.TEXT_ONLY)


def test_interleaved_eta_half_picks_each_about_half_the_time():
    n = 4000
    r = torch.rand(n, generator=torch.Generator().manual_seed(123))
    codes = G.InterleavedGuidance(eta=0.5).plan(r)
    frac = float((codes[1] == Branch.NBR_ONLY).float().mean())
    assert abs(frac - 0.5) < 4 * math.sqrt(0.25 / n)  # 4-sigma binomial bound
    codes = G.InterleavedGuidance(eta=0.2).plan(r)
    frac = float((codes[1] == Branch.NBR_ONLY).float().mean())
    assert abs(frac - 0.2) < 4 * math.sqrt(0.16 / n)


def test_interleaved_combine_equals_eq6_rows():
    full, nbr_only, text_only, _ = _preds(b=8, seed=4)
    strat = G.InterleavedGuidance(w_p=3.0, w_n=5.0, eta=0.5)
    r = torch.tensor([0.1, 0.9, 0.49, 0.51, 0.0, 0.75, 0.3, 0.6])
    codes = strat.plan(r)
    # what a sampler does: evaluate, per row, the branch the plan asks for
    table = {int(Branch.FULL): full, int(Branch.NBR_ONLY): nbr_only, int(Branch.TEXT_ONLY): text_only}
    preds = torch.stack([torch.stack([table[int(c)][i] for i, c in enumerate(row)]) for row in codes])
    got = strat.combine(preds, codes)
    for i in range(8):
        if r[i] < 0.5:
            exp = 3.0 * full[i] - 2.0 * nbr_only[i]
        else:
            exp = 5.0 * full[i] - 4.0 * text_only[i]
        torch.testing.assert_close(got[i], exp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, G.interleaved(full, preds[1], r < 0.5, 3.0, 5.0))


def test_joint_and_weighted_combine_match_the_equations():
    full, nbr_only, text_only, uncond = _preds(seed=5)
    torch.testing.assert_close(G.JointGuidance(w=1.0).combine(torch.stack([full]), None), full)
    torch.testing.assert_close(G.JointGuidance(w=1.5).combine(torch.stack([full, uncond]), None),
                               1.5 * full - 0.5 * uncond)
    wg = G.WeightedGuidance(w_p=2.0, w_n=4.0, lam=0.25)
    torch.testing.assert_close(wg.combine(torch.stack([full, nbr_only, text_only]), None),
                               0.25 * (2 * full - nbr_only) + 0.75 * (4 * full - 3 * text_only))


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eta", [-0.1, 1.5, float("nan")])
def test_eta_outside_unit_interval_rejected(eta):
    with pytest.raises(ValueError, match="eta"):
        G.InterleavedGuidance(eta=eta)
    with pytest.raises(ValueError, match="eta"):
        G.make_guidance("interleaved", eta=eta)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_negative_nan_or_infinite_weights_rejected_naming_the_weight(bad):
    with pytest.raises(ValueError, match="w_p"):
        G.InterleavedGuidance(w_p=bad)
    with pytest.raises(ValueError, match="w_n"):
        G.InterleavedGuidance(w_n=bad)
    with pytest.raises(ValueError, match="w_n"):
        G.WeightedGuidance(w_n=bad)
    with pytest.raises(ValueError, match="guidance weight w"):
        G.JointGuidance(w=bad)


def test_weighted_mixing_weight_outside_unit_interval_rejected():
    with pytest.raises(ValueError, match="mixing weight"):
        G.WeightedGuidance(lam=1.2)


def test_make_guidance_builds_named_strategies_and_rejects_unknown():
    s = G.make_guidance("interleaved", w_text=4.0, w_neighbours=5.0, eta=0.3)
    assert isinstance(s, G.InterleavedGuidance) and (s.w_p, s.w_n, s.eta) == (4.0, 5.0, 0.3)
    s = G.make_guidance("weighted", w_text=2.0, w_neighbours=6.0, eta=0.2, lam=0.7)
    assert isinstance(s, G.WeightedGuidance) and (s.w_p, s.w_n, s.lam) == (2.0, 6.0, 0.7)  # eta is not lam
    s = G.make_guidance("joint", w_text=1.25)
    assert isinstance(s, G.JointGuidance) and s.w == 1.25
    with pytest.raises(ValueError, match="unknown guidance"):
        G.make_guidance("cfg++")
    with pytest.raises(ValueError, match="needs neighbours"):
        G.make_guidance("interleaved", use_neighbours=False)
