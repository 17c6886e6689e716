"""Reports from the ratings: Table 2, Figure 5, inter-rater agreement, majority votes, CLIP correlation.

Per task (one model, one prompt) the score of a criterion is the raters' **majority vote** (a tie counts 0.5);
with one rater it is that rater's answer. A cell of Table 2 is the mean over tasks with its standard error
``s / sqrt(n)`` (s: sample standard deviation, ddof = 1), as on the paper's slides ("0.68 +- 0.04").

    Table 2    faithfulness per category and All, photorealism All; one row per model
    Figure 5   faithfulness of frequent vs infrequent entities (the run's frequency split, top 50% = frequent);
               runs of the synthetic world give their own ``split`` (frequent / infrequent / unseen), one bar each
    agreement  Fleiss' kappa (tasks with the same number m >= 2 of raters) and Krippendorff's alpha (nominal,
               any number of raters per task) per criterion, with 95% bootstrap intervals (``human_eval.stats``)
    scores     Pearson (point-biserial), Spearman and Kendall correlation of each rating with each automatic score
               of the rated image (CLIP-T / CLIP-I, subject similarity, VQA-style faithfulness), with intervals

Simulated ratings (``human_eval.simulate``: the toy world's judge CNN, source ``simulated``) are reported as such:
the title says so when all ratings are simulated, a warning when they are mixed with human ones, and
``sources="human"`` / ``"simulated"`` reports one kind only.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from .store import SIM_SOURCE, read_candidate_rows, read_rows
from .tasks import Study, atomic_write_text

CRITERIA = ("faithfulness", "photorealism")
CATEGORY_ORDER = ("dogs", "foods", "landmarks", "birds", "characters", "broader")
#: Frequency splits of Figure 5, in order (the paper's two; the synthetic world adds unseen entities).
SPLIT_ORDER = ("frequent", "infrequent", "unseen")
SOURCES = ("all", "human", "simulated")
TITLES = {"dogs": "Dogs", "foods": "Foods", "landmarks": "Landmarks", "birds": "Birds", "characters": "Characters",
          "broader": "Broader", "frequent": "Frequent", "infrequent": "Infrequent", "unseen": "Unseen"}


def mean_se(values: Sequence[float]) -> tuple[float | None, float | None, int]:
    """Mean and standard error s/sqrt(n) (None when undefined)."""
    n = len(values)
    if n == 0:
        return None, None, 0
    m = sum(values) / n
    if n < 2:
        return m, None, n
    s2 = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(s2 / n), n


def majority(votes: Sequence[int]) -> float:
    """1 if most raters said 1, 0 if most said 0, 0.5 on a tie."""
    ones = sum(votes)
    return 1.0 if 2 * ones > len(votes) else 0.0 if 2 * ones < len(votes) else 0.5


# ---------------------------------------------------------------------------------------------- tables

def task_split(task: dict[str, Any]) -> str | None:
    """A task's frequency split: the run's ``split`` (world runs), else from the boolean ``frequent`` flag."""
    if task.get("split"):
        return str(task["split"])
    return {True: "frequent", False: "infrequent"}.get(task.get("frequent"))


def categories(study: Study) -> list[str]:
    """The paper's categories in its order; world runs' categories are their splits (in split order)."""
    cats = [c for c in CATEGORY_ORDER + SPLIT_ORDER if any(t["category"] == c for t in study.tasks.values())]
    return cats + sorted({t["category"] for t in study.tasks.values()} - set(cats))


def splits(study: Study) -> list[str]:
    """frequent and infrequent always (Figure 5), then any other split the study's tasks have."""
    present = {task_split(t) for t in study.tasks.values()} - {None}
    return [s for s in SPLIT_ORDER if s in ("frequent", "infrequent") or s in present] + \
        sorted(present - set(SPLIT_ORDER))


