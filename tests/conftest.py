"""Shared fixtures for the reimagen test suite: offline, CPU, tiny models."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Tiny models run thousands of very short parallel regions; with OpenMP's default spin-waiting, a shared
# (oversubscribed) 2-core machine turns each into a busy-wait and the suite becomes ~20x slower.
# Must be set before torch (and its OpenMP runtime) is loaded.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# CLI output is rendered at one fixed width whatever the terminal (rich fixes a console's width from COLUMNS when
# the console is made, so this must precede every project import): tests never see text wrapped by the terminal.
os.environ["COLUMNS"] = "200"

import numpy as np
import pytest
import torch
import torch.nn as nn

# The machine's 2 cores, unless OMP_NUM_THREADS says otherwise (.ci/run runs the suite with 1 thread, so that a
# test which holds only for one thread count fails here, not on another machine).
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 2))

from reimagen.models.config import get_preset  # noqa: E402
from reimagen.training.data import TripleData  # noqa: E402
from reimagen.models.text import TinyTextEncoder  # noqa: E402
from reimagen.models.unet import ReImagenUNet  # noqa: E402


def make_model(preset: str = "tiny-16", seed: int = 0, **overrides) -> ReImagenUNet:
    """A freshly initialised stage, deterministically seeded, in eval mode."""
    cfg = get_preset(preset, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ReImagenUNet(cfg)
    return model.eval()


def randomize(model: nn.Module, std: float = 0.05, seed: int = 0) -> nn.Module:
    """Perturb every parameter by N(0, std^2) noise: many output layers are zero-initialised (the output
    conv, attention output projections, the second conv of residual blocks), which would hide any
    dependence of the output on its inputs. Perturbing (rather than overwriting) keeps the default
    initialisation's scale elsewhere, so that signals are not attenuated to nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def layout_model(seed: int = 0) -> ReImagenUNet:
    """tiny-16 with text layout maps (2 pooling queries), randomised, its zero-initialised maps made to matter."""
    model = randomize(make_model("tiny-16", text_layout=2), std=0.05, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layout.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def structured_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """(n, size, size, 3) uint8: a coloured background with a bright square at a per-image place."""
    rng = np.random.default_rng(seed)
    imgs = np.zeros((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        imgs[i] = rng.integers(0, 256, size=3, dtype=np.uint8)
        s = size // 4
        y, x = rng.integers(0, size - s, size=2)
        imgs[i, y:y + s, x:x + s] = rng.integers(128, 256, size=3, dtype=np.uint8)
    return imgs


WORDS = ["red", "green", "blue", "dog", "cat", "bird", "house", "tree"]


def make_triples(n: int = 8, size: int = 16, k: int = 2, seed: int = 0) -> TripleData:
    texts = [f"a {WORDS[i % 3]} {WORDS[3 + i % 5]} number {i}" for i in range(n)]
    nbrs = np.array([[(i + j + 1) % n for j in range(k)] for i in range(n)], dtype=np.int64).reshape(n, k)
    return TripleData.from_arrays(structured_images(n, size, seed), texts, nbrs)


@pytest.fixture
def tiny_cfg():
    return get_preset("tiny-16")


@pytest.fixture
def tiny_model():
    return make_model("tiny-16", seed=0)


@pytest.fixture
def tiny_sr_model():
    return make_model("tiny-sr32", seed=1)


@pytest.fixture
def text_encoder():
    return TinyTextEncoder(dim=32, seed=0).eval()


@pytest.fixture
def tiny_data():
    return make_triples(8, 16, 2)


@pytest.fixture(scope="session")
def chromium():
    """Headless Chromium for the browser tests (installed when missing and possible); skipped where it cannot be
    had, except on CI, where that fails."""
    from human_eval.testing import ensure_chromium, ensure_playwright, on_ci

    try:
        ensure_playwright()
        return ensure_chromium()
    except (RuntimeError, ImportError) as err:
        if on_ci():
            pytest.fail(str(err))
        pytest.skip(str(err))
