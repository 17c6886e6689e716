"""``reimagen-eval rate ...``: human evaluation of EntityDrawBench runs (paper Table 2, Figure 5).

The main app registers the sub-app::

    from human_eval.cli import rate_app
    app.add_typer(rate_app, name="rate")

Commands: ``raters`` (a rater list with fresh tokens), ``tasks`` (a blind study folder from run folders),
``serve`` (the Streamlit app on 127.0.0.1), ``labelstudio-export`` / ``labelstudio-import``, ``simulate`` (simulated
raters for runs of the synthetic world: the judge CNN, labelled as simulated), ``report``.
Bad input gives one red line and exit code 2. ``python -m human_eval.cli`` runs the sub-app alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from reimagen.utils.cliutil import friendly

rate_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                       help="Human evaluation: blind rating tasks, Streamlit app, Label Studio, Table 2 / Figure 5.")
console = Console(stderr=True)
APP_FILE = Path(__file__).with_name("app.py")

RUNS_ARG = typer.Argument(..., help="EntityDrawBench run folders (RUN_DIR or NAME=RUN_DIR; the name defaults to the "
                          "folder name and is never shown to raters).")
STUDY_OPT = typer.Option(..., "--study", help="Study folder (tasks, image map, ratings.sqlite).")
MODE_OPT = typer.Option("best", "--mode", help="best: rate the pre-selected best of 4 (needs entitydraw-score); "
                        "best-of-4: the rater picks the best of the 4, then rates it (the paper's protocol); "
                        "rate-all: the rater rates all 4 and picks the best (the report compares the human pick "
                        "with an automatic reranker's and with 'any of the 4').")
URL_OPT = typer.Option(None, "--url", help="Label Studio URL (default: $LABEL_STUDIO_URL).")
KEY_OPT = typer.Option(None, "--api-key", help="Label Studio API key (default: $LABEL_STUDIO_API_KEY; prefer the "
                       "variable: options are visible in the process list).", show_default=False)


@rate_app.command("raters")
@friendly
def raters_cmd(names: List[str] = typer.Argument(..., help="Rater ids."),
               out: Path = typer.Option(..., "--out", help="Rater list to write (refuses to overwrite).")):
    """Write a rater list (RATER_ID TOKEN per line, file mode 600) with fresh random tokens."""
    from .tasks import make_raters

    make_raters(names, out)
    console.print(f"wrote {len(names)} raters to {escape(str(out))}; give each rater their own line's token",
                  highlight=False)


CONTROLS_OPT = typer.Option(0, "--controls", min=0, help="Control items of each kind: the entity's own reference "
                            "photos (photorealism = 1) and another entity's (faithfulness = 0). They never count in "
                            "Table 2; the report's rater-quality table scores them.")
REPEATS_OPT = typer.Option(0, "--repeats", min=0, help="Tasks shown twice under another id (within-rater "
                           "consistency).")
CONTROL_FILE_OPT = typer.Option(None, "--control-file", help="Control items of your own (JSON lines: image, prompt, "
                                "reference_image, reference_text, expected {faithfulness, photorealism}).")


@rate_app.command("tasks")
@friendly
def tasks_cmd(runs: List[str] = RUNS_ARG, study: Path = STUDY_OPT, mode: str = MODE_OPT,
              controls: int = CONTROLS_OPT, repeats: int = REPEATS_OPT,
              control_file: Optional[Path] = CONTROL_FILE_OPT):
    """Build (or refresh) a blind study folder from one or more run folders."""
    from .tasks import build_study

    s = build_study(runs, study, mode, controls, repeats, control_file)
    console.print(f"study {escape(str(study))}: {len(s.tasks)} tasks from {len(s.runs)} run(s), mode {s.mode}",
                  highlight=False)


def serve_command(port: int) -> list[str]:
    """`streamlit run human_eval/app.py` on 127.0.0.1 (the study and rater list travel in the environment)."""
    return [sys.executable, "-m", "streamlit", "run", str(APP_FILE), "--server.headless", "true",
            "--server.address", "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none", "--client.toolbarMode", "minimal"]  # no Deploy menu for raters


@rate_app.command("serve")
@friendly
def serve_cmd(runs: List[str] = RUNS_ARG, study: Path = STUDY_OPT, mode: str = MODE_OPT,
              raters: Path = typer.Option(..., "--raters", help="Rater list (RATER_ID TOKEN per line)."),
              port: int = typer.Option(8501, "--port", help="Port on 127.0.0.1."),
              controls: int = CONTROLS_OPT, repeats: int = REPEATS_OPT,
              control_file: Optional[Path] = CONTROL_FILE_OPT):
    """Build/refresh the study and run the Streamlit rating app on 127.0.0.1 (Ctrl+C stops it)."""
    from .tasks import build_study, read_raters

    if not 0 < port < 65536:
        raise ValueError(f"port must be in 1..65535, got {port}")
    read_raters(raters)  # refuse a bad list before starting
    s = build_study(runs, study, mode, controls, repeats, control_file)
    env = {**os.environ, "REIMAGEN_RATING_STUDY": str(Path(study).resolve()),
           "REIMAGEN_RATING_RATERS": str(Path(raters).resolve())}
    console.print(f"rating app for {len(s.tasks)} tasks on http://127.0.0.1:{port}", highlight=False)
    proc = subprocess.Popen(serve_command(port), env=env)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        code = proc.wait()
    if code not in (0, -15):
        raise RuntimeError(f"streamlit exited with code {code}")


@rate_app.command("labelstudio-export")
@friendly
def ls_export_cmd(study: Path = STUDY_OPT, url: Optional[str] = URL_OPT, api_key: Optional[str] = KEY_OPT,
                  title: Optional[str] = typer.Option(None, "--title", help="Project title (default: from the study)."),
                  images: str = typer.Option("upload", "--images", help="upload (data URIs) or local-files."),
                  document_root: Optional[Path] = typer.Option(None, "--document-root", help="local-files: the "
                                                               "server's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT.")):
    """Create/reuse a Label Studio project and import the study's tasks (running it twice adds nothing)."""
    from .labelstudio import export_study
    from .tasks import Study

    res = export_study(Study.load(study), url, api_key, title, images, document_root)
    console.print(f"project {res['project_id']} ({'created' if res['created'] else 'reused'}): "
                  f"{res['imported']} tasks imported, {res['skipped']} already there", highlight=False)


