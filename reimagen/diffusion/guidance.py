"""Classifier-free guidance with two conditions (Sec. 3.1 Eq. 5, Sec. 3.2 Eq. 6, Appendix E).

One network gives four predictions, selected by which conditions are dropped (training drops the text
c_p and the neighbours c_n independently with p = 0.1, Sec. 3.2 "Model Training"):

    FULL      eps(x_t, c_p, c_n, t)
    NBR_ONLY  eps(x_t, c_n, t)      text dropped
    TEXT_ONLY eps(x_t, c_p, t)      neighbours dropped
    UNCOND    eps(x_t, t)           both dropped

The combinations are pure functions (``joint``, ``text_enhanced``, ``neighbour_enhanced``, ``weighted``,
``interleaved``). A strategy object says which branches each row needs at a step (so a sampler runs
exactly those, as one batched forward) and combines them:

    JointGuidance        Eq. 5 with both conditions        2 branches (1 when w = 1)
    WeightedGuidance     lam * eps_p + (1 - lam) * eps_n   3 branches
    InterleavedGuidance  Eq. 6, eps_p if R < eta else eps_n, R ~ U[0, 1] per sample and step
                                                            2 branches
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Sequence

import torch

Tensor = torch.Tensor


class Branch(IntEnum):
    """Which conditions a forward pass sees."""

    FULL = 0  # eps(x_t, c_p, c_n)
    NBR_ONLY = 1  # eps(x_t, c_n): text dropped
    TEXT_ONLY = 2  # eps(x_t, c_p): neighbours dropped
    UNCOND = 3  # eps(x_t): both dropped

    @property
    def drops_text(self) -> bool:
        return self in (Branch.NBR_ONLY, Branch.UNCOND)

    @property
    def drops_neighbours(self) -> bool:
        return self in (Branch.TEXT_ONLY, Branch.UNCOND)


def branch_drop_masks(codes: Tensor) -> tuple[Tensor, Tensor]:
    """(drop_text, drop_neighbours) boolean masks for a tensor of Branch codes."""
    drop_text = (codes == Branch.NBR_ONLY) | (codes == Branch.UNCOND)
    drop_nbr = (codes == Branch.TEXT_ONLY) | (codes == Branch.UNCOND)
    return drop_text, drop_nbr


# ----------------------------------------------------------------------------------------------
# The equations
# ----------------------------------------------------------------------------------------------
def joint(eps_cond: Tensor, eps_uncond: Tensor, w: float) -> Tensor:
    """Eq. 5: eps_hat = w * eps(x_t, c) - (w - 1) * eps(x_t)."""
    return w * eps_cond - (w - 1) * eps_uncond


def text_enhanced(eps_full: Tensor, eps_nbr_only: Tensor, w_p: float | Tensor) -> Tensor:
    """Eq. 6, first line: eps_p = w_p * eps(x_t, c_p, c_n) - (w_p - 1) * eps(x_t, c_n)."""
    return w_p * eps_full - (w_p - 1) * eps_nbr_only


def neighbour_enhanced(eps_full: Tensor, eps_text_only: Tensor, w_n: float | Tensor) -> Tensor:
    """Eq. 6, second line: eps_n = w_n * eps(x_t, c_p, c_n) - (w_n - 1) * eps(x_t, c_p)."""
    return w_n * eps_full - (w_n - 1) * eps_text_only


def weighted(eps_full: Tensor, eps_nbr_only: Tensor, eps_text_only: Tensor, w_p: float, w_n: float, lam: float) -> Tensor:
    """Appendix E, weighted guidance: lam * eps_p + (1 - lam) * eps_n, both from Eq. 6."""
    return lam * text_enhanced(eps_full, eps_nbr_only, w_p) + (1 - lam) * neighbour_enhanced(eps_full, eps_text_only, w_n)


def interleaved(eps_full: Tensor, eps_other: Tensor, use_text: Tensor, w_p: float, w_n: float) -> Tensor:
    """Eq. 6 interleaved, per row: eps_p where ``use_text`` (R < eta) else eps_n.

    ``eps_other`` holds, row by row, eps(x_t, c_n) where ``use_text`` and eps(x_t, c_p) elsewhere:
    each row evaluates only the partial prediction its draw needs.
    """
    m = use_text.reshape(-1, *([1] * (eps_full.dim() - 1)))
    return torch.where(m, text_enhanced(eps_full, eps_other, w_p), neighbour_enhanced(eps_full, eps_other, w_n))


# ----------------------------------------------------------------------------------------------
# Strategies: which branches a step needs, and how they combine
# ----------------------------------------------------------------------------------------------
def _check_weight(name: str, w: float) -> None:
    if not (w >= 0.0) or w != w or w == float("inf"):
        raise ValueError(f"guidance weight {name} must be a finite number >= 0, got {w}")


def _check_eta(eta: float) -> None:
    if not (0.0 <= eta <= 1.0):
        raise ValueError(f"interleave ratio eta must be in [0, 1], got {eta}")


class GuidanceStrategy:
    """Base class. ``plan(r)`` takes one uniform draw R per row (shape (B,), drawn by the sampler from
    each sample's own guidance generator) and returns Branch codes of shape (num_branches, B) for one
    step; ``combine`` maps the stacked predictions (num_branches, B, ...) to the guided eps."""

    needs_neighbours: bool = True

    @property
    def num_branches(self) -> int:
        raise NotImplementedError

    def plan(self, r: Tensor) -> Tensor:
        raise NotImplementedError

    def combine(self, preds: Tensor, codes: Tensor) -> Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class JointGuidance(GuidanceStrategy):
    """Standard classifier-free guidance on both conditions (Eq. 5 with c = (c_p, c_n)); used for the
    FID sweeps of Sec. 4.1. With ``use_neighbours=False`` it is plain text CFG (text-only models, or a
    Re-Imagen model run without retrieval: eps(x_t, c_p) against eps(x_t))."""

    w: float = 1.0
    use_neighbours: bool = True

    def __post_init__(self) -> None:
        _check_weight("w", self.w)

    @property
    def needs_neighbours(self) -> bool:  # type: ignore[override]
        return self.use_neighbours

    @property
    def num_branches(self) -> int:
        return 1 if self.w == 1.0 else 2

    def plan(self, r: Tensor) -> Tensor:
        cond = Branch.FULL if self.use_neighbours else Branch.TEXT_ONLY
        codes = [torch.full_like(r, int(cond), dtype=torch.long)]
        if self.w != 1.0:
            codes.append(torch.full_like(r, int(Branch.UNCOND), dtype=torch.long))
        return torch.stack(codes)

    def combine(self, preds: Tensor, codes: Tensor) -> Tensor:
        return preds[0] if self.w == 1.0 else joint(preds[0], preds[1], self.w)


@dataclass(frozen=True)
class WeightedGuidance(GuidanceStrategy):
    """Appendix E: a fixed mixture lam * eps_p + (1 - lam) * eps_n (3 predictions per step)."""

    w_p: float = 3.0
    w_n: float = 3.0
    lam: float = 0.5

    def __post_init__(self) -> None:
        _check_weight("w_p", self.w_p)
        _check_weight("w_n", self.w_n)
        if not (0.0 <= self.lam <= 1.0):
            raise ValueError(f"weighted guidance mixing weight must be in [0, 1], got {self.lam}")

    @property
    def num_branches(self) -> int:
        return 3

    def plan(self, r: Tensor) -> Tensor:
        return torch.stack(
            [torch.full_like(r, int(b), dtype=torch.long) for b in (Branch.FULL, Branch.NBR_ONLY, Branch.TEXT_ONLY)]
        )

    def combine(self, preds: Tensor, codes: Tensor) -> Tensor:
        return weighted(preds[0], preds[1], preds[2], self.w_p, self.w_n, self.lam)


@dataclass(frozen=True)
class InterleavedGuidance(GuidanceStrategy):
    """Sec. 3.2, Eq. 6: at every step each sample draws R ~ U[0, 1] and uses the text-enhanced eps_p if
    R < eta, else the neighbour-enhanced eps_n. Smaller eta favours the neighbours (entity faithfulness),
    larger eta the text. Needs 2 predictions per row and step: the full one and the partial one its draw
    selects."""

    w_p: float = 3.0
    w_n: float = 3.0
    eta: float = 0.5

    def __post_init__(self) -> None:
        _check_weight("w_p", self.w_p)
        _check_weight("w_n", self.w_n)
        _check_eta(self.eta)

    @property
    def num_branches(self) -> int:
        return 2

    def plan(self, r: Tensor) -> Tensor:
        use_text = r < self.eta
        other = torch.where(use_text, int(Branch.NBR_ONLY), int(Branch.TEXT_ONLY)).long()
        return torch.stack([torch.full_like(other, int(Branch.FULL)), other])

    def combine(self, preds: Tensor, codes: Tensor) -> Tensor:
        return interleaved(preds[0], preds[1], codes[1] == Branch.NBR_ONLY, self.w_p, self.w_n)


def make_guidance(kind: str, w_text: float = 3.0, w_neighbours: float = 3.0, eta: float = 0.5, lam: float = 0.5,
                  use_neighbours: bool = True) -> GuidanceStrategy:
    """A strategy by name, each parameter under its own name:

        joint        JointGuidance(w = w_text)                      Eq. 5 (w_neighbours, eta, lam unused)
        weighted     WeightedGuidance(w_text, w_neighbours, lam)    Appendix E
        interleaved  InterleavedGuidance(w_text, w_neighbours, eta) Eq. 6
    """
    if kind == "joint":
        return JointGuidance(w=w_text, use_neighbours=use_neighbours)
    if not use_neighbours:
        raise ValueError(f"{kind} guidance needs neighbours; use joint guidance for text-only sampling")
    if kind == "weighted":
        return WeightedGuidance(w_p=w_text, w_n=w_neighbours, lam=lam)
    if kind == "interleaved":
        return InterleavedGuidance(w_p=w_text, w_n=w_neighbours, eta=eta)
    raise ValueError(f"unknown guidance {kind!r}; choose joint, weighted or interleaved")


STRATEGIES = {"joint": JointGuidance, "weighted": WeightedGuidance, "interleaved": InterleavedGuidance}


def guidance_to_dict(g: GuidanceStrategy) -> dict:
    """A strategy as JSON: {"kind": name, its fields}; ``guidance_from_dict`` reads it back."""
    from dataclasses import asdict

    kind = next((name for name, cls in STRATEGIES.items() if type(g) is cls), None)
    if kind is None:
        raise ValueError(f"cannot save guidance of type {type(g).__name__}")
    return {"kind": kind, **asdict(g)}


def guidance_from_dict(d: dict) -> GuidanceStrategy:
    d = dict(d)
    kind = d.pop("kind", None)
    if kind not in STRATEGIES:
        raise ValueError(f"unknown guidance kind {kind!r}; choose one of {', '.join(STRATEGIES)}")
    return STRATEGIES[kind](**d)


__all__: Sequence[str] = [
    "Branch", "branch_drop_masks", "joint", "text_enhanced", "neighbour_enhanced", "weighted", "interleaved",
    "GuidanceStrategy", "JointGuidance", "WeightedGuidance", "InterleavedGuidance", "make_guidance", "STRATEGIES",
    "guidance_to_dict", "guidance_from_dict",
]