def filter_rows(rows: list[dict], sources: str = "all") -> list[dict]:
    """All ratings, only human ones, or only simulated ones."""
    if sources not in SOURCES:
        raise ValueError(f"unknown sources {sources!r}; choose one of {', '.join(SOURCES)}")
    if sources == "all":
        return rows
    return [r for r in rows if (r.get("source") == SIM_SOURCE) == (sources == "simulated")]


def collect(study: Study, rows: list[dict] | None = None) -> dict[str, Any]:
    """Per-task majority votes and everything the report needs."""
    from .controls import is_rated_task

    rows = read_rows(study.db_path) if rows is None else rows
    rows = [r for r in rows if r["task_id"] in study.tasks and is_rated_task(study.tasks[r["task_id"]])]
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_task[r["task_id"]].append(r)
    votes = []
    for tid, rs in sorted(by_task.items()):
        t = study.tasks[tid]
        votes.append({"task_id": tid, "model": t["model"], "prompt_id": t["prompt_id"], "category": t["category"],
                      "frequent": t.get("frequent"), "split": task_split(t), "n_raters": len(rs),
                      "n_simulated": sum(r.get("source") == SIM_SOURCE for r in rs),
                      **{c: majority([r[c] for r in rs]) for c in CRITERIA}})
    return {"rows": rows, "by_task": by_task, "votes": votes}


def table2(study: Study, votes: list[dict]) -> list[dict[str, Any]]:
    models = list(study.runs)
    cats = categories(study)
    out = []
    for model in models:
        mv = [v for v in votes if v["model"] == model]
        rec: dict[str, Any] = {"model": model, "n_tasks": len(mv)}
        for c in cats:
            m, se, n = mean_se([v["faithfulness"] for v in mv if v["category"] == c])
            rec[f"faithfulness_{c}"], rec[f"faithfulness_{c}_se"], rec[f"faithfulness_{c}_n"] = m, se, n
        for crit in CRITERIA:
            m, se, n = mean_se([v[crit] for v in mv])
            rec[f"{crit}_all"], rec[f"{crit}_all_se"], rec[f"{crit}_all_n"] = m, se, n
        for split in splits(study):
            m, se, n = mean_se([v["faithfulness"] for v in mv if v["split"] == split])
            rec[f"faithfulness_{split}"], rec[f"faithfulness_{split}_se"], rec[f"faithfulness_{split}_n"] = m, se, n
        out.append(rec)
    return out


def agreement(study: Study, by_task: dict[str, list[dict]]) -> list[dict[str, Any]]:
    from .stats import agreement_stats

    return [agreement_stats(by_task, crit) for crit in CRITERIA]


def score_correlation(study: Study, rows: list[dict]) -> list[dict[str, Any]]:
    """Per criterion and automatic score (CLIP-T / CLIP-I, DINO or judge-feature subject similarity, VQA-style
    faithfulness: whatever ``entitydraw-score`` or the world judge wrote): Pearson, Spearman and Kendall
    correlation with the ratings of the rated image, with 95% intervals."""
    from .stats import correlations
    from .tasks import SCORE_KEYS

    out = []
    present = [k for k in SCORE_KEYS if any(c.get(k) is not None for t in study.tasks.values()
                                            for c in t.get("candidates", []))]
    for crit in CRITERIA:
        for metric in present or ["clip_t", "clip_i"]:
            xs, ys = [], []
            for r in rows:
                t = study.tasks.get(r["task_id"])
                cand = next((c for c in (t or {}).get("candidates", []) if c["image_id"] == r["chosen_image"]), None)
                if cand is not None and cand.get(metric) is not None:
                    xs.append(float(r[crit]))
                    ys.append(float(cand[metric]))
            out.append({"criterion": crit, "score": metric, **correlations(xs, ys)})
    return out


# ---------------------------------------------------------------------------------------------- output

