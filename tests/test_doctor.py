"""The mixed torch / torchvision install (reimagen/utils/compat.py): `make install` writes a start-up guard so that a
user's own script imports torchvision, transformers and diffusers without importing reimagen; `reimagen-eval doctor`
checks it and explains the remedy."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from reimagen.utils.compat import HOOK_FILE, install_torchvision_hook
from reimagen_eval.cli import app
from reimagen_eval.doctor import PROBE, fresh_import_works


def test_a_fresh_interpreter_imports_diffusers_without_reimagen():
    ok, why = fresh_import_works()
    assert ok, f"{why}: run `reimagen-eval doctor --fix` (make install does)"
    res = CliRunner().invoke(app, ["doctor"])
    assert res.exit_code == 0 and "ok" in res.output


def test_the_guard_runs_at_start_up_from_a_site_directory_and_only_answers_for_two_modules(tmp_path):
    path = install_torchvision_hook(str(tmp_path))
    assert path.endswith(HOOK_FILE) and not list(tmp_path.glob("*.tmp"))
    code = (f"import site, sys; site.addsitedir({str(tmp_path)!r}); {PROBE}; "
            "g = [f for f in sys.meta_path if type(f).__name__ == '_ReimagenTorchvisionGuard']; "
            "print(len(g), g[0].find_spec('json'), g[0].find_spec('torchvision.ops'))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    count, *answers = res.stdout.split()
    assert int(count) >= 1 and answers == ["None", "None"]
