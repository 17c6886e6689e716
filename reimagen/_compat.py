"""The one place that works around a mixed torch/torchvision install.

On machines where the CPU build of ``torch`` meets a CUDA build of ``torchvision`` (the only
torchvision release that accepts torch 2.13 on PyPI is a CUDA build), ``import torchvision`` fails with
``RuntimeError: operator torchvision::nms does not exist``: the package registers meta and autograd
kernels for compiled operators its C++ extension could not load. Every library that imports
torchvision (transformers, diffusers, open-clip, clean-fid, torch-fidelity, timm) then fails too.

``patch_torchvision_if_broken`` tries the import first. Only if it fails with exactly that error does it
register empty placeholder modules for ``torchvision._meta_registrations`` and
``torchvision._autograd_registrations`` and import again. Transforms, model definitions
(``inception_v3(weights=None)``) and everything built on them then work; only torchvision's compiled
ops (``ops.nms``, ``io.decode_png``) stay unavailable, and this project does not use them.
Users with a matching torchvision build never reach the workaround.
"""

from __future__ import annotations

import importlib.util
import sys
import types

_PLACEHOLDERS = ("torchvision._meta_registrations", "torchvision._autograd_registrations")
PATCHED = False  # True once the workaround was needed and applied in this process


def patch_torchvision_if_broken() -> bool:
    """Make ``import torchvision`` work; returns True if the workaround had to be applied."""
    global PATCHED
    if "torchvision" in sys.modules and not PATCHED:
        return False  # already imported successfully by someone else
    if PATCHED or importlib.util.find_spec("torchvision") is None:
        return PATCHED
    try:
        import torchvision  # noqa: F401

        return False
    except RuntimeError as err:
        if "torchvision::" not in str(err) or "does not exist" not in str(err):
            raise
    # Forget the half-imported package, stub the two registration modules, import again.
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    for name in _PLACEHOLDERS:
        sys.modules[name] = types.ModuleType(name)
    import torchvision  # noqa: F401,F811

    PATCHED = True
    return True
