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

``install_module_aliases`` keeps the module paths of ``reimagen`` 0.1 (``reimagen.unet``, ``reimagen.sampling``,
...) importable for one minor version, with a warning that names the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

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


# The same workaround for every interpreter of the project's venv, so that a user's own script can
# ``import diffusers`` without importing reimagen first: ``make install`` (and ``reimagen-eval doctor --fix``)
# writes this hook as a .pth file into site-packages. It costs nothing at start-up: it only answers for the two
# registration modules, and only when torchvision's compiled ops did not load.
HOOK_FILE = "reimagen-torchvision-guard.pth"
_HOOK = (
    "import sys, types, importlib.machinery\n"
    "class _ReimagenTorchvisionGuard:\n"
    "    names = %r\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        ext = sys.modules.get('torchvision.extension')\n"
    "        if name not in self.names or ext is None or ext._has_ops():\n"
    "            return None\n"
    "        return importlib.machinery.ModuleSpec(name, self)\n"
    "    def create_module(self, spec):\n"
    "        return types.ModuleType(spec.name)\n"
    "    def exec_module(self, module):\n"
    "        pass\n"
    "sys.meta_path.insert(0, _ReimagenTorchvisionGuard())\n"
) % (_PLACEHOLDERS,)


def _hook_path(site_dir: str | None = None) -> str:
    import os
    import sysconfig

    return os.path.join(site_dir or sysconfig.get_paths()["purelib"], HOOK_FILE)


def install_torchvision_hook(site_dir: str | None = None) -> str:
    """Write the hook into ``site_dir`` (default: this interpreter's site-packages); returns the file's path."""
    import os

    path = _hook_path(site_dir)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        # a .pth line that starts with "import" is run at start-up; the hook gets its own globals
        f.write("import sys; exec(%r, {'__name__': 'reimagen_torchvision_guard'})\n" % _HOOK)
    os.replace(tmp, path)
    return path


def torchvision_hook_installed() -> bool:
    import os

    return os.path.isfile(_hook_path())


# reimagen 0.1's flat modules -> their rooms (0.2). Removed in 0.3.
MOVED_MODULES = {
    "atomic": "utils.atomic", "_compat": "utils.compat", "precision": "utils.precision", "cliutil": "utils.cliutil",
    "guidance": "diffusion.guidance", "config": "models.config", "unet": "models.unet", "text": "models.text",
    "memory": "models.memory", "checkpoint": "models.checkpoint", "sampling": "pipelines.sampling",
    "cascade": "pipelines.cascade", "pipeline": "pipelines.pipeline", "generate": "pipelines.generate",
    "sample_run": "pipelines.sample_run", "data": "training.data", "shards": "training.shards",
    "text_store": "training.text_store", "loader": "training.loader", "train": "training.train",
    "distributed": "training.distributed",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):  # the moved module itself, so that both names share one module object
        module = importlib.import_module(self.target)
        self.spec = module.__spec__
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = self.spec  # the import system gave it the alias's spec


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        old = fullname.removeprefix("reimagen.")
        if fullname == old or old not in MOVED_MODULES:
            return None
        new = f"reimagen.{MOVED_MODULES[old]}"
        warnings.warn(f"{fullname} moved to {new} in reimagen 0.2; the old path stops working in 0.3",
                      FutureWarning, stacklevel=2)
        return importlib.util.spec_from_loader(fullname, _AliasLoader(new))


def install_module_aliases() -> None:
    """Let ``import reimagen.unet`` (0.1's layout) import ``reimagen.models.unet``, with a FutureWarning."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