def _fmt(m, se) -> str:
    if m is None:
        return "-"
    return f"{m:.2f} ± {se:.2f}" if se is not None else f"{m:.2f}"


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def _num(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown(study: Study, t2: list[dict], agree: list[dict], corr: list[dict], n_ratings: int,
             n_simulated: int = 0, note: str | None = None) -> str:
    cats, spl = categories(study), splits(study)
    head = ["Model", *[TITLES.get(c, c) for c in cats], "All", "Photorealism (All)", "Tasks"]
    if n_simulated and n_simulated == n_ratings:
        title = [f"# EntityDrawBench evaluation by SIMULATED raters ({study.mode}, {n_ratings} ratings)", "",
                 "> Simulated ratings: the synthetic world's judge CNN with per-rater noise stands in for human "
                 "raters. These are not human judgements."]
    else:
        title = [f"# EntityDrawBench human evaluation ({study.mode}, {n_ratings} ratings)"]
        if n_simulated:
            title += ["", f"> Warning: {n_simulated} of the {n_ratings} ratings are SIMULATED (judge CNN, source "
                      "'simulated'); report one kind with `--sources human` or `--sources simulated`."]
    if n_simulated and note:
        title += ["", f"> {note}"]
    fig_title = ("frequent vs infrequent entities" if spl == ["frequent", "infrequent"]
                 else "by entity frequency split")
    lines = [*title, "",
             "## Table 2: faithfulness per category and All, photorealism All (mean ± standard error)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in t2:
        cells = [r["model"], *[_fmt(r[f"faithfulness_{c}"], r[f"faithfulness_{c}_se"]) for c in cats],
                 _fmt(r["faithfulness_all"], r["faithfulness_all_se"]),
                 _fmt(r["photorealism_all"], r["photorealism_all_se"]), str(r["n_tasks"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"## Figure 5: faithfulness, {fig_title}", "",
              "| Model | " + " | ".join(s.capitalize() for s in spl) + " |", "|---|" + "---|" * len(spl)]
    lines += ["| " + " | ".join([r["model"], *[_fmt(r[f"faithfulness_{s}"], r[f"faithfulness_{s}_se"]) for s in spl]])
              + " |" for r in t2]
    lines += ["", "## Inter-rater agreement (tasks with 2+ raters; scores are majority votes, ties 0.5)", "",
              "Fleiss' kappa (statsmodels) and Krippendorff's alpha (krippendorff, nominal), each with a 95% "
              "bootstrap interval over tasks.", "",
              "| Criterion | Tasks | Fleiss' kappa | Krippendorff's alpha | Unanimous |", "|---|---|---|---|---|"]
    lines += [f"| {a['criterion']} | {a['tasks_with_2plus_raters']} | {_ci(a, 'fleiss_kappa')} | "
              f"{_ci(a, 'krippendorff_alpha')} | {_num(a['unanimous_fraction'])} |" for a in agree]
    lines += ["", "## Ratings vs automatic scores (per rating, the rated image; 95% intervals)", "",
              "| Criterion | Score | n | Pearson r | p | Spearman rho | Kendall tau |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {c['criterion']} | {c['score']} | {c['n']} | {_ci(c, 'pearson_r', 'pearson')} | "
              f"{_num(c['pearson_p'])} | {_ci(c, 'spearman_rho', 'spearman')} | {_ci(c, 'kendall_tau', 'kendall')} |"
              for c in corr]
    return "\n".join(lines) + "\n"


def best_of_n_comparison(study: Study, rows: list[dict], cand_rows: list[dict]) -> list[dict[str, Any]]:
    """Per model, what Table 2's faithfulness would be under each best-of-N choice: the raters' own pick, the
    automatic reranker's pick (the candidate ``entitydraw-score`` / the world judge marked ``selected``) and any
    of the N (a faithful sample exists; the paper's best of 4 as an upper bound), and how often the raters picked
    the reranker's image. The last two need ``--mode rate-all`` (every candidate rated), the agreement a pick."""
    from .controls import is_rated_task

    per: dict[tuple[str, str], dict[str, tuple[int, int]]] = defaultdict(dict)
    for c in cand_rows:
        per[(c["rater"], c["task_id"])][c["image_id"]] = (c["faithfulness"], c["photorealism"])
    out = []
    for model in study.runs:
        votes: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        agree = []
        for r in rows:
            t = study.tasks.get(r["task_id"])
            if not t or t["model"] != model or not is_rated_task(t) or len(t["candidates"]) < 2:
                continue
            auto = next((c["image_id"] for c in t["candidates"] if c.get("selected")), None)
            if auto is not None and r.get("chosen_image"):
                agree.append(r["chosen_image"] == auto)
            mine = per.get((r["rater"], r["task_id"]))
            v = votes[r["task_id"]]
            v["human"].append(r["faithfulness"])
            if mine:
                v["any"].append(max(f for f, _ in mine.values()))
                if auto in mine:
                    v["reranker"].append(mine[auto][0])
        rec: dict[str, Any] = {"model": model, "pick_agreement": (sum(agree) / len(agree)) if agree else None,
                               "picks_compared": len(agree)}
        for kind in ("human", "reranker", "any"):
            m, se, n = mean_se([majority(v[kind]) for v in votes.values() if v[kind]])
            rec[f"faithfulness_{kind}"], rec[f"faithfulness_{kind}_se"], rec[f"faithfulness_{kind}_n"] = m, se, n
        out.append(rec)
    return out


def best_of_n_markdown(recs: list[dict]) -> str:
    if not any(r["picks_compared"] or r["faithfulness_any_n"] for r in recs):
        return ""
    lines = ["", "## Best of N: the raters' pick, the automatic reranker's pick, any of the N (faithfulness)", "",
             "Under `--mode rate-all` every sample is rated, so Table 2's faithfulness can be computed for each way "
             "of choosing the rated sample; 'pick agreement' is how often a rater chose the reranker's image.", "",
             "| Model | Raters' pick | Reranker's pick | Any of N | Pick agreement (n) |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {_fmt(r['faithfulness_human'], r['faithfulness_human_se'])} | "
              f"{_fmt(r['faithfulness_reranker'], r['faithfulness_reranker_se'])} | "
              f"{_fmt(r['faithfulness_any'], r['faithfulness_any_se'])} | {_num(r['pick_agreement'])} "
              f"({r['picks_compared']}) |" for r in recs]
    return "\n".join(lines) + "\n"


def _ci(rec: dict, key: str, stem: str | None = None) -> str:
    """``value [lo, hi]`` of a statistic with its interval (``<stem>_lo`` / ``<stem>_hi``)."""
    stem = stem or key
    v, lo, hi = rec.get(key), rec.get(f"{stem}_lo"), rec.get(f"{stem}_hi")
    return _num(v) if lo is None or hi is None else f"{_num(v)} [{_num(lo)}, {_num(hi)}]"


def figure5(t2: list[dict], path: Path, spl: Sequence[str] = ("frequent", "infrequent"),
            simulated: bool = False) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = ("#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377")
    fig, ax = plt.subplots(figsize=(1.6 + 0.7 * len(spl) * max(1, len(t2)), 3.2))
    width = 0.76 / len(spl)
    for k, split in enumerate(spl):
        color = colours[k % len(colours)]
        xs = [i + (k - (len(spl) - 1) / 2) * width for i in range(len(t2))]
        ys = [r[f"faithfulness_{split}"] or 0 for r in t2]
        err = [r[f"faithfulness_{split}_se"] or 0 for r in t2]
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=split.capitalize(), color=color)
    ax.set_xticks(range(len(t2)), [r["model"] for r in t2])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("Faithfulness")
    title = ("Figure 5: frequent vs infrequent entities" if len(spl) == 2
             else "Figure 5: faithfulness by frequency split")
    ax.set_title(title + (" (SIMULATED raters)" if simulated else ""), fontsize=10)
    ax.legend(frameon=False)
    fig.tight_layout()
    from reimagen.utils.atomic import replacing_path  # here, not at the top: ``import reimagen`` loads torch

    with replacing_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
    return path


def write_report(study: Study, out: str | Path, sources: str = "all", exclude_failing: bool = False,
                 min_control: float | None = None, min_consistency: float | None = None) -> dict[str, Any]:
    """Write table2.csv/.md, figure5.png, agreement.csv, majority_votes.csv, score_correlation.csv,
    rater_quality.csv, report.md. ``sources``: all ratings, only human ones or only simulated ones
    (``human_eval.simulate``). ``exclude_failing``: leave out the raters who fail the quality controls
    (``human_eval.controls``; thresholds ``min_control`` / ``min_consistency``)."""
    from .controls import MIN_CONSISTENCY, MIN_CONTROL_ACCURACY, quality_settings, rater_quality

    out = Path(out)
    min_control = MIN_CONTROL_ACCURACY if min_control is None else min_control
    min_consistency = MIN_CONSISTENCY if min_consistency is None else min_consistency
    rows = filter_rows(read_rows(study.db_path), sources)
    quality = rater_quality(study, rows, min_control, min_consistency)
    failing = {q["rater"] for q in quality if not q["passes"]}
    if exclude_failing:
        rows = [r for r in rows if r["rater"] not in failing]
    data = collect(study, rows)
    if not data["votes"]:
        kind = "" if sources == "all" else f"{sources} "
        raise ValueError(f"no {kind}ratings in {study.db_path} yet: nothing to report")
    t2 = table2(study, data["votes"])
    agree = agreement(study, data["by_task"])
    corr = score_correlation(study, data["rows"])
    n_sim = sum(r.get("source") == SIM_SOURCE for r in data["rows"])
    note = None
    if n_sim:
        from .simulate import simulated_note

        note = simulated_note(study)
    cand_rows = [c for c in read_candidate_rows(study.db_path) if not (exclude_failing and c["rater"] in failing)]
    best_n = best_of_n_comparison(study, data["rows"], cand_rows)
    md = markdown(study, t2, agree, corr, len(data["rows"]), n_sim, note) + best_of_n_markdown(best_n)
    md += quality_markdown(quality, quality_settings(min_control, min_consistency), failing, exclude_failing)
    files = [atomic_write_text(out / "table2.csv", _csv(t2)), atomic_write_text(out / "agreement.csv", _csv(agree)),
             atomic_write_text(out / "rater_quality.csv", _csv(quality)),
             atomic_write_text(out / "best_of_n.csv", _csv(best_n)),
             atomic_write_text(out / "majority_votes.csv", _csv(data["votes"])),
             atomic_write_text(out / "score_correlation.csv", _csv(corr)), atomic_write_text(out / "report.md", md),
             figure5(t2, out / "figure5.png", splits(study), simulated=n_sim > 0)]
    return {"table2": t2, "agreement": agree, "scores": corr, "quality": quality, "best_of_n": best_n,
            "markdown": md, "files": files}


def quality_markdown(quality: list[dict], rule: str, failing: set[str], excluded: bool) -> str:
    """The per-rater quality table (controls and repeats never count in the tables above)."""
    lines = ["", "## Rater quality (control items and repeated tasks; they never count in the tables above)", "",
             f"Rule: {rule}. " + (f"Excluded from every table above: {', '.join(sorted(failing))}." if excluded and
                                  failing else "Failing raters are kept (rate report --exclude-failing drops them)."
                                  if failing else "Every rater passes."), "",
             "| Rater | Ratings | Control answers | As expected | Repeats | Answered alike | Passes |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {q['rater']} | {q['ratings']} | {q['control_answers']} | {_num(q['control_accuracy'])} | "
              f"{q['repeats']} | {_num(q['consistency'])} | {'yes' if q['passes'] else 'NO'} |" for q in quality]
    return "\n".join(lines) + "\n"
