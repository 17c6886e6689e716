"""The torchvision workaround (reimagen/utils/compat.py): applied only when torchvision's compiled ops cannot load."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _run(code: str) -> str:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_torchvision_and_its_dependents_import_after_reimagen():
    pytest.importorskip("torchvision")
    out = _run(
        "import reimagen, torch\n"
        "from reimagen.utils import compat as _compat\n"
        "import torchvision.transforms.functional as F\n"
        "from torchvision.models import inception_v3\n"
        "m = inception_v3(weights=None, aux_logits=False, init_weights=False)\n"
        "y = F.resize(torch.rand(3, 10, 10), [5, 5], antialias=True)\n"
        "import json, transformers\n"
        "print(json.dumps([_compat.PATCHED, list(y.shape), sum(p.numel() for p in m.parameters())]))\n"
    )
    patched, shape, n_params = json.loads(out)
    assert shape == [3, 5, 5] and n_params > 10**6
    # The workaround is applied exactly when a plain import fails in a fresh interpreter.
    plain = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True, timeout=300)
    assert patched == (plain.returncode != 0)
    if plain.returncode != 0:
        assert "torchvision::" in plain.stderr


def test_patch_is_a_no_op_when_torchvision_already_imported_cleanly():
    out = _run(
        "import sys, types\n"
        "sys.modules['torchvision'] = types.ModuleType('torchvision')  # stands in for a working install\n"
        "from reimagen.utils.compat import patch_torchvision_if_broken\n"
        "print(patch_torchvision_if_broken(), 'torchvision._meta_registrations' in sys.modules)\n"
    )
    assert out == "False False"


def test_other_import_errors_are_not_swallowed(tmp_path):
    pkg = tmp_path / "torchvision"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('something unrelated broke')\n")
    res = subprocess.run(
        [sys.executable, "-c", "from reimagen.utils.compat import patch_torchvision_if_broken; patch_torchvision_if_broken()"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert res.returncode != 0 and "something unrelated broke" in res.stderr


@pytest.mark.parametrize("old", ["unet", "sampling", "train", "_compat", "distributed"])
def test_0_1_module_paths_import_the_moved_module_with_a_warning(old):
    import importlib
    import sys

    from reimagen.utils.compat import MOVED_MODULES

    sys.modules.pop(f"reimagen.{old}", None)  # another test may have imported the alias already
    new = f"reimagen.{MOVED_MODULES[old]}"
    with pytest.warns(FutureWarning, match=new.replace(".", r"\.")):
        alias = importlib.import_module(f"reimagen.{old}")
    assert alias is importlib.import_module(new)
    assert alias.__spec__.name == new  # importlib.reload and pickling keep working on the real module


def test_every_moved_module_exists_and_its_old_path_is_an_alias():
    import importlib.util
    from pathlib import Path

    import reimagen
    from reimagen.utils.compat import MOVED_MODULES

    for old, new in MOVED_MODULES.items():
        assert importlib.util.find_spec(f"reimagen.{new}") is not None, new
        assert not (Path(reimagen.__file__).parent / f"{old}.py").exists(), old  # the top level holds rooms only
        sys.modules.pop(f"reimagen.{old}", None)
        with pytest.warns(FutureWarning):
            spec = importlib.util.find_spec(f"reimagen.{old}")
        assert type(spec.loader).__name__ == "_AliasLoader", old
