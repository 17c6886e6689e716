"""``reimagen-eval doctor``: is this environment one the project runs in? Today one check, the one that bites a
user's own script: a CPU torch with the registry's CUDA torchvision wheel (docs/install.md)."""

from __future__ import annotations

import subprocess
import sys

import typer
from rich.console import Console

from reimagen.utils.cliutil import friendly

console = Console(stderr=True)
PROBE = "import torchvision, transformers, diffusers; from torchvision.transforms import InterpolationMode"


def fresh_import_works() -> tuple[bool, str]:
    """Does ``import torchvision, transformers, diffusers`` work in a fresh interpreter that never imported
    reimagen (what a user's own script is)?"""
    res = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)
    last = (res.stderr.strip().splitlines() or [""])[-1]
    return res.returncode == 0, last


@friendly
def doctor(fix: bool = typer.Option(False, "--fix", help="Apply the remedies found (writes the torchvision guard "
                                    "into this interpreter's site-packages).")) -> None:
    """Check the environment: torch and torchvision builds, and whether a fresh interpreter can import
    torchvision / transformers / diffusers without importing reimagen first."""
    import torch

    from reimagen.utils.compat import HOOK_FILE, install_torchvision_hook, torchvision_hook_installed

    console.print(f"python {sys.version.split()[0]} ({sys.executable}); torch {torch.__version__} "
                  f"(CUDA {'available' if torch.cuda.is_available() else 'not available'})", highlight=False)
    ok, why = fresh_import_works()
    if ok:
        guard = " (through the torchvision guard)" if torchvision_hook_installed() else ""
        console.print(f"[green]ok[/] a fresh interpreter imports torchvision, transformers and diffusers{guard}")
        return
    console.print(f"[red]problem[/] a fresh interpreter cannot import torchvision / transformers / diffusers: {why}",
                  highlight=False)
    console.print("  cause: torch and torchvision are builds for different back-ends (the registry's only "
                  "torchvision for torch 2.13 is a CUDA build); reimagen's commands work around it, a script of "
                  f"yours does not. Remedy: `reimagen-eval doctor --fix` writes {HOOK_FILE} (a start-up hook that "
                  "stubs torchvision's two operator-registration modules when its compiled ops did not load), or "
                  "install a torchvision built for your torch.", highlight=False)
    if not fix:
        raise typer.Exit(1)
    path = install_torchvision_hook()
    ok, why = fresh_import_works()
    if not ok:
        raise RuntimeError(f"wrote {path} but a fresh interpreter still fails: {why}")
    console.print(f"[green]fixed[/] wrote {path}; a fresh interpreter now imports them", highlight=False)


__all__ = ["doctor", "fresh_import_works"]