@rate_app.command("labelstudio-import")
@friendly
def ls_import_cmd(study: Path = STUDY_OPT, url: Optional[str] = URL_OPT, api_key: Optional[str] = KEY_OPT,
                  project_id: Optional[int] = typer.Option(None, "--project-id", help="Default: the exported one.")):
    """Pull Label Studio annotations into the study's ratings table."""
    from .labelstudio import import_annotations
    from .tasks import Study

    res = import_annotations(Study.load(study), url, api_key, project_id)
    for p in res["problems"]:
        console.print(f"[yellow]skipped:[/] {escape(p)}", highlight=False)
    console.print(f"project {res['project_id']}: {res['ratings']} ratings from {res['tasks']} tasks", highlight=False)


@rate_app.command("simulate")
@friendly
def simulate_cmd(study: Path = STUDY_OPT,
                 world: Path = typer.Option(..., "--world", help="The synthetic world's folder (its world.json, "
                                            "from `reimagen-eval toy build`) that the study's runs drew."),
                 judge: Optional[Path] = typer.Option(None, "--judge", help="Judge weights folder (judge.safetensors; "
                                                      "default: the package's toyworld/weights/judge)."),
                 raters: int = typer.Option(3, "--raters", help="Simulated raters sim-judge-1 .. sim-judge-N."),
                 noise: float = typer.Option(0.1, "--noise", help="Per-rater flip probability of each answer."),
                 seed: int = typer.Option(0, "--seed", help="Seed of the raters' noise (same seed, same answers)."),
                 quantile: float = typer.Option(0.05, "--photoreal-quantile", help="Photorealistic = the judge is "
                                                "at least as confident as this quantile of clean renders."),
                 force: bool = typer.Option(False, "--force", help="Re-rate tasks the simulated raters already "
                                            "rated (default: skip them).")):
    """SIMULATED raters for runs of the synthetic world: the judge CNN answers the app's questions (with noise).

    Stored with source 'simulated' and raters sim-judge-<k>; `rate report` labels them; reruns skip rated tasks.
    """
    from toyworld import WEIGHTS
    from toyworld.build import load_world

    from .simulate import JudgeReader, simulate
    from .tasks import Study

    s = Study.load(study)
    w = load_world(world)
    reader = JudgeReader.from_path(judge or WEIGHTS / "judge", w, quantile=quantile)
    res = simulate(s, w, reader, n_raters=raters, noise=noise, seed=seed, force=force)
    console.print(f"SIMULATED raters {res['raters'][0]} .. {res['raters'][-1]}: {res['written']} ratings written, "
                  f"{res['skipped']} already rated and skipped" + ("" if force else " (--force re-rates them)"),
                  highlight=False, soft_wrap=True)


@rate_app.command("report")
@friendly
def report_cmd(study: Path = STUDY_OPT, out: Path = typer.Option(..., "--out", help="Report folder."),
               sources: str = typer.Option("all", "--sources", help="all, human (leave simulated ratings out) or "
                                           "simulated (only `rate simulate`'s)."),
               exclude_failing: bool = typer.Option(False, "--exclude-failing", help="Leave out the raters who fail "
                                                    "the quality controls (control items, repeated tasks)."),
               min_control: float = typer.Option(0.75, "--min-control-accuracy", min=0.0, max=1.0,
                                                 help="A rater passes with at least this share of control answers "
                                                 "as expected."),
               min_consistency: float = typer.Option(0.6, "--min-consistency", min=0.0, max=1.0,
                                                     help="... and at least this share of repeated tasks answered "
                                                     "alike.")):
    """Table 2 (CSV + Markdown), Figure 5 (PNG), agreement, majority votes, score correlations, rater quality."""
    from .report import write_report
    from .tasks import Study

    res = write_report(Study.load(study), out, sources, exclude_failing, min_control, min_consistency)
    print(res["markdown"])
    console.print(f"wrote {', '.join(p.name for p in res['files'])} to {escape(str(out))}", highlight=False)


if __name__ == "__main__":
    rate_app()
